"""Activation-range calibration keeps a ReLU net's function and fits it into [0, 1]."""

import numpy as np
import keras
import pytest

import tfq
from tfq import calibration
from tfq import layers as ql


def trained_bn_stats(model, x):
    """Gives BatchNorm non-trivial moving statistics and affine parameters."""
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 3, n), rng.normal(0.5, 1, n),
                               rng.normal(0, 1, n), rng.uniform(0.5, 4, n)])
    return model


@pytest.mark.parametrize("name", ["resnet20", "alexnet_cifar"])
def test_rescaling_keeps_the_function_in_inference_and_training(name):
    x = np.random.default_rng(0).uniform(-1, 1, (16, 16, 16, 3)).astype("float32")
    def build():
        return tfq.models.build(name, num_classes=10, input_shape=(16, 16, 3), classifier_activation=None)

    m = trained_bn_stats(build(), x)
    reference = build()
    reference.set_weights(m.get_weights())
    s = calibration.calibrate_activation_range(m, x)
    assert s > 1.5  # ReLU activations of these stats reach well above 1
    # Inference first: a training-mode call updates the moving statistics.
    np.testing.assert_allclose(m(x, training=False).numpy(), reference(x, training=False).numpy(),
                               rtol=2e-4, atol=2e-4)
    acts = [l for l in m.layers if isinstance(l, ql.QActivation)]
    outs = keras.Model(m.inputs, [l.output for l in acts])(x, training=False)
    p99 = [np.percentile(o.numpy()[o.numpy() > 0], 99) for o in outs]
    assert abs(np.median(p99) - 1.0) < 1e-3  # the median layer now tops out at 1

    np.testing.assert_allclose(m(x, training=True).numpy(), reference(x, training=True).numpy(),
                               rtol=2e-4, atol=2e-4)


def test_scale_is_median_of_per_layer_percentiles_numpy():
    x = np.random.default_rng(2).uniform(-1, 1, (8, 8, 8, 3)).astype("float32")
    m = trained_bn_stats(tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3)), x)
    acts = [l for l in m.layers if isinstance(l, ql.QActivation)]
    outs = keras.Model(m.inputs, [l.output for l in acts])(x, training=False)
    want = np.median([np.percentile(o.numpy()[o.numpy() > 0], 95) for o in outs])
    assert calibration.activation_scale(m, [(x, None)], 95) == pytest.approx(want, rel=1e-6)


def test_not_applicable_models_are_left_alone():
    x = np.random.default_rng(3).uniform(-1, 1, (4, 8, 8, 3)).astype("float32")
    for m in (tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3), fp_activation="clip"),
              tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3), w_bits=4, a_bits=4)):
        before = [w.copy() for w in m.get_weights()]
        assert calibration.calibrate_activation_range(m, x) == 1.0
        assert all(np.array_equal(a, b) for a, b in zip(before, m.get_weights()))
    with pytest.raises(ValueError, match="32-bit ReLU"):
        calibration.rescale_activations(m, 2.0)
    with pytest.raises(ValueError, match="percentile"):
        calibration.activation_scale(m, x, 0)


def test_calibrated_model_still_saves_and_loads(tmp_path):
    x = np.random.default_rng(4).uniform(-1, 1, (4, 8, 8, 3)).astype("float32")
    m = trained_bn_stats(tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3)), x)
    calibration.calibrate_activation_range(m, x)
    m.save(tmp_path / "m.keras")
    r = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(r.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-6)
