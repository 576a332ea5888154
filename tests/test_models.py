"""Registry, architecture facts, save/load of every model, Keras fit/evaluate/predict."""

import numpy as np
import keras
import pytest

import tfq
from tfq import layers as ql
from tfq import models

# Exact counts (trainable) with 1000 classes (ImageNet) or 10 (CIFAR-10). ResNet-50 is
# torchvision's 25,557,032 plus the Scalar; ResNet-20 is He et al.'s 0.27M (option B).
TRAINABLE = {
    ("resnet50", 1000): 25_557_033,
    ("resnet20", 10): 272_475,
    ("alexnet", 1000): 61_110_185,
    ("alexnet_cifar", 10): 7_709_643,
}


def test_names():
    assert models.names() == ["alexnet", "alexnet_cifar", "resnet20", "resnet50"]


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="known models: alexnet, alexnet_cifar, resnet20"):
        models.build("vgg16", num_classes=10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(w_bits=9), "w_bits"),
        (dict(a_bits=2.5), "a_bits"),
        (dict(num_classes=1), "num_classes"),
        (dict(fp_activation="tanh"), "fp_activation"),
        (dict(colour="red"), "unexpected keyword"),
        (dict(input_shape=(32, 32)), "input_shape"),
    ],
)
def test_bad_build_arguments(kwargs, match):
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        models.build("resnet20", **kwargs)


@pytest.mark.parametrize("name,classes", sorted(TRAINABLE))
def test_parameter_counts(name, classes):
    m = models.build(name, num_classes=classes)
    trainable = sum(int(np.prod(v.shape)) for v in m.trainable_weights)
    assert trainable == TRAINABLE[(name, classes)]
    if name == "resnet50":
        assert round(m.count_params() / 1e6, 1) == 25.6


@pytest.mark.parametrize("name", models.names())
def test_structure(name):
    """BN before every activation, the Scalar after the last FC, 8-bit input, guidance."""
    m = models.build(name, num_classes=10, w_bits=4, a_bits=4)
    layers = m.layers
    assert isinstance(layers[1], ql.InputQuantizer) and layers[1].bits == 8
    for i, layer in enumerate(layers):
        if isinstance(layer, ql.QActivation) and not layer.name.endswith("_out"):
            assert isinstance(layers[i - 1], keras.layers.BatchNormalization), layer.name
        if isinstance(layer, (ql.QConv2D, ql.QDense)):
            assert layer.w_bits == 4
    qdense = [l for l in layers if isinstance(l, ql.QDense)]
    last = layers.index(qdense[-1])
    assert isinstance(layers[last + 1], ql.Scalar)
    for g in models.guidance_layers(m):
        assert isinstance(m.get_layer(g), ql.QActivation)
    assert tfq.get_precision(m) == tfq.Precision(4, 4)


@pytest.mark.parametrize("name", models.names())
def test_fp_first_last_pins_first_conv_and_last_fc(name):
    m = models.build(name, num_classes=10, w_bits=2, a_bits=2, fp_first_last=True)
    weighted = [l for l in m.layers if isinstance(l, (ql.QConv2D, ql.QDense))]
    assert weighted[0].w_bits == 32 and weighted[0].pinned
    assert weighted[-1].w_bits == 32 and weighted[-1].pinned
    assert all(l.w_bits == 2 and not l.pinned for l in weighted[1:-1])
    tfq.set_precision(m, w_bits=4)
    assert weighted[0].w_bits == 32 and weighted[1].w_bits == 4


@pytest.mark.parametrize("name", models.names())
def test_every_model_round_trips_after_bit_change(name, tmp_path):
    shape = models.spec(name).default_input_shape
    x = np.random.default_rng(0).uniform(-1, 1, (2,) + shape).astype("float32")
    m = models.build(name, num_classes=10)
    tfq.set_precision(m, w_bits=2, a_bits=4)
    path = tmp_path / f"{name}.keras"
    m.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(m.predict(x, verbose=0), restored.predict(x, verbose=0))
    assert tfq.get_precision(restored) == tfq.Precision(2, 4)


def test_fit_evaluate_predict_on_real_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.repeat(digits.images[..., None] / 16.0, 3, axis=-1).astype("float32")
    y = digits.target
    m = models.build("resnet20", num_classes=10, input_shape=(8, 8, 3), w_bits=4, a_bits=4)
    m.compile(keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    hist = m.fit(x[:1400], y[:1400], epochs=6, batch_size=64, verbose=0)
    assert hist.history["loss"][-1] < hist.history["loss"][0]
    _, acc = m.evaluate(x[1400:], y[1400:], verbose=0)
    assert acc > 0.4  # ten classes: chance is 0.1
    p = m.predict(x[:5], verbose=0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
