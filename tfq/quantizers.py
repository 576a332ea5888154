"""DoReFa-style k-bit quantizers with straight-through gradients (paper eqs. 1-4).

The pure functions are the reference implementation used by the layers; the small
classes below wrap them so that a layer can hold (and serialize) its quantizer.

Rounding is half-up (``floor(v + 0.5)``), the convention of TensorFlow's fake-quant
kernels and of TFLite's integer kernels, so a trained model and its int8 export round
ties the same way.
"""

from __future__ import annotations

import numbers

import keras
import tensorflow as tf

FULL_PRECISION = 32
ACCEPTED_BITS = tuple(range(1, 9)) + (FULL_PRECISION,)
_ACCEPTED_TEXT = "an int in 1..8, or 32 for full precision"


def check_bits(bits, name="bits"):
    """Validates a bit-width.

    Args:
      bits: the value to check.
      name: how the value is called in the error message.

    Returns:
      ``bits`` as a plain ``int``.

    Raises:
      ValueError: ``bits`` is not an int in 1..8 or 32 (bools, floats and strings are
        refused even when they look like a valid number).
    """
    if (
        isinstance(bits, bool)
        or not isinstance(bits, numbers.Integral)
        or int(bits) not in ACCEPTED_BITS
    ):
        raise ValueError(f"{name} must be {_ACCEPTED_TEXT}; got {bits!r}.")
    return int(bits)


def _levels(bits):
    return float(2**bits - 1)


def quantize(x, bits):
    """Eq. (1): ``Q_k(z) = round((2^k - 1) z) / (2^k - 1)`` for ``z`` in [0, 1].

    The gradient is the straight-through estimator of eq. (4): identity.

    Args:
      x: a float tensor, expected in [0, 1].
      bits: 1..8, or 32 (returns ``x`` untouched).

    Returns:
      The quantized tensor.
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    x = tf.convert_to_tensor(x)
    n = _levels(bits)
    q = tf.floor(x * n + 0.5) / n
    # stop_gradient on the difference gives the identity gradient without a
    # custom-gradient function, which keeps the op fusable and cheap.
    return x + tf.stop_gradient(q - x)


def quantize_weights(w, bits):
    """Eq. (2): ``2 Q_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``.

    The result lies in [-1, 1] on ``2^k`` evenly spaced levels (odd multiples of
    ``1 / (2^k - 1)``; zero is not a level). The maximum is over the whole tensor.
    Gradients pass straight through the rounding and flow through ``tanh`` and the
    normalisation.

    Args:
      w: the full-precision weight tensor.
      bits: 1..8, or 32 (returns ``w`` untouched).

    Returns:
      The quantized weights.
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return w
    t = tf.tanh(tf.convert_to_tensor(w))
    # A zero tensor has max|t| = 0: the floor keeps it from turning into NaN.
    scale = tf.maximum(tf.reduce_max(tf.abs(t)), 1e-12)
    z = t / (2.0 * scale) + 0.5
    return 2.0 * quantize(z, bits) - 1.0


def quantize_activations(x, bits):
    """Eq. (3): ``Q_k(clip(x, 0, 1))``, with the gradient of eq. (4).

    The gradient is 1 inside [0, 1] and 0 outside.

    Args:
      x: a float tensor.
      bits: 1..8, or 32 (returns ``x`` untouched: no clip either).

    Returns:
      The quantized activations, on the levels ``i / (2^k - 1)``.
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    x = tf.convert_to_tensor(x)
    if bits >= 2 and x.dtype == tf.float32:
        # One fused kernel (clip + round forward, masked identity backward): this is
        # what keeps a k-bit training step close to the cost of a float one.
        return tf.quantization.fake_quant_with_min_max_args(
            x, min=0.0, max=1.0, num_bits=bits
        )
    return quantize(tf.clip_by_value(x, 0.0, 1.0), bits)


def quantize_input(x, bits=8, low=-1.0, high=1.0):
    """Fake-quantizes a network input to ``bits`` on [low, high].

    Used to keep the network input at 8 bits. TensorFlow nudges the range so that
    zero is exactly a level, the same nudge the TFLite converter applies, so the
    quantized input is exactly representable by the int8 input tensor of an export.

    Args:
      x: input tensor.
      bits: 2..8, or 32 for a no-op.
      low: lower end of the range.
      high: upper end of the range.

    Returns:
      The quantized tensor (straight-through gradient inside the range).
    """
    bits = check_bits(bits)
    if bits == FULL_PRECISION:
        return x
    if bits < 2:
        raise ValueError(f"input bits must be 2..8 or 32; got {bits!r}.")
    return tf.quantization.fake_quant_with_min_max_args(
        tf.convert_to_tensor(x), min=float(low), max=float(high), num_bits=bits
    )


class Quantizer:
    """Base class: configuration only (a bit-width), no state.

    Attributes:
      bits: the bit-width; 32 means full precision (the quantizer is the identity).
    """

    def __init__(self, bits=FULL_PRECISION):
        self.bits = bits

    @property
    def bits(self):
        return self._bits

    @bits.setter
    def bits(self, value):
        self._bits = check_bits(value)

    @property
    def full_precision(self):
        """True when the quantizer is the identity."""
        return self._bits == FULL_PRECISION

    def __call__(self, x):
        raise NotImplementedError

    def get_config(self):
        return {"bits": self._bits}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}(bits={self._bits})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, self._bits))


@keras.saving.register_keras_serializable(package="tfq")
class UniformQuantizer(Quantizer):
    """Eq. (1) as an object."""

    def __call__(self, x):
        return quantize(x, self._bits)


@keras.saving.register_keras_serializable(package="tfq")
class WeightQuantizer(Quantizer):
    """Eq. (2) as an object."""

    def __call__(self, w):
        return quantize_weights(w, self._bits)


@keras.saving.register_keras_serializable(package="tfq")
class ActivationQuantizer(Quantizer):
    """Eq. (3) as an object."""

    def __call__(self, x):
        return quantize_activations(x, self._bits)


def get(identifier, default_cls=WeightQuantizer):
    """Turns a bit-width, a config dict or a quantizer into a quantizer object.

    Args:
      identifier: an int bit-width (wrapped in ``default_cls``), a ``Quantizer``, or a
        dict produced by ``keras.saving.serialize_keras_object``.
      default_cls: the class used for a bare bit-width.

    Returns:
      A ``Quantizer``.
    """
    if isinstance(identifier, Quantizer):
        return identifier
    if isinstance(identifier, dict):
        return keras.saving.deserialize_keras_object(identifier)
    return default_cls(identifier)
