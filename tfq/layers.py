"""Quantized Keras 3 layers: a Keras layer plus a quantizer, nothing else.

Changing bit-widths: every quantized layer exposes its bit-width as a plain Python
attribute (``w_bits`` on ``QConv2D`` / ``QDense``, ``bits`` on ``QActivation``). The
attribute is part of ``get_config``, so a saved model remembers it. Because the bits
change the traced graph, change them through ``tfq.precision.set_precision``, which
also drops the model's compiled train/test/predict functions so the next call retraces.
A layer built with ``pinned=True`` keeps its bit-width when ``set_precision`` runs
(the paper's ``**`` variant pins the first conv and last FC at 32 bits).
"""

from __future__ import annotations

import keras
from keras import ops

from tfq import quantizers as qz

FP_ACTIVATIONS = ("relu", "clip", "linear")


class _WeightQuantized:
    """Mixin holding a weight quantizer; the layers call ``self.quantized_kernel``."""

    def _init_quantizer(self, w_bits, pinned):
        self.kernel_quantizer = qz.get(w_bits, qz.WeightQuantizer)
        self.pinned = bool(pinned)

    @property
    def w_bits(self):
        """Weight bit-width (32 = full precision)."""
        return self.kernel_quantizer.bits

    @w_bits.setter
    def w_bits(self, value):
        self.kernel_quantizer.bits = value

    def _quantizer_config(self):
        return {"w_bits": self.w_bits, "pinned": self.pinned}


@keras.saving.register_keras_serializable(package="tfq")
class QConv2D(_WeightQuantized, keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose kernel goes through eq. (2); bias stays float.

    Args:
      filters: as for ``keras.layers.Conv2D``.
      kernel_size: as for ``keras.layers.Conv2D``.
      w_bits: weight bit-width, 1..8 or 32.
      pinned: keep ``w_bits`` when ``tfq.precision.set_precision`` runs.
      **kwargs: any other ``keras.layers.Conv2D`` argument.
    """

    def __init__(self, filters, kernel_size, *, w_bits=32, pinned=False, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        self._init_quantizer(w_bits, pinned)

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, self.kernel_quantizer(kernel))

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


@keras.saving.register_keras_serializable(package="tfq")
class QDense(_WeightQuantized, keras.layers.Dense):
    """``keras.layers.Dense`` whose kernel goes through eq. (2); bias stays float.

    Args:
      units: as for ``keras.layers.Dense``.
      w_bits: weight bit-width, 1..8 or 32.
      pinned: keep ``w_bits`` when ``tfq.precision.set_precision`` runs.
      **kwargs: any other ``keras.layers.Dense`` argument.
    """

    def __init__(self, units, *, w_bits=32, pinned=False, **kwargs):
        super().__init__(units, **kwargs)
        self._init_quantizer(w_bits, pinned)

    def call(self, inputs, training=None):
        x = ops.matmul(inputs, self.kernel_quantizer(self.kernel))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


@keras.saving.register_keras_serializable(package="tfq")
class QActivation(keras.layers.Layer):
    """The network's nonlinearity: eq. (3) below 32 bits, a float activation at 32.

    Args:
      bits: activation bit-width, 1..8 or 32.
      fp_activation: what the layer computes at 32 bits: ``"relu"`` (like
        ``keras.layers.ReLU``), ``"clip"`` (``clip(x, 0, 1)``, eq. (3) without
        rounding, as in the authors' code) or ``"linear"`` (identity).
      pinned: keep ``bits`` when ``tfq.precision.set_precision`` runs.
      **kwargs: ``keras.layers.Layer`` arguments (name, dtype...).
    """

    def __init__(self, bits=32, fp_activation="relu", pinned=False, **kwargs):
        super().__init__(**kwargs)
        if fp_activation not in FP_ACTIVATIONS:
            raise ValueError(
                f"fp_activation must be one of {FP_ACTIVATIONS}; got {fp_activation!r}."
            )
        self.quantizer = qz.ActivationQuantizer(bits)
        self.fp_activation = fp_activation
        self.pinned = bool(pinned)

    @property
    def bits(self):
        """Activation bit-width (32 = full precision)."""
        return self.quantizer.bits

    @bits.setter
    def bits(self, value):
        self.quantizer.bits = value

    def call(self, inputs):
        if not self.quantizer.full_precision:
            return self.quantizer(inputs)
        if self.fp_activation == "relu":
            return ops.relu(inputs)
        if self.fp_activation == "clip":
            return ops.clip(inputs, 0.0, 1.0)
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "bits": self.bits,
            "fp_activation": self.fp_activation,
            "pinned": self.pinned,
        }


@keras.saving.register_keras_serializable(package="tfq")
class InputQuantizer(keras.layers.Layer):
    """Keeps the network input at ``bits`` (default 8) on [low, high].

    The range is nudged so zero is a level (see ``tfq.quantizers.quantize_input``),
    which makes the quantized input exactly representable by an int8 TFLite input.

    Args:
      bits: 2..8, or 32 for a pass-through.
      low: lower end of the input range.
      high: upper end of the input range.
      **kwargs: ``keras.layers.Layer`` arguments.
    """

    def __init__(self, bits=8, low=-1.0, high=1.0, **kwargs):
        super().__init__(**kwargs)
        self.bits = qz.check_bits(bits)
        if self.bits == 1:
            raise ValueError("InputQuantizer bits must be 2..8 or 32; got 1.")
        if not float(low) < 0.0 < float(high):
            raise ValueError(f"need low < 0 < high; got low={low!r}, high={high!r}.")
        self.low = float(low)
        self.high = float(high)

    def call(self, inputs):
        return qz.quantize_input(inputs, self.bits, self.low, self.high)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "bits": self.bits,
            "low": self.low,
            "high": self.high,
        }


@keras.saving.register_keras_serializable(package="tfq")
class Scalar(keras.layers.Layer):
    """The paper's learnable scalar: ``y = s * x`` with one weight ``s`` (init 0.01).

    Placed after the last FC layer, before softmax, it scales the large logits that
    [-1, 1] weights produce.

    Args:
      initial_value: the starting value of ``s``.
      **kwargs: ``keras.layers.Layer`` arguments.
    """

    def __init__(self, initial_value=0.01, **kwargs):
        super().__init__(**kwargs)
        self.initial_value = float(initial_value)

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_value),
            trainable=True,
        )

    def call(self, inputs):
        return inputs * ops.cast(self.scale, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "initial_value": self.initial_value}
