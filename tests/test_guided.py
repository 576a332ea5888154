"""GuidedModel: R against NumPy, both nets learn, freeze, gradients, save/load, fit."""

import numpy as np
import keras
import pytest
import tensorflow as tf

import tfq
from tfq import quantizers as qz
from tfq.guided import GuidedModel, guidance_loss


def np_r(mus, nus, bits, norm):
    total = 0.0
    for mu, nu, k in zip(mus, nus, bits):
        n = 2**k - 1
        q = np.floor(np.clip(mu, 0, 1) * n + 0.5) / n if k != 32 else mu
        sq = ((q - nu) ** 2).reshape(len(mu), -1)
        per = sq.sum(1) if norm == "sum" else sq.mean(1)
        total += 0.5 * per.mean()
    return total


@pytest.mark.parametrize("norm", ["sum", "mean"])
def test_guidance_loss_matches_numpy(norm):
    rng = np.random.default_rng(0)
    mus = [rng.normal(0.5, 0.6, (4, 3, 3, 5)).astype("float32"), rng.normal(0.5, 1, (4, 7)).astype("float32")]
    nus = [np.round(rng.random(m.shape) * 3) / 3 for m in mus]
    nus = [n.astype("float32") for n in nus]
    quant = [qz.ActivationQuantizer(2), None]
    got = guidance_loss(mus, nus, quant, norm).numpy()
    np.testing.assert_allclose(got, np_r(mus, nus, [2, 32], norm), rtol=1e-5)


def test_guidance_loss_rejects_unknown_norm():
    with pytest.raises(ValueError, match="mean"):
        guidance_loss([tf.zeros((1, 2))], [tf.zeros((1, 2))], [None], "l1")


def digits(n=128):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.repeat(d.images[..., None] / 16.0, 3, -1).astype("float32") * 2 - 1
    return x[:n], d.target[:n].astype("int32")


def make(freeze=False, **kw):
    fp = tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3))
    g = GuidedModel.from_model(fp, 2, 2, freeze_fp=freeze, **kw)
    g.compile(keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"])
    return g


def snapshot(model):
    return [v.numpy().copy() for v in model.weights]


def changed(before, model):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, model.weights)]


def test_losses_fall_and_both_nets_change():
    # A 2-bit net from random init barely moves in 16 steps (over 8 inits its loss changed
    # by -0.017..+0.006 and did not fall on 5, so this test was flaky); 50 steps lower it by
    # 0.06-0.09 on every seed tried, the FP net's by ~2.3. Seeded so a run is repeatable.
    keras.utils.set_random_seed(0)
    x, y = digits(64)
    g = make()
    fp0, low0 = snapshot(g.fp_net), snapshot(g.low_net)
    first = g.train_on_batch(x, y, return_dict=True)
    for _ in range(49):
        last = g.train_on_batch(x, y, return_dict=True)
    assert last["loss"] < first["loss"] and last["fp_loss"] < first["fp_loss"]
    assert all(changed(low0, g.low_net)[i] for i, v in enumerate(g.low_net.weights) if v.trainable)
    assert all(changed(fp0, g.fp_net)[i] for i, v in enumerate(g.fp_net.weights) if v.trainable)
    assert {"accuracy", "fp_accuracy", "guidance_loss", "fp_loss", "loss"} <= set(last)


def test_freeze_fp_changes_only_the_low_bit_net():
    x, y = digits(64)
    g = make(freeze=True)
    fp0, low0 = snapshot(g.fp_net), snapshot(g.low_net)
    for _ in range(3):
        g.train_on_batch(x, y)
    assert not any(changed(fp0, g.fp_net))  # weights and BatchNorm statistics
    assert any(changed(low0, g.low_net))


def test_each_net_follows_the_gradient_of_its_own_objective():
    """L1 = CE_full + lambda R moves W_full, L2 = CE_low + lambda R moves W_low."""
    x, y = digits(32)
    lam = 3.0
    g = make(guidance_weight=lam)
    g.compile(keras.optimizers.SGD(1.0), metrics=["accuracy"])  # delta = -gradient
    ce = keras.losses.SparseCategoricalCrossentropy()
    fp_taps, low_taps = g._taps
    with tf.GradientTape(persistent=True) as tape:
        fo, lo = fp_taps(x, training=True), low_taps(x, training=True)
        r = guidance_loss(fo[:-1], lo[:-1], g._quantizers(), "mean")
        l1, l2 = ce(y, fo[-1]) + lam * r, ce(y, lo[-1]) + lam * r
    fp_vars, low_vars = g.fp_net.trainable_variables, g.low_net.trainable_variables
    want_fp, want_low = tape.gradient(l1, fp_vars), tape.gradient(l2, low_vars)
    before_fp = [v.numpy().copy() for v in fp_vars]
    before_low = [v.numpy().copy() for v in low_vars]
    # The forward pass above updated BN statistics; undo nothing: they are not
    # trainable and do not enter the gradient of the next step's batch statistics.
    g.train_on_batch(x, y)
    for b, v, w in zip(before_fp, fp_vars, want_fp):
        np.testing.assert_allclose(b - v.numpy(), w.numpy(), rtol=2e-3, atol=2e-5)
    for b, v, w in zip(before_low, low_vars, want_low):
        np.testing.assert_allclose(b - v.numpy(), w.numpy(), rtol=2e-3, atol=2e-5)


def test_evaluate_predict_and_save_act_on_the_low_bit_net(tmp_path):
    x, y = digits(64)
    g = make()
    g.fit(x, y, epochs=1, batch_size=32, verbose=0)
    np.testing.assert_array_equal(g.predict(x, verbose=0), g.low_net.predict(x, verbose=0))
    g.save(tmp_path / "low.keras")
    low = keras.models.load_model(tmp_path / "low.keras")
    assert not isinstance(low, GuidedModel)
    assert tfq.get_precision(low) == tfq.Precision(2, 2)
    np.testing.assert_allclose(low.predict(x, verbose=0), g.predict(x, verbose=0), atol=1e-6)
    g.save(tmp_path / "pair.keras", with_fp=True)
    pair = keras.models.load_model(tmp_path / "pair.keras")
    assert isinstance(pair, GuidedModel) and pair.guidance_layers == g.guidance_layers
    np.testing.assert_allclose(pair.fp_net.predict(x, verbose=0), g.fp_net.predict(x, verbose=0), atol=1e-6)
    ev = g.evaluate(x, y, verbose=0, return_dict=True)
    assert {"accuracy", "fp_accuracy", "loss"} <= set(ev)


def test_fit_with_user_callbacks():
    x, y = digits(128)
    g = make()
    seen = []
    cb = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: seen.append(dict(logs)))
    hist = g.fit(x, y, epochs=2, batch_size=32, validation_split=0.25, verbose=0,
                 callbacks=[cb, keras.callbacks.EarlyStopping(patience=5)])
    assert len(seen) == 2 and "val_fp_accuracy" in seen[-1]
    assert hist.history["loss"][1] < hist.history["loss"][0]


def test_bad_construction():
    fp = tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3))
    other = tfq.models.build("alexnet_cifar", num_classes=10, input_shape=(8, 8, 3))
    with pytest.raises(ValueError, match="same architecture"):
        GuidedModel(fp, other)
    with pytest.raises(ValueError, match="not layers"):
        GuidedModel.from_model(fp, 4, 4, guidance_layers=["nope"])
    with pytest.raises(ValueError, match="guidance_norm"):
        GuidedModel.from_model(fp, 4, 4, guidance_norm="max")
