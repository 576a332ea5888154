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


# Method strings of the paper's evaluation (section 4), plus "fp" (full precision only)
# and "pq+guided"; components may be written in any order ("guided+ts" == "ts+guided").
METHODS = ("fp", "baseline", "ts", "pq", "guided", "pq+ts", "ts+guided", "pq+guided",
           "pq+ts+guided")
DEFAULT_PQ_SEQUENCE = (32, 8, 4, 2)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: bits, guided or not, epochs and a step lr schedule.

    The learning rate starts at ``lr`` and is multiplied by ``lr_decay_factor`` every
    ``lr_decay_epochs`` epochs; the optimizer and the schedule restart at each stage.
    """

    name: str
    w_bits: int
    a_bits: int
    guided: bool = False
    epochs: int = 10
    lr: float = 1e-3
    lr_decay_epochs: int = 10
    lr_decay_factor: float = 0.1

    def __post_init__(self):
        Precision(self.w_bits, self.a_bits)  # validates the bits
        if self.epochs < 1 or self.lr_decay_epochs < 1:
            raise ValueError(f"stage {self.name}: epochs and lr_decay_epochs must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"stage {self.name}: lr must be > 0; got {self.lr}")

    @property
    def precision(self):
        return Precision(self.w_bits, self.a_bits)

    def to_dict(self):
        return dataclasses.asdict(self)


def parse_method(method):
    """Normalises a method string to a sorted tuple of components.

    Returns:
      ``("fp",)``, ``("baseline",)`` or a sorted subset of ``("guided", "pq", "ts")``.

    Raises:
      ValueError: unknown method or component; the message lists the accepted ones.
    """
    parts = [p.strip().lower() for p in str(method).split("+")]
    single = {"fp", "baseline"}
    known = {"ts", "pq", "guided"}
    if len(parts) == 1 and parts[0] in single:
        return (parts[0],)
    if not parts or any(p not in known for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"unknown method {method!r}; accepted: {', '.join(METHODS)} "
            "(components ts, pq, guided joined with '+', in any order)"
        )
    return tuple(sorted(parts))


def check_pq_sequence(sequence):
    """Validates a PQ sequence: bit-widths, strictly decreasing.

    Returns:
      The sequence as a tuple of ints.
    """
    seq = tuple(qz.check_bits(b, "pq_sequence value") for b in sequence)
    if not seq:
        raise ValueError("pq_sequence is empty")
    if any(a <= b for a, b in zip(seq, seq[1:])):
        raise ValueError(f"pq_sequence must strictly decrease, e.g. 32,8,4,2; got {list(seq)}")
    return seq


def _steps(sequence, target):
    """The PQ bit-widths from the sequence down to ``target`` (32 excluded)."""
    return [b for b in sequence if target < b < qz.FULL_PRECISION] + [target]


def plan_stages(method, *, w_bits, a_bits, pq_sequence=DEFAULT_PQ_SEQUENCE, epochs=10,
                stage_epochs=None, pretrain_epochs=0, lr=1e-3, lr_decay_epochs=10,
                pretrain_lr=1e-2, pretrain_lr_decay_epochs=30, lr_decay_factor=0.1):
    """Expands a method string into the explicit list of stages.

    - ``baseline``: one stage at the target bits.
    - ``ts``: stage 1 quantizes weights only (activations 32-bit), stage 2 both.
    - ``pq``: weights and activations together along ``pq_sequence`` to the target.
    - ``pq+ts``: PQ inside each TS stage: weights along the sequence with 32-bit
      activations, then activations along the sequence with target-bit weights.
    - ``+guided``: every quantized stage is guided.
    - ``fp``: a single full-precision stage.

    A full-precision pretraining stage comes first when ``pretrain_epochs`` > 0.

    Args:
      method: a method string (``METHODS``).
      w_bits: target weight bits.
      a_bits: target activation bits.
      pq_sequence: strictly decreasing bit-widths, e.g. (32, 8, 4, 2).
      epochs: epochs of every quantized stage (and of ``fp`` without pretraining).
      stage_epochs: optional per-quantized-stage epochs, overriding ``epochs``.
      pretrain_epochs: epochs of full-precision pretraining (0: none).
      lr: initial lr of quantized stages.
      lr_decay_epochs: quantized stages divide the lr every this many epochs.
      pretrain_lr: initial lr of the full-precision stage.
      pretrain_lr_decay_epochs: its decay period.
      lr_decay_factor: the factor applied at each decay.

    Returns:
      A list of ``Stage``.
    """
    parts = parse_method(method)
    target = Precision(w_bits, a_bits)
    seq = check_pq_sequence(pq_sequence)
    fp_stage = lambda n: Stage("fp", 32, 32, False, n, pretrain_lr,  # noqa: E731
                               pretrain_lr_decay_epochs, lr_decay_factor)
    if parts == ("fp",):
        return [fp_stage(pretrain_epochs or epochs)]
    if target.full_precision:
        raise ValueError(f"method {method!r} needs target bits below 32 (got {target})")

    w, a = target.w_bits, target.a_bits
    pq, ts = "pq" in parts, "ts" in parts
    if ts and pq:
        bits = [(b, 32) for b in _steps(seq, w)] + [(w, b) for b in _steps(seq, a)]
    elif ts:
        bits = [(w, 32), (w, a)]
    elif pq:
        bits = [(max(b, w), max(b, a)) for b in _steps(seq, min(w, a))]
    else:
        bits = [(w, a)]
    bits = [b for i, b in enumerate(bits) if i == 0 or b != bits[i - 1]]
    if a == 32:  # weight-only targets: TS stage 2 equals stage 1
        bits = [b for i, b in enumerate(bits) if b not in bits[:i]]

    if stage_epochs is not None:
        stage_epochs = [int(e) for e in stage_epochs]
        if len(stage_epochs) != len(bits):
            raise ValueError(
                f"stage_epochs has {len(stage_epochs)} values but method {method!r} has "
                f"{len(bits)} quantized stages: {[f'W{x}A{y}' for x, y in bits]}"
            )
    guided = "guided" in parts
    stages = [fp_stage(pretrain_epochs)] if pretrain_epochs else []
    for i, (wb, ab) in enumerate(bits):
        stages.append(Stage(
            f"w{wb}a{ab}" + ("_guided" if guided else ""), wb, ab, guided,
            stage_epochs[i] if stage_epochs else epochs, lr, lr_decay_epochs,
            lr_decay_factor,
        ))
    return stages


def format_plan(stages):
    """The plan as a printable table."""
    head = f"{'#':>2}  {'stage':<16} {'W':>3} {'A':>3} {'guided':>6} {'epochs':>6} {'lr':>8}  schedule"
    rows = [head, "-" * len(head)]
    for i, s in enumerate(stages):
        rows.append(
            f"{i:>2}  {s.name:<16} {s.w_bits:>3} {s.a_bits:>3} {'yes' if s.guided else 'no':>6} "
            f"{s.epochs:>6} {s.lr:>8g}  x{s.lr_decay_factor:g} every {s.lr_decay_epochs} epochs"
        )
    return "\n".join(rows)


__all__ = ["Precision", "set_precision", "get_precision", "describe", "iter_layers",
           "Stage", "METHODS", "parse_method", "plan_stages", "format_plan",
           "check_pq_sequence", "DEFAULT_PQ_SEQUENCE"]
