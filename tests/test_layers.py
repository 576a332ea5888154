"""Layer equivalence with plain Keras layers, save/load round trips, set_precision."""

import numpy as np
import keras
import pytest

import tfq
from tfq import layers as ql

from test_quantizers import np_weights


def roundtrip(model, tmp_path, x):
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.models.load_model(path)  # no custom_objects on purpose
    np.testing.assert_array_equal(model.predict(x, verbose=0), restored.predict(x, verbose=0))
    return restored


@pytest.mark.parametrize("k", [1, 2, 4, 8, 32])
def test_qconv2d_equals_conv2d_with_prequantized_kernel(k):
    x = np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype("float32")
    q = ql.QConv2D(5, 3, strides=2, padding="same", w_bits=k)
    y = q(x).numpy()
    kernel, bias = [v.numpy() for v in q.weights]
    plain = keras.layers.Conv2D(5, 3, strides=2, padding="same")
    plain.build(x.shape)
    plain.set_weights([np_weights(kernel, k) if k != 32 else kernel, bias])
    np.testing.assert_allclose(y, plain(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4, 8, 32])
def test_qdense_equals_dense_with_prequantized_kernel(k):
    x = np.random.default_rng(1).normal(size=(4, 12)).astype("float32")
    q = ql.QDense(7, w_bits=k, bias_initializer="random_normal")
    y = q(x).numpy()
    kernel, bias = [v.numpy() for v in q.weights]
    plain = keras.layers.Dense(7)
    plain.build(x.shape)
    plain.set_weights([np_weights(kernel, k) if k != 32 else kernel, bias])
    np.testing.assert_allclose(y, plain(x).numpy(), atol=1e-5)


def test_activation_at_32_bits_is_the_keras_layer():
    x = np.random.default_rng(2).normal(0, 2, size=(3, 40)).astype("float32")
    np.testing.assert_array_equal(ql.QActivation(32, "relu")(x), keras.layers.ReLU()(x))
    np.testing.assert_array_equal(
        ql.QActivation(32, "clip")(x), keras.layers.ReLU(max_value=1.0)(x)
    )
    np.testing.assert_array_equal(ql.QActivation(32, "linear")(x), x)


def test_activation_quantizes_below_32_bits():
    x = np.random.default_rng(3).normal(0.5, 1, size=(1000,)).astype("float32")
    y = ql.QActivation(2)(x).numpy()
    assert set(np.round(y * 3).astype(int)) == {0, 1, 2, 3}


def test_scalar_layer():
    s = ql.Scalar()
    x = np.ones((2, 3), "float32")
    np.testing.assert_allclose(s(x), 0.01 * x)
    assert len(s.trainable_weights) == 1 and s.trainable_weights[0].shape == ()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="1..8, or 32"):
        ql.QConv2D(4, 3, w_bits=9)
    with pytest.raises(ValueError, match="fp_activation"):
        ql.QActivation(4, fp_activation="tanh")
    with pytest.raises(ValueError, match="1..8, or 32"):
        ql.QActivation(0)


def small_model(w_bits=4, a_bits=4):
    inputs = keras.Input((8, 8, 3))
    x = ql.InputQuantizer()(inputs)
    x = ql.QConv2D(4, 3, w_bits=w_bits, pinned=True, name="first")(x)
    x = ql.QActivation(a_bits, fp_activation="clip")(x)
    x = ql.QConv2D(4, 3, w_bits=w_bits)(x)
    x = keras.layers.BatchNormalization()(x)
    x = ql.QActivation(a_bits)(x)
    x = keras.layers.Flatten()(x)
    x = ql.QDense(3, w_bits=w_bits)(x)
    return keras.Model(inputs, ql.Scalar()(x))


def test_every_layer_round_trips_through_keras_file(tmp_path):
    x = np.random.default_rng(4).uniform(-1, 1, (5, 8, 8, 3)).astype("float32")
    m = small_model()
    restored = roundtrip(m, tmp_path, x)
    assert [type(l).__name__ for l in restored.layers] == [type(l).__name__ for l in m.layers]
    assert restored.get_layer("first").pinned


def test_set_precision_changes_outputs_and_survives_save(tmp_path):
    x = np.random.default_rng(5).uniform(-1, 1, (5, 8, 8, 3)).astype("float32")
    m = small_model(32, 32)
    m.compile("sgd", "mse")
    before = m.predict(x, verbose=0)
    assert tfq.set_precision(m, w_bits=2, a_bits=2) > 0
    after = m.predict(x, verbose=0)
    assert not np.allclose(before, after)
    assert m.get_layer("first").w_bits == 32  # pinned
    assert tfq.get_precision(m) == tfq.Precision(2, 2)
    restored = roundtrip(m, tmp_path, x)
    assert tfq.get_precision(restored) == tfq.Precision(2, 2)
    tfq.set_precision(m, 32, 32)
    np.testing.assert_allclose(m.predict(x, verbose=0), before, atol=1e-6)


def test_set_precision_takes_effect_inside_fit():
    x = np.random.default_rng(6).uniform(-1, 1, (16, 8, 8, 3)).astype("float32")
    y = np.random.default_rng(6).normal(size=(16, 3)).astype("float32")
    m = small_model(32, 32)
    m.compile(keras.optimizers.SGD(0.0), "mse")  # lr 0: the weights stay put
    m.fit(x, y, epochs=1, batch_size=16, verbose=0)
    m.train_on_batch(x, y)  # traces the train function at 32 bits
    tfq.set_precision(m, 1, 1)
    # The cached 32-bit train function must be gone: the training loss is the loss of
    # the 1-bit forward pass.
    loss = m.train_on_batch(x, y)
    expected = np.mean((m(x, training=True).numpy() - y) ** 2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
