"""Model registry: names -> keyword-only builders, plus each model's guidance points."""

from __future__ import annotations

import dataclasses
from typing import Callable

from tfq import quantizers as qz


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model.

    Attributes:
      name: registry name (also the built model's ``name``).
      builder: keyword-only function returning a ``keras.Model``.
      default_input_shape: used when ``build`` gets ``input_shape=None``.
      guidance_layers: names of the two layers whose outputs the Guided scheme compares.
      description: one line for ``--help`` and errors.
    """

    name: str
    builder: Callable
    default_input_shape: tuple
    guidance_layers: tuple
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register(name, *, default_input_shape, guidance_layers, description=""):
    """Decorator registering a builder under ``name``.

    Raises:
      ValueError: ``name`` is already registered.
    """

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(
            name, fn, tuple(default_input_shape), tuple(guidance_layers), description
        )
        return fn

    return wrap


def names():
    """Sorted names of the registered models."""
    return sorted(_REGISTRY)


def spec(name):
    """The ``ModelSpec`` of ``name``.

    Raises:
      ValueError: unknown name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(names())}"
        ) from None


def build(name, *, num_classes, input_shape=None, w_bits=32, a_bits=32, **options):
    """Builds a registered model.

    Args:
      name: a name from ``names()``.
      num_classes: number of output classes.
      input_shape: (height, width, channels); the model's default when None.
      w_bits: weight bit-width for every quantized conv/FC layer (1..8 or 32).
      a_bits: activation bit-width (1..8 or 32).
      **options: model options, common to all models:
        ``fp_first_last`` (bool, the paper's ``**`` variant: first conv and last FC
        keep 32-bit weights), ``fp_activation`` (``"relu"`` or ``"clip"``: the
        nonlinearity of 32-bit activation layers), ``input_bits`` (8), and
        ``classifier_activation`` (``"softmax"`` or None for logits). Model-specific
        options are documented on each builder.

    Returns:
      An uncompiled ``keras.Model`` named ``name``.

    Raises:
      ValueError: unknown model, bad bit-width, bad class count or unknown option.
    """
    s = spec(name)
    qz.check_bits(w_bits, "w_bits")
    qz.check_bits(a_bits, "a_bits")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2; got {num_classes!r}")
    shape = tuple(input_shape) if input_shape is not None else s.default_input_shape
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels); got {shape!r}")
    try:
        return s.builder(
            num_classes=num_classes, input_shape=shape, w_bits=w_bits, a_bits=a_bits,
            **options,
        )
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise ValueError(f"{name}: {e}") from None
        raise


def guidance_layers(model_or_name):
    """Names of the two guidance points of a registered model (or a built one)."""
    name = model_or_name if isinstance(model_or_name, str) else model_or_name.name
    return spec(name).guidance_layers
