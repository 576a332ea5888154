"""tfq.data: public API, digits, real Fashion-MNIST, real CIFAR-10 JPEGs, augmentation,
determinism, limit/holdout, the mean and its cache, skip reporting in model.fit."""

from __future__ import annotations

import gzip
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfq.data
from tfq.data import DataError

from test_data_helpers import (CIFAR_TAR, FASHION_DIR, WNIDS, extract_cifar, imagenet_shards,
                               write)

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFQ_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    if not os.path.exists(CIFAR_TAR):
        pytest.skip("shared/data/cifar10-jpeg.tar.gz not available")
    return extract_cifar(str(tmp_path_factory.mktemp("cifar")), per_class=12)


def collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def sklearn_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.round(bunch.images * 255 / 16).astype(np.uint8), bunch.target


def read_idx_reference(path, header):
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8)[header:]


# ----------------------------------------------------------------------------- API


def test_names_and_check_name():
    assert tfq.data.names() == ["cifar10", "cifar100", "digits", "fashion_mnist", "folder",
                                "imagenet", "mnist"]
    tfq.data.check_name("tfds:cifar100")
    with pytest.raises(DataError, match="known: cifar10, cifar100.*tfds:<name>"):
        tfq.data.check_name("cifar1000")
    with pytest.raises(DataError):
        tfq.data.build_dataset("tfds:", "train")


def test_bad_arguments_are_data_errors():
    with pytest.raises(DataError, match="no split 'valid'; accepted: test, train, validation"):
        tfq.data.build_dataset("digits", "valid")
    with pytest.raises(DataError, match="unknown option.*label_mod.*accepted"):
        tfq.data.info("digits", label_mod="fine")
    with pytest.raises(DataError, match="batch_size"):
        tfq.data.build_dataset("digits", "train", batch_size=0)
    with pytest.raises(DataError, match="limit"):
        tfq.data.build_dataset("digits", "train", limit=0)
    with pytest.raises(DataError, match="seed"):
        tfq.data.build_dataset("digits", "train", seed=1.5)
    with pytest.raises(DataError, match="holdout > 0"):
        tfq.data.build_dataset("digits", "holdout")
    with pytest.raises(DataError, match="augment"):
        tfq.data.info("digits", augment="mixup")
    with pytest.raises(DataError, match="resize must be an int >= 32"):
        tfq.data.info("digits", augment="resize_crop", image_size=32, resize=16)


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_fixed_and_matches_sklearn():
    info = tfq.data.info("digits", data_dir="/ignored")
    assert info.split_sizes == {"train": 1438, "test": 359}
    assert info.image_shape == (8, 8, 3) and info.num_classes == 10
    assert info.class_names == [str(i) for i in range(10)]
    images, targets = sklearn_digits()
    seen = []
    for split in ("train", "test"):
        x, y = collect(tfq.data.build_dataset("digits", split, mean="none", batch_size=512))
        assert np.all(x[..., 0] == x[..., 1]) and np.all(x[..., 0] == x[..., 2])
        pixels = np.round(x[..., 0] * 255).astype(np.uint8)
        for p, label in zip(pixels, y):
            match = np.flatnonzero((images == p).all(axis=(1, 2)) & (targets == label))
            assert len(match) >= 1  # every image is a real digit with its own label
        seen.append(y)
        counts = np.bincount(y, minlength=10)
        share = counts / counts.sum()
        assert np.all(np.abs(share - np.bincount(targets) / len(targets)) < 0.01)
    assert len(seen[0]) + len(seen[1]) == len(targets)


def test_digits_mean_and_value_range():
    x_none, y_none = collect(tfq.data.build_dataset("digits", "train", mean="none", batch_size=700))
    mean = tfq.data.pixel_mean("digits")
    assert mean.shape == (8, 8, 3) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, x_none.astype(np.float64).mean(axis=0), atol=1e-6)
    x, y = collect(tfq.data.build_dataset("digits", "train", batch_size=700))
    np.testing.assert_array_equal(y, y_none)
    np.testing.assert_allclose(x, x_none - mean, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1
    given = np.full((8, 8, 3), 0.25, np.float32)
    x2, _ = collect(tfq.data.build_dataset("digits", "train", batch_size=700, mean=given))
    np.testing.assert_allclose(x2, x_none - 0.25, atol=1e-6)


def test_digits_augmentation_shifts_without_flips():
    x0, y0 = collect(tfq.data.build_dataset("digits", "train", mean="none", limit=30,
                                            batch_size=30, seed=5))
    x, y = collect(tfq.data.build_dataset("digits", "train", mean="none", limit=30,
                                          batch_size=30, training=True, seed=5))
    assert x.shape == (30, 8, 8, 3) and sorted(y) == sorted(y0)
    padded = np.pad(x0[..., 0], ((0, 0), (1, 1), (1, 1)))
    shifts = {(dy, dx): padded[:, dy:dy + 8, dx:dx + 8] for dy in range(3) for dx in range(3)}
    used = set()
    for image, label in zip(x[..., 0], y):
        hits = [s for s, w in shifts.items()
                if np.any(np.all(np.isclose(w, image), axis=(1, 2)) & (y0 == label))]
        # Unflipped: with flips, about half would match no unflipped window.
        assert hits, "every training image is a shifted (never mirrored) original"
        used.update(hits)
    assert len(used) > 3  # several different shifts were drawn


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_matches_idx_files():
    info = tfq.data.info("fashion_mnist")
    assert info.split_sizes == {"train": 60000, "test": 10000}
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    assert info.image_shape == (28, 28, 3)
    ref_images = read_idx_reference(os.path.join(FASHION_DIR, "t10k-images-idx3-ubyte.gz"), 16)
    ref_labels = read_idx_reference(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz"), 8)
    ds = tfq.data.build_dataset("fashion_mnist", "test", mean="none", batch_size=256)
    x, y = next(iter(ds))
    np.testing.assert_array_equal(y.numpy(), ref_labels[:256])
    np.testing.assert_array_equal(np.round(x.numpy() * 255).astype(np.uint8),
                                  np.repeat(ref_images[:256 * 784].reshape(256, 28, 28, 1), 3, -1))
    mean = tfq.data.pixel_mean("fashion_mnist")
    train_ref = read_idx_reference(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"), 16)
    np.testing.assert_allclose(mean[..., 0], train_ref.reshape(-1, 28, 28).mean(0) / 255, atol=1e-5)
    xt, yt = next(iter(tfq.data.build_dataset("fashion_mnist", "train", training=True,
                                              batch_size=64, mean=mean)))
    assert xt.shape == (64, 28, 28, 3) and yt.dtype == tf.int32
    assert -1 <= float(tf.reduce_min(xt)) and float(tf.reduce_max(xt)) <= 1


# ----------------------------------------------------------------------------- real CIFAR-10


def test_real_cifar10_folder_labels_follow_sorted_class_names(cifar_dir):
    from PIL import Image

    info = tfq.data.info("folder", data_dir=cifar_dir)
    assert info.class_names == CIFAR_CLASSES
    assert info.split_sizes == {"train": 120, "test": 120}
    assert tfq.data.info("cifar10", data_dir=cifar_dir).source.startswith("cifar10 class folders")
    x, y = collect(tfq.data.build_dataset("folder", "test", data_dir=cifar_dir, mean="none",
                                          batch_size=64))
    # eval order is the sorted listing: class by class, files sorted
    files = [os.path.join(cifar_dir, "test", c, f) for c in CIFAR_CLASSES
             for f in sorted(os.listdir(os.path.join(cifar_dir, "test", c)))]
    np.testing.assert_array_equal(y, np.repeat(np.arange(10), 12))
    for i in (0, 13, 119):
        ref = np.asarray(Image.open(files[i]).convert("RGB"), np.float32) / 255
        # libjpeg settings (chroma upsampling) differ between TF and Pillow
        assert np.abs(x[i] - ref).mean() < 2 / 255 and np.abs(x[i] - ref).max() <= 12 / 255


def test_determinism_same_seed_same_batches(cifar_dir):
    def epochs(seed, deterministic=True):
        ds = tfq.data.build_dataset("folder", "train", data_dir=cifar_dir, training=True,
                                    seed=seed, deterministic=deterministic, batch_size=32)
        return [collect(ds) for _ in range(2)]

    a, b, c = epochs(3), epochs(3), epochs(4)
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], a[1][0])  # a new order / augmentation every epoch
    assert not np.array_equal(a[0][0], c[0][0])
    assert a[0][0].shape == (96, 32, 32, 3)  # 120 images, batches of 32, remainder dropped
    assert a[0][0].min() >= -1 and a[0][0].max() <= 1


@pytest.mark.parametrize("source", ["folder", "digits", "tfrecord", "tfrecord_limit"])
def test_an_epoch_variable_makes_each_pass_a_function_of_its_number(source, cifar_dir,
                                                                    tmp_path):
    """With ``epoch=`` a training pass depends on (seed, epoch) only, not on how many
    passes the dataset made before: a resumed run can replay any epoch exactly."""
    if source.startswith("tfrecord"):
        # 4 shards of 6 and a buffer of 4: the order is mostly the shard order. ImageNet's
        # random resized crops are drawn per record, pad-crops and flips per batch.
        imagenet_shards(str(tmp_path), "train", 4, 6)
        write(str(tmp_path / "synsets.txt"), "\n".join(WNIDS).encode())
        kwargs = dict(data_dir=str(tmp_path), image_size=32, shuffle_buffer=4, batch_size=8)
        plain_kw = dict(augment="pad_crop", image_size=(40, 48), pad=0, flip=False)
        if source == "tfrecord_limit":  # a selected stream: fixed read order, then shuffled
            kwargs.update(limit=12, batch_size=4)
        source = "imagenet"
    else:
        kwargs = (dict(data_dir=cifar_dir, batch_size=40) if source == "folder"
                  else dict(limit=64, batch_size=16))  # 120 / 64 examples: no partial batch
        plain_kw = dict(pad=0, flip=False)
    epoch = tf.Variable(0, dtype=tf.int64)

    def build(**kw):
        return tfq.data.build_dataset(source, "train", training=True, seed=5,
                                      deterministic=True, **{"epoch": epoch, **kwargs, **kw})

    ds, passes = build(), []
    for e in range(3):
        epoch.assign(e)
        passes.append(collect(ds))
    # The batch count stays known (Keras would otherwise call the train step once more
    # at the end of each pass; see tfq.steps),
    # except where it never was: a limited stream can hold fewer than its limit.
    batches = len(passes[0][1]) // kwargs["batch_size"]
    limited_stream = source == "imagenet" and "limit" in kwargs
    assert int(ds.cardinality()) == (tf.data.UNKNOWN_CARDINALITY if limited_stream else batches)
    fresh = build()
    for e in (2, 0, 1):
        epoch.assign(e)
        x, y = collect(fresh)
        np.testing.assert_array_equal(x, passes[e][0])
        np.testing.assert_array_equal(y, passes[e][1])
    assert not np.array_equal(passes[0][0], passes[1][0])
    assert not np.array_equal(passes[0][1], passes[1][1])  # a new order, not only new crops
    # Every example exactly once per pass: without augmentation a pass is a
    # permutation of the evaluation pipeline's images.
    def contents(xs, ys):
        return sorted((int(label), image.tobytes()) for image, label in zip(xs, ys))

    plain = build(**plain_kw)
    reference = contents(*collect(tfq.data.build_dataset(source, "train", seed=5,
                                                         **{**kwargs, **plain_kw})))
    for e in (0, 7):
        epoch.assign(e)
        assert contents(*collect(plain)) == reference
    with pytest.raises(DataError, match="scalar integer tf.Variable"):
        build(epoch=3)
    with pytest.raises(DataError, match="scalar integer tf.Variable"):
        tfq.data.build_dataset(source, "train", epoch=tf.Variable(0.0), **kwargs)


def test_keras_takes_one_step_per_batch_of_an_epoch_keyed_pipeline():
    """Keras calls the train step once more after a pass of unknown length (its
    weight decay and counts run; see tfq.steps); an epoch-keyed pipeline keeps its
    length known."""
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = tfq.data.build_dataset("digits", "train", training=True, batch_size=64, epoch=epoch)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(ds, epochs=2, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2 * (1438 // 64)


def test_cifar_augmentation_is_padded_crop_or_flip(cifar_dir):
    kwargs = dict(data_dir=cifar_dir, mean="none", limit=20, batch_size=20, seed=1)
    x0, y0 = collect(tfq.data.build_dataset("folder", "train", **kwargs))
    x, y = collect(tfq.data.build_dataset("folder", "train", training=True, **kwargs))
    padded = np.pad(x0, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = 0
    for image in x:
        found = None
        for dy in range(9):
            for dx in range(9):
                window = padded[:, dy:dy + 32, dx:dx + 32]
                for flip in (False, True):
                    w = window[:, :, ::-1] if flip else window
                    if np.any(np.all(np.abs(w - image) < 1e-6, axis=(1, 2, 3))):
                        found = flip
        assert found is not None, "not a 4-pixel shift of an original or of its mirror"
        flips += found
    assert 0 < flips < len(x)


# ----------------------------------------------------------------------------- limit / holdout


def _fingerprint(name, split, **kwargs):
    x, y = collect(tfq.data.build_dataset(name, split, mean="none", batch_size=512, **kwargs))
    return {(int(label), img.tobytes()) for img, label in zip(np.round(x * 255).astype(np.uint8), y)}


def test_limit_is_class_balanced_and_repeatable():
    a = _fingerprint("digits", "train", limit=50, seed=7)
    b = _fingerprint("digits", "train", limit=50, seed=7)
    c = _fingerprint("digits", "train", limit=50, seed=8)
    assert a == b and a != c and len(a) == 50
    assert np.all(np.bincount([lab for lab, _ in a], minlength=10) == 5)
    assert tfq.data.info("digits", limit=50).split_sizes == {"train": 50, "test": 50,
                                                             "unused": 1438 - 50}


def test_holdout_is_disjoint_from_train_and_repeatable():
    full = _fingerprint("digits", "train")
    train = _fingerprint("digits", "train", holdout=100, seed=2)
    hold = _fingerprint("digits", "holdout", holdout=100, seed=2)
    assert len(hold) == 100 and not (train & hold) and train | hold == full
    assert hold == _fingerprint("digits", "holdout", holdout=100, seed=2)
    assert np.all(np.bincount([lab for lab, _ in hold], minlength=10) == 10)
    limited = _fingerprint("digits", "train", holdout=100, limit=40, seed=2)
    assert len(limited) == 40 and limited <= train
    sizes = tfq.data.info("digits", holdout=100, limit=40).split_sizes
    assert sizes == {"train": 40, "test": 40, "holdout": 40, "unused": 1438 - 100 - 40}


def test_unused_is_every_training_image_holdout_and_limit_leave_out():
    def images(split, **kw):
        x, y = collect(tfq.data.build_dataset("digits", split, mean="none", batch_size=512, **kw))
        return [(int(lab), img.tobytes()) for img, lab in zip(np.round(x * 255).astype(np.uint8), y)]

    kw = dict(holdout=100, limit=40, seed=2)
    full, hold, train, unused = (images("train"), images("holdout", holdout=100, seed=2),
                                 images("train", **kw), images("unused", **kw))
    sizes = tfq.data.info("digits", holdout=100, limit=40).split_sizes
    assert len(unused) == len(full) - 140 == sizes["unused"]
    assert "unused" not in tfq.data.info("digits", limit=len(full)).split_sizes
    assert sorted(hold + train + unused) == sorted(full)  # a partition, duplicates included
    assert unused == images("unused", **kw)
    assert sorted(images("unused", limit=40, seed=2) + train) != sorted(full)  # holdout matters
    assert len(images("unused", limit=40, seed=2)) == len(full) - 40
    with pytest.raises(DataError, match="needs limit"):
        tfq.data.build_dataset("digits", "unused", holdout=100)
    with pytest.raises(DataError, match="'unused' is empty"):
        tfq.data.build_dataset("digits", "unused", limit=len(full))


# ----------------------------------------------------------------------------- mean cache


def test_pixel_mean_is_cached_outside_data_dir(cifar_dir, tmp_path):
    before = sorted(os.walk(cifar_dir))
    mean = tfq.data.pixel_mean("folder", data_dir=cifar_dir, max_images=50)
    x, _ = collect(tfq.data.build_dataset("folder", "train", data_dir=cifar_dir, mean="none",
                                          batch_size=128))
    assert mean.shape == (32, 32, 3) and 0 <= mean.min() and mean.max() <= 1
    assert np.abs(mean - x.mean(0)).mean() < 0.05  # a 50-image sample of 120
    cached = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache" / "means") for f in fs]
    assert len(cached) == 1
    np.save(cached[0], np.full((32, 32, 3), 0.5, np.float32))  # the cache is what is read
    assert np.all(tfq.data.pixel_mean("folder", data_dir=cifar_dir, max_images=50) == 0.5)
    assert sorted(os.walk(cifar_dir)) == before
    with pytest.raises(DataError, match="shape"):
        tfq.data.build_dataset("folder", "train", data_dir=cifar_dir, mean=np.zeros((8, 8, 3)))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        tfq.data.build_dataset("folder", "train", data_dir=cifar_dir,
                               mean=np.full((32, 32, 3), 2.0))
    with pytest.raises(DataError, match="per_pixel"):
        tfq.data.build_dataset("folder", "train", data_dir=cifar_dir, mean="global")


# ----------------------------------------------------------------------------- fit + report


def test_fit_reports_skipped_images_per_epoch(cifar_dir, tmp_path):
    root = tmp_path / "data"
    for split in ("train",):
        for c in CIFAR_CLASSES[:2]:
            src = os.path.join(cifar_dir, split, c)
            for f in sorted(os.listdir(src))[:8]:
                write(str(root / split / c / f), open(os.path.join(src, f), "rb").read())
    write(str(root / "train" / "bird" / "0000.jpg"), b"\xff\xd8\xff\xe0 truncated")
    for i in range(1, 3):
        src = os.path.join(cifar_dir, "train", "bird", sorted(os.listdir(
            os.path.join(cifar_dir, "train", "bird")))[i])
        write(str(root / "train" / "bird" / f"{i:04d}.jpg"), open(src, "rb").read())
    train = tfq.data.build_dataset("folder", "train", data_dir=str(root), training=True,
                                   batch_size=4, skip_corrupt=True, mean="none")
    lines = []
    report = tfq.data.SkippedImagesReport(train, printer=lines.append)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    history = model.fit(train, epochs=2, verbose=0, callbacks=[report])
    assert history.history["skipped_images"] == [1, 1]
    assert report.history == [(0, 1), (1, 1)]
    assert len(lines) == 2 and "bird/0000.jpg" in lines[0] and "epoch 1" in lines[0]
    assert tfq.data.skip_counters(train)[0].total == 2
    strict = tfq.data.build_dataset("folder", "train", data_dir=str(root), training=True,
                                    batch_size=4, mean="none")
    with pytest.raises(DataError, match="bird/0000.jpg: cannot be read or decoded"):
        with tfq.data.translate_errors():
            model.fit(strict, epochs=1, verbose=0)
    plain = tfq.data.build_dataset("digits", "train")
    reports = tfq.data.callbacks_for(train, plain)
    assert len(reports) == 1 and reports[0].counters == list(tfq.data.skip_counters(train))
    assert tfq.data.callbacks_for(plain) == []
    with pytest.raises(DataError, match="skip_corrupt=True"):
        tfq.data.SkippedImagesReport(tfq.data.build_dataset("digits", "train"))
