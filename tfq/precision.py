"""Bit-widths of a built model: read them, change them between training stages."""

from __future__ import annotations

import dataclasses


from tfq import layers as qlayers
from tfq import quantizers as qz


@dataclasses.dataclass(frozen=True)
class Precision:
    """Weight and activation bit-widths of a network (32 = full precision)."""

    w_bits: int = 32
    a_bits: int = 32

    def __post_init__(self):
        qz.check_bits(self.w_bits, "w_bits")
        qz.check_bits(self.a_bits, "a_bits")

    @property
    def full_precision(self):
        return self.w_bits == qz.FULL_PRECISION and self.a_bits == qz.FULL_PRECISION

    def __str__(self):
        return f"W{self.w_bits}A{self.a_bits}"


def iter_layers(model):
    """Yields every layer of ``model``, descending into nested models."""
    for layer in model.layers if hasattr(model, "layers") else ():
        yield layer
        if hasattr(layer, "layers"):
            yield from iter_layers(layer)


def _reset_compiled_functions(model):
    # Bits are read while tracing; Keras caches the traced train/test/predict
    # functions, so they must be dropped for the new bits to take effect.
    for attr in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attr):
            setattr(model, attr, None)


def set_precision(model, w_bits=None, a_bits=None, *, include_pinned=False):
    """Changes the bit-widths of a built model in place.

    This is the supported way to move between TS / PQ stages: the layers keep their
    weights, only the quantizers change. Pinned layers (the ``**`` variant's first
    conv and last FC) are left alone unless ``include_pinned`` is set. The network
    input quantizer (always 8 bits) is never touched.

    Args:
      model: a Keras model containing tfq layers.
      w_bits: new weight bit-width, or None to keep the current ones.
      a_bits: new activation bit-width, or None to keep the current ones.
      include_pinned: also change pinned layers.

    Returns:
      The number of layers whose bit-width changed.
    """
    if w_bits is not None:
        w_bits = qz.check_bits(w_bits, "w_bits")
    if a_bits is not None:
        a_bits = qz.check_bits(a_bits, "a_bits")
    changed = 0
    for layer in iter_layers(model):
        if getattr(layer, "pinned", False) and not include_pinned:
            continue
        if w_bits is not None and isinstance(layer, (qlayers.QConv2D, qlayers.QDense)):
            changed += layer.w_bits != w_bits
            layer.w_bits = w_bits
        if a_bits is not None and isinstance(layer, qlayers.QActivation):
            changed += layer.bits != a_bits
            layer.bits = a_bits
    _reset_compiled_functions(model)
    return changed


def get_precision(model):
    """Returns the model's ``Precision`` (the bits of its non-pinned layers).

    Raises:
      ValueError: the model has no tfq layers, or its non-pinned layers disagree.
    """
    w = {l.w_bits for l in iter_layers(model)
         if isinstance(l, (qlayers.QConv2D, qlayers.QDense)) and not l.pinned}
    a = {l.bits for l in iter_layers(model)
         if isinstance(l, qlayers.QActivation) and not l.pinned}
    if len(w) > 1 or len(a) > 1:
        raise ValueError(f"mixed bit-widths in {model.name}: weights {w}, activations {a}")
    if not w and not a:
        raise ValueError(f"{model.name} has no tfq quantized layers")
    return Precision(w.pop() if w else 32, a.pop() if a else 32)


def describe(model):
    """One line per quantized layer: name, kind, bits, pinned. For summaries and logs."""
    rows = []
    for layer in iter_layers(model):
        if isinstance(layer, (qlayers.QConv2D, qlayers.QDense)):
            rows.append((layer.name, "weights", layer.w_bits, layer.pinned))
        elif isinstance(layer, qlayers.QActivation):
            rows.append((layer.name, "activations", layer.bits, layer.pinned))
    return rows


__all__ = ["Precision", "set_precision", "get_precision", "describe", "iter_layers"]
