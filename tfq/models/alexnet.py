"""AlexNet-BN (no dropout, BatchNorm after every conv and hidden FC layer).

``alexnet`` (224x224x3, the authors' ``AlexNetBN.py`` layout):

| layer | op | output (224 input) |
|---|---|---|
| conv1 | 11x11/4 conv 64, BN, act; maxpool 3x3/2 | 27x27x64 |
| conv2 | 5x5 conv 192, BN, act; maxpool 3x3/2 | 13x13x192 |
| conv3 | 3x3 conv 384, BN, act | 13x13x384 |
| conv4 | 3x3 conv 256, BN, act | 13x13x256 |
| conv5 | 3x3 conv 256, BN, act; maxpool 3x3/2 | 6x6x256 |
| fc6, fc7 | FC 4096, BN, act | 4096 |
| fc8 | FC classes, Scalar, softmax | classes |

``alexnet_cifar`` (32x32x3): the same five convs and three FCs with a stem fit for
small images: conv1 is 5x5 stride 1, the three max-pools are 3x3/2 with 'same'
padding (32 -> 16 -> 8 -> 4), and fc6/fc7 have ``fc_units`` (default 1024) units.
About 7.7M parameters and 225M multiply-adds per 32x32 image.

Guidance points (both): ``fc6_act`` and ``fc7_act``, the activations of the last two
FC layers that have one (fc8 is the classifier: its output is logits, where the
activation quantizer ``Q`` of the guidance loss has no meaning).
"""

from __future__ import annotations

import keras

from tfq.models.common import Builder
from tfq.models.registry import register

_GUIDANCE = ("fc6_act", "fc7_act")
_CONVS = (("conv3", 384), ("conv4", 256), ("conv5", 256))


def _alexnet(name, *, num_classes, input_shape, w_bits, a_bits, conv1, conv1_strides,
             pool_padding, fc_units, **options):
    b = Builder(w_bits=w_bits, a_bits=a_bits, **options)
    inputs, x = b.input(input_shape)

    def pool(x, n):
        return keras.layers.MaxPooling2D(3, 2, padding=pool_padding, name=f"pool{n}")(x)

    x = b.conv_bn_act(x, 64, conv1, strides=conv1_strides, name="conv1", first=True)
    x = pool(x, 1)
    x = b.conv_bn_act(x, 192, 5, name="conv2")
    x = pool(x, 2)
    for layer_name, filters in _CONVS:
        x = b.conv_bn_act(x, filters, 3, name=layer_name)
    x = pool(x, 5)
    x = keras.layers.Flatten(name="flatten")(x)
    x = b.dense_bn_act(x, fc_units, name="fc6")
    x = b.dense_bn_act(x, fc_units, name="fc7")
    outputs = b.classifier(x, num_classes, name="fc8")
    return keras.Model(inputs, outputs, name=name)


@register("alexnet", default_input_shape=(224, 224, 3), guidance_layers=_GUIDANCE,
          description="AlexNet-BN for 224x224 ImageNet")
def alexnet(*, num_classes, input_shape, w_bits, a_bits, fc_units=4096, **options):
    """AlexNet-BN for ImageNet. Options: ``fc_units`` (4096) plus the common ones."""
    return _alexnet("alexnet", num_classes=num_classes, input_shape=input_shape,
                    w_bits=w_bits, a_bits=a_bits, conv1=11, conv1_strides=4,
                    pool_padding="valid", fc_units=fc_units, **options)


@register("alexnet_cifar", default_input_shape=(32, 32, 3), guidance_layers=_GUIDANCE,
          description="AlexNet-BN with a stem for 32x32 images (CIFAR)")
def alexnet_cifar(*, num_classes, input_shape, w_bits, a_bits, fc_units=1024, **options):
    """AlexNet-BN for 32x32 inputs. Options: ``fc_units`` (1024) plus the common ones."""
    return _alexnet("alexnet_cifar", num_classes=num_classes, input_shape=input_shape,
                    w_bits=w_bits, a_bits=a_bits, conv1=5, conv1_strides=1,
                    pool_padding="same", fc_units=fc_units, **options)
