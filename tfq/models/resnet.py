"""ResNets with post-activation residual blocks (conv -> BN -> act, add, act).

``resnet50``: the standard ImageNet bottleneck ResNet-50 (fb.resnet.torch layout:
stride on the 3x3 conv, 1x1 projection shortcuts at the first block of each stage),
25.56M trainable parameters plus the Scalar. ``resnet20``: the CIFAR ResNet-20 of He
et al. (3 stages x 3 basic blocks, 16/32/64 channels) with 1x1 projection shortcuts
when the shape changes (option B), 0.27M parameters.

Layer names: ``stem`` for the first conv; ``stage{s}_block{b}_{i}`` for the convs of
a block, ``stage{s}_block{b}_proj`` for its shortcut, and ``stage{s}_block{b}_out``
for the block's output activation. Guidance points are the outputs of the last two
stages: ``stage2_block3_out`` / ``stage3_block3_out`` (resnet20) and
``stage3_block6_out`` / ``stage4_block3_out`` (resnet50).
"""

from __future__ import annotations

import keras

from tfq.models.common import Builder
from tfq.models.registry import register


def _block(b, x, filters, strides, name, bottleneck):
    out_filters = filters * 4 if bottleneck else filters
    shortcut = x
    if strides != 1 or x.shape[-1] != out_filters:
        shortcut = b.conv_bn(x, out_filters, 1, strides=strides, name=f"{name}_proj")
    if bottleneck:
        y = b.conv_bn_act(x, filters, 1, name=f"{name}_1")
        y = b.conv_bn_act(y, filters, 3, strides=strides, name=f"{name}_2")
        y = b.conv_bn(y, out_filters, 1, name=f"{name}_3")
    else:
        y = b.conv_bn_act(x, filters, 3, strides=strides, name=f"{name}_1")
        y = b.conv_bn(y, filters, 3, name=f"{name}_2")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return b.act(y, f"{name}_out")


def _stages(b, x, stages, bottleneck):
    for s, (filters, blocks, first_stride) in enumerate(stages, start=1):
        for i in range(1, blocks + 1):
            x = _block(b, x, filters, first_stride if i == 1 else 1,
                       f"stage{s}_block{i}", bottleneck)
    return x


def _head(b, x, num_classes):
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return b.classifier(x, num_classes, name="fc")


@register("resnet50", default_input_shape=(224, 224, 3),
          guidance_layers=("stage3_block6_out", "stage4_block3_out"),
          description="ResNet-50 for 224x224 ImageNet")
def resnet50(*, num_classes, input_shape, w_bits, a_bits, **options):
    """ImageNet ResNet-50 (common options only)."""
    b = Builder(w_bits=w_bits, a_bits=a_bits, **options)
    inputs, x = b.input(input_shape)
    x = b.conv_bn_act(x, 64, 7, strides=2, name="stem", first=True)
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)
    x = _stages(b, x, ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), True)
    return keras.Model(inputs, _head(b, x, num_classes), name="resnet50")


@register("resnet20", default_input_shape=(32, 32, 3),
          guidance_layers=("stage2_block3_out", "stage3_block3_out"),
          description="ResNet-20 for 32x32 images (CIFAR)")
def resnet20(*, num_classes, input_shape, w_bits, a_bits, **options):
    """CIFAR ResNet-20 (common options only)."""
    b = Builder(w_bits=w_bits, a_bits=a_bits, **options)
    inputs, x = b.input(input_shape)
    x = b.conv_bn_act(x, 16, 3, name="stem", first=True)
    x = _stages(b, x, ((16, 3, 1), (32, 3, 2), (64, 3, 2)), False)
    return keras.Model(inputs, _head(b, x, num_classes), name="resnet20")
