"""Quantizers against an independent NumPy reference (levels and STE gradients)."""

import numpy as np
import pytest
import tensorflow as tf

from tfq import quantizers as qz

BITS = [1, 2, 3, 4, 8]


def np_quantize(z, k):
    n = 2**k - 1
    return np.floor(z * n + 0.5) / n


def np_weights(w, k):
    t = np.tanh(w.astype(np.float64))
    z = t / (2 * np.abs(t).max()) + 0.5
    return 2 * np_quantize(z, k) - 1


def np_weight_grad(w, c):
    """d/dw sum(c * w_q) with a straight-through round, derived by hand."""
    t = np.tanh(w.astype(np.float64)).ravel()
    c = c.astype(np.float64).ravel()
    j = np.argmax(np.abs(t))
    m, s = abs(t[j]), np.sign(t[j])
    g = 2 * c * (1 - t**2) / (2 * m)
    g[j] -= 2 * s * (1 - t[j] ** 2) * np.sum(c * t) / (2 * m**2)
    return g.reshape(w.shape)


def grad(fn, x, c=None):
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(y * (c if c is not None else 1.0))
    return y.numpy(), tape.gradient(loss, x).numpy()


def away_from_ties(x, k):
    """Moves points off rounding midpoints, where float order of operations decides."""
    n = 2**k - 1
    frac = (x * n) % 1.0
    return np.where(np.abs(frac - 0.5) < 1e-3, x + 2e-3 / n, x).astype(np.float32)


@pytest.mark.parametrize("k", BITS)
def test_quantize_levels_and_identity_gradient(k):
    z = away_from_ties(np.random.default_rng(k).random(5000).astype(np.float32), k)
    y, g = grad(lambda t: qz.quantize(t, k), z)
    np.testing.assert_allclose(y, np_quantize(z, k), atol=1e-6)
    assert len(np.unique(np.round(y * (2**k - 1)))) == 2**k
    np.testing.assert_array_equal(g, np.ones_like(z))


@pytest.mark.parametrize("k", BITS)
def test_weights_levels_and_gradient(k):
    rng = np.random.default_rng(10 + k)
    w = away_from_ties(rng.normal(0, 0.7, (3, 3, 8, 16)).astype(np.float32), k)
    c = rng.normal(size=w.shape).astype(np.float32)
    y, g = grad(lambda t: qz.quantize_weights(t, k), w, c)
    np.testing.assert_allclose(y, np_weights(w, k), atol=1e-5)
    n = 2**k - 1
    levels = np.unique(np.round(y * n).astype(int))
    # Odd multiples of 1/n in [-1, 1]: 2^k of them, zero never one.
    assert set(levels) <= set(range(-n, n + 1, 2))
    assert len(levels) == 2**k or (k == 8 and len(levels) > 200)  # sparse tails at 8 bits
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    np.testing.assert_allclose(g, np_weight_grad(w, c), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", BITS)
def test_activations_levels_and_clipped_gradient(k):
    x = np.random.default_rng(20 + k).uniform(-1, 2, 20000).astype(np.float32)
    x = away_from_ties(x[(np.abs(x) > 1e-4) & (np.abs(x - 1) > 1e-4)], k)
    y, g = grad(lambda t: qz.quantize_activations(t, k), x)
    np.testing.assert_allclose(y, np_quantize(np.clip(x, 0, 1), k), atol=1e-6)
    np.testing.assert_array_equal(g, ((x > 0) & (x < 1)).astype(np.float32))
    assert len(np.unique(np.round(y * (2**k - 1)))) == 2**k


def test_ties_round_half_up_like_tflite():
    # 0.5 on the 1-bit grid and 1/6 on the 2-bit grid are exact midpoints.
    assert qz.quantize(tf.constant(0.5), 1).numpy() == 1.0
    assert qz.quantize_activations(tf.constant(0.5), 1).numpy() == 1.0


@pytest.mark.parametrize("fn", [qz.quantize, qz.quantize_weights, qz.quantize_activations])
def test_32_bits_is_the_identity(fn):
    x = tf.constant(np.linspace(-3, 3, 50).astype(np.float32))
    assert fn(x, 32) is x


def test_zero_kernel_does_not_produce_nan():
    y = qz.quantize_weights(tf.zeros((3, 3)), 2).numpy()
    assert np.isfinite(y).all()


@pytest.mark.parametrize("bad", [0, 9, 16, 31, 33, -1, 2.5, 4.0, "4", True, False, None])
@pytest.mark.parametrize(
    "fn", [qz.quantize, qz.quantize_weights, qz.quantize_activations, qz.WeightQuantizer]
)
def test_bad_bits_rejected(fn, bad):
    with pytest.raises(ValueError, match=r"1\.\.8, or 32"):
        fn(tf.constant([0.5]), bad) if fn is not qz.WeightQuantizer else fn(bad)


def test_numpy_int_bits_accepted():
    assert qz.check_bits(np.int64(4)) == 4


@pytest.mark.parametrize("cls", [qz.UniformQuantizer, qz.WeightQuantizer, qz.ActivationQuantizer])
def test_quantizer_objects_serialize(cls):
    import keras

    q = cls(3)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(q))
    assert restored == q and restored.bits == 3
    assert qz.get(keras.saving.serialize_keras_object(q)) == q


def test_input_quantizer_is_on_an_int8_grid():
    x = tf.constant(np.random.default_rng(0).uniform(-1.2, 1.2, 1000).astype(np.float32))
    y = qz.quantize_input(x, 8).numpy()
    # TF nudges [-1, 1] so that 0 is a level: the step is 2/255.
    steps = y / (2.0 / 255)
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
    assert len(np.unique(y)) <= 256
