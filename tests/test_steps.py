"""A pass of unknown length trains exactly like the same pass of known length.

Keras calls the train function once more at the end of such a pass; the reference
here is Keras itself on the same batches with their length known (where it takes no
extra call), compared weight for weight, step count and logged metrics.
"""

import numpy as np
import keras
import pytest
import tensorflow as tf

import tfq
from tfq import steps

N, BATCH, EPOCHS = 96, 32, 2


def data():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (N, 8, 8, 3)).astype("float32")
    return x, np.arange(N) % 10


def batches(unknown_length):
    ds = tf.data.Dataset.from_tensor_slices(data())
    if unknown_length:  # what skipping corrupt images or cutting a stream does to the length
        ds = ds.filter(lambda x, y: True)
    return ds.batch(BATCH, drop_remainder=True)


def optimizer():
    # Decoupled weight decay is the part of a step that never reads the batch.
    return keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.05)


def trained(kind, unknown_length):
    keras.utils.set_random_seed(3)
    fp = tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3))
    if kind == "guided":
        model = tfq.GuidedModel.from_model(fp, 2, 2)
        model.compile(optimizer(), metrics=["accuracy"], fp_optimizer=optimizer())
    else:
        model = tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3),
                                 w_bits=2, a_bits=2)
        model.compile(optimizer(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        steps.guard_train_step(model)
    history = model.fit(batches(unknown_length), epochs=EPOCHS, verbose=0).history
    return model, history


@pytest.mark.parametrize("kind", ["functional", "guided"])
def test_a_pass_of_unknown_length_takes_no_step_past_its_end(kind):
    assert batches(True).cardinality() == tf.data.UNKNOWN_CARDINALITY
    known, known_history = trained(kind, unknown_length=False)
    unknown, unknown_history = trained(kind, unknown_length=True)
    for a, b in zip(known.weights, unknown.weights, strict=True):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.path)
    for name, values in known_history.items():
        np.testing.assert_allclose(unknown_history[name], values, rtol=1e-6, err_msg=name)
    assert int(unknown.optimizer.iterations) == EPOCHS * (N // BATCH)


def test_the_guard_is_not_saved_and_wraps_once(tmp_path):
    model = tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3))
    steps.guard_train_step(model)
    step = model.train_step
    assert steps.guard_train_step(model).train_step is step
    guided = tfq.GuidedModel.from_model(model, 2, 2)  # its own step already waits
    assert steps.guard_train_step(guided).train_step.__func__ is tfq.GuidedModel.train_step
    path = str(tmp_path / "m.keras")
    model.save(path)
    assert not getattr(keras.models.load_model(path).train_step, "waits_for_batch", False)


def test_length_unknown_only_where_keras_cannot_count_the_batches():
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y))

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return x[:BATCH], y[:BATCH]

    known = [x, (x, y), {"image": x}, tf.constant(x), ds.batch(BATCH), ds.repeat(), Batches()]
    unknown = [ds.filter(lambda a, b: True), ds.batch(BATCH).filter(lambda a, b: True).take(2),
               (b for b in [(x, y)]), None]
    assert [steps.length_unknown(d) for d in known] == [False] * len(known)
    assert [steps.length_unknown(d) for d in unknown] == [True] * len(unknown)


def test_a_guided_fit_waits_only_for_data_of_unknown_length_and_retraces_when_it_changes():
    keras.utils.set_random_seed(3)
    fp = tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3))
    model = tfq.GuidedModel.from_model(fp, 2, 2)
    model.compile(optimizer(), metrics=["accuracy"], fp_optimizer=optimizer())
    model.fit(*data(), batch_size=BATCH, epochs=1, verbose=0)
    assert not model.wait_for_batch  # arrays: no graph-building cost for the wait
    model.fit(batches(unknown_length=True), epochs=1, verbose=0)
    assert model.wait_for_batch
    assert int(model.optimizer.iterations) == 2 * (N // BATCH)
