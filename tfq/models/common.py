"""Building blocks shared by the model builders.

Every block is conv/FC -> BatchNorm -> QActivation, with stable layer names
(``<name>``, ``<name>_bn``, ``<name>_act``) that guidance and stage-to-stage weight
transfer rely on. Convolutions carry no bias: the BatchNorm that follows has one.
"""

from __future__ import annotations

import keras

from tfq import layers as qlayers

# PyTorch-like BatchNorm: a quantized stage changes activation statistics, and a
# faster moving average lets the running statistics follow within an epoch.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class Builder:
    """Carries the precision options through a builder.

    Args:
      w_bits: weight bits of every quantized layer.
      a_bits: activation bits.
      fp_first_last: the ``**`` variant: pin the first conv and the last FC at 32 bits.
      fp_activation: nonlinearity of 32-bit activation layers (``relu`` or ``clip``).
      input_bits: bits of the network input (kept at 8 in the paper).
      classifier_activation: ``"softmax"`` or None (logits).
    """

    def __init__(self, *, w_bits, a_bits, fp_first_last=False, fp_activation="relu",
                 input_bits=8, classifier_activation="softmax"):
        if fp_activation not in ("relu", "clip"):
            raise ValueError(f"fp_activation must be 'relu' or 'clip'; got {fp_activation!r}")
        if classifier_activation not in ("softmax", None):
            raise ValueError(
                f"classifier_activation must be 'softmax' or None; got {classifier_activation!r}"
            )
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.fp_first_last = bool(fp_first_last)
        self.fp_activation = fp_activation
        self.input_bits = input_bits
        self.classifier_activation = classifier_activation

    def input(self, input_shape):
        """Returns (keras.Input, the 8-bit quantized input tensor)."""
        inputs = keras.Input(shape=input_shape, name="image")
        x = qlayers.InputQuantizer(self.input_bits, name="input_quant")(inputs)
        return inputs, x

    def _weight_bits(self, pinned):
        return 32 if pinned else self.w_bits

    def act(self, x, name):
        return qlayers.QActivation(self.a_bits, fp_activation=self.fp_activation, name=name)(x)

    def bn(self, x, name):
        return keras.layers.BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name
        )(x)

    def conv_bn(self, x, filters, kernel_size, *, strides=1, name, first=False):
        """Conv -> BN (no activation), e.g. the last conv of a residual branch."""
        pinned = first and self.fp_first_last
        x = qlayers.QConv2D(
            filters, kernel_size, strides=strides, padding="same", use_bias=False,
            kernel_initializer="he_normal", w_bits=self._weight_bits(pinned),
            pinned=pinned, name=name,
        )(x)
        return self.bn(x, f"{name}_bn")

    def conv_bn_act(self, x, filters, kernel_size, *, strides=1, name, first=False):
        x = self.conv_bn(x, filters, kernel_size, strides=strides, name=name, first=first)
        return self.act(x, f"{name}_act")

    def dense_bn_act(self, x, units, *, name):
        x = qlayers.QDense(
            units, use_bias=False, kernel_initializer="he_normal",
            w_bits=self.w_bits, name=name,
        )(x)
        return self.act(self.bn(x, f"{name}_bn"), f"{name}_act")

    def classifier(self, x, num_classes, *, name):
        """Last FC (no BN, full-precision bias) -> Scalar -> softmax."""
        pinned = self.fp_first_last
        x = qlayers.QDense(
            num_classes, w_bits=self._weight_bits(pinned), pinned=pinned, name=name
        )(x)
        x = qlayers.Scalar(0.01, name="scalar")(x)
        if self.classifier_activation == "softmax":
            x = keras.layers.Activation("softmax", name="predictions")(x)
        return x
