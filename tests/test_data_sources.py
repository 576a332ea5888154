"""tfq.data sources on small real files written by the tests: class folders (JPEG,
grayscale JPEG, PNG, CMYK JPEG), CIFAR pickles, ImageNet JPEG folders with every
validation-label format, TFRecord shards, and tfds under tfds.testing.mock_data."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import tfq.data
from tfq.data import DataError

from test_data_helpers import (WNIDS, cifar10_pickles, cifar_batch, class_tree, cmyk_jpeg_bytes,
                               imagenet_shards, jpeg_bytes, png_bytes, rgb, smooth, write,
                               write_pickle)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFQ_CACHE_DIR", str(tmp_path / "cache"))


def collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys)


def pixels(x):
    return np.round(x * 255).astype(np.int32)


# ----------------------------------------------------------------------------- folders


def test_folder_decodes_jpeg_gray_png_cmyk_to_rgb(tmp_path):
    root = tmp_path / "data"
    color = smooth(1, (24, 24, 3))
    gray = smooth(2, (24, 24, 1))
    alpha = np.concatenate([rgb(3, (24, 24, 3)), np.full((24, 24, 1), 7, np.uint8)], -1)
    soft = smooth(4, (24, 24, 3))
    write(str(root / "train" / "b_png" / "rgba.PNG"), png_bytes(alpha))
    write(str(root / "train" / "c_gray" / "g.jpeg"), jpeg_bytes(gray))
    write(str(root / "train" / "a_color" / "c.JPG"), jpeg_bytes(color))
    write(str(root / "train" / "d_cmyk" / "k.jpg"), cmyk_jpeg_bytes(soft))
    info = tfq.data.info("folder", data_dir=str(root))
    assert info.class_names == ["a_color", "b_png", "c_gray", "d_cmyk"]
    assert info.image_shape == (24, 24, 3) and info.split_sizes == {"train": 4}
    x, y = collect(tfq.data.build_dataset("folder", "train", data_dir=str(root), mean="none"))
    np.testing.assert_array_equal(y, [0, 1, 2, 3])
    assert np.abs(pixels(x[0]) - color).mean() < 3
    np.testing.assert_array_equal(pixels(x[1]), alpha[..., :3])  # PNG: exact, alpha dropped
    assert np.all(x[2][..., 0] == x[2][..., 1]) and np.all(x[2][..., 1] == x[2][..., 2])
    assert np.abs(pixels(x[2])[..., 0] - gray[..., 0]).mean() < 3
    assert np.abs(pixels(x[3]) - soft).mean() < 4  # CMYK converted back to RGB


def test_folder_resize_crop_geometry_and_eval_centre_crop(tmp_path):
    root = tmp_path / "big"
    image = rgb(4, (80, 100, 3))
    write(str(root / "train" / "x" / "a.png"), png_bytes(image))
    write(str(root / "train" / "y" / "b.png"), png_bytes(image[:, ::-1]))
    info = tfq.data.info("folder", data_dir=str(root))
    assert info.image_shape == (224, 224, 3)  # large images: the ImageNet geometry
    kwargs = dict(data_dir=str(root), image_size=48, resize=64, mean="none")
    x, y = collect(tfq.data.build_dataset("folder", "train", **kwargs))
    resized = tf.image.resize(image, (64, 80), method="bilinear").numpy()
    reference = np.clip(np.round(resized), 0, 255)[8:56, 16:64]
    assert np.abs(pixels(x[0]) - reference).max() <= 1
    xt, yt = collect(tfq.data.build_dataset("folder", "train", training=True, seed=3,
                                            batch_size=2, **kwargs))
    assert xt.shape == (2, 48, 48, 3) and sorted(yt) == [0, 1]
    full = np.clip(np.round(resized), 0, 255)
    for img, label in zip(pixels(xt), yt):
        source = full if label == 0 else np.clip(np.round(
            tf.image.resize(image[:, ::-1], (64, 80)).numpy()), 0, 255)
        windows = [source[i:i + 48, j:j + 48] for i in range(17) for j in range(33)]
        assert any(np.abs(w - img).max() <= 1 or np.abs(w[:, ::-1] - img).max() <= 1
                   for w in windows)


# ----------------------------------------------------------------------------- CIFAR pickles


def test_cifar10_pickles_exact_values_and_labels(tmp_path):
    written = cifar10_pickles(str(tmp_path))
    info = tfq.data.info("cifar10", data_dir=str(tmp_path))
    assert info.source.startswith("cifar10 pickles") and info.class_names[0] == "airplane"
    assert info.split_sizes == {"train": 30, "test": 6}
    for split in ("train", "test"):
        x, y = collect(tfq.data.build_dataset("cifar10", split, data_dir=str(tmp_path),
                                              mean="none"))
        np.testing.assert_array_equal(pixels(x), written[split][0])
        np.testing.assert_array_equal(y, written[split][1])
    mean = tfq.data.pixel_mean("cifar10", data_dir=str(tmp_path))
    np.testing.assert_allclose(mean, written["train"][0].mean(0) / 255, atol=1e-6)


def test_cifar100_fine_coarse_and_meta_order_remap(tmp_path):
    folder = tmp_path / "cifar-100-python"
    fine = [f"class_{i:03d}" for i in range(100)]
    coarse = [f"super_{i:02d}" for i in range(20)]
    fine_file = list(reversed(fine))  # a meta that is not in sorted order
    batch, images, fine_labels = cifar_batch(12, 100, 0, label_key=b"fine_labels")
    coarse_labels = [lab % 20 for lab in fine_labels]
    batch[b"coarse_labels"] = coarse_labels
    write_pickle(str(folder / "train"), batch, protocol=3)
    write_pickle(str(folder / "test"), batch, protocol=4)
    write_pickle(str(folder / "meta"), {b"fine_label_names": [n.encode() for n in fine_file],
                                        b"coarse_label_names": [n.encode() for n in coarse]})
    x, y = collect(tfq.data.build_dataset("cifar100", "test", data_dir=str(tmp_path),
                                          mean="none"))
    np.testing.assert_array_equal(pixels(x), images)
    # label i named fine_file[i] must become the index of that name in sorted order
    np.testing.assert_array_equal(y, [fine.index(fine_file[lab]) for lab in fine_labels])
    info = tfq.data.info("cifar100", data_dir=str(tmp_path), label_mode="coarse")
    assert info.num_classes == 20 and info.class_names == coarse
    _, yc = collect(tfq.data.build_dataset("cifar100", "train", data_dir=str(tmp_path),
                                           mean="none", label_mode="coarse"))
    np.testing.assert_array_equal(yc, coarse_labels)


def test_cifar_layout_detection_and_message(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py/ \\(pickles\\).*train/<class>/"
                                        ".*cifar10/<version>/ \\(tfds\\)"):
        tfq.data.info("cifar10", data_dir=str(tmp_path))
    class_tree(str(tmp_path / "wrong"), ["cat", "dog"], 1)
    with pytest.raises(DataError, match="missing: airplane.*unexpected: none"):
        tfq.data.info("cifar10", data_dir=str(tmp_path / "wrong"))
    with pytest.raises(DataError, match="layout='pickle'|layout"):
        tfq.data.info("cifar10", data_dir=str(tmp_path), layout="zip")


# ----------------------------------------------------------------------------- ImageNet JPEG


def _imagenet_tree(root, val="folders"):
    images = class_tree(str(root), WNIDS, 2, splits=("train",), size=(40, 56))
    val_images = {}
    for i in range(6):
        image = rgb(50 + i, (48, 40, 3))
        wnid = WNIDS[(i * 2) % 3]
        name = f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        path = root / "val" / (wnid if val == "folders" else "") / name
        write(str(path), jpeg_bytes(image))
        val_images[name] = (image, wnid)
    return images, val_images


def _val_labels(root, **kwargs):
    ds = tfq.data.build_dataset("imagenet", "validation", data_dir=str(root), mean="none",
                                image_size=32, **kwargs)
    return list(collect(ds)[1])


def test_imagenet_jpeg_folders_sorted_wnids(tmp_path):
    _, val = _imagenet_tree(tmp_path)
    info = tfq.data.info("imagenet", data_dir=str(tmp_path))
    assert info.class_names == sorted(WNIDS) and info.image_shape == (224, 224, 3)
    assert info.split_sizes == {"train": 6, "validation": 6}
    expected = sorted((name, WNIDS.index(w)) for name, (_, w) in val.items())
    by_folder = sorted(expected, key=lambda t: (t[1], t[0]))
    assert _val_labels(tmp_path) == [lab for _, lab in by_folder]
    x, _ = next(iter(tfq.data.build_dataset("imagenet", "test", data_dir=str(tmp_path),
                                            image_size=32, batch_size=2)))
    assert x.shape == (2, 32, 32, 3)  # "test" is accepted for "validation"


def test_imagenet_flat_val_with_csv_wnid_lines_and_ground_truth(tmp_path):
    import scipy.io

    _, val = _imagenet_tree(tmp_path, val="flat")
    names = sorted(val)
    expected = [WNIDS.index(val[n][1]) for n in names]
    # 1. CSV file,wnid with a header (Kaggle's LOC_val_solution.csv style)
    csv = "ImageId,PredictionString\n" + "".join(
        f"{n[:-5]},{val[n][1]} 1 2 3 4\n" for n in reversed(names))
    write(str(tmp_path / "LOC_val_solution.csv"), csv.encode())
    assert _val_labels(tmp_path) == expected
    os.remove(tmp_path / "LOC_val_solution.csv")
    # 2. one wnid per line (tfds's validation_labels.txt), extra lines for absent images
    lines = [val[n][1] for n in names] + [WNIDS[0]] * 3
    write(str(tmp_path / "validation_labels.txt"), "\n".join(lines).encode())
    assert _val_labels(tmp_path) == expected
    os.remove(tmp_path / "validation_labels.txt")
    # 3. the devkit ground truth: ILSVRC2012_IDs in meta.mat order (not sorted!)
    id_order = [WNIDS[2], WNIDS[0], WNIDS[1]]
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    gt = "\n".join(str(id_order.index(val[n][1]) + 1) for n in names)
    write(str(devkit / "ILSVRC2012_validation_ground_truth.txt"), gt.encode())
    with pytest.raises(DataError, match="meta.mat"):
        _val_labels(tmp_path)
    synsets = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    for i, w in enumerate(id_order + ["n00000001"]):
        synsets[i] = (i + 1, w, 0 if i < 3 else 3)
    scipy.io.savemat(str(devkit / "meta.mat"), {"synsets": synsets})
    assert _val_labels(tmp_path) == expected
    order_file = write(str(tmp_path / "order.txt"), "\n".join(id_order).encode())
    assert _val_labels(tmp_path, synsets=order_file) == expected


# ----------------------------------------------------------------------------- TFRecords


def test_imagenet_tfrecords_labels_from_one_and_synset_check(tmp_path):
    root = tmp_path / "shards"
    imagenet_shards(str(root), "train", 2, 6)
    val = imagenet_shards(str(root), "validation", 1, 4, seed=77)
    default = tfq.data.info("imagenet", data_dir=str(root))
    assert default.num_classes == 1000 and default.class_names[:3] == WNIDS  # ILSVRC-2012's
    write(str(root / "synsets.txt"), "\n".join(WNIDS).encode())
    info = tfq.data.info("imagenet", data_dir=str(root), image_size=32)
    assert info.source.startswith("imagenet TFRecord") and info.class_names == WNIDS
    assert info.split_sizes == {"train": 12, "validation": 4}
    kwargs = dict(data_dir=str(root), mean="none", augment="pad_crop", image_size=(40, 48))
    x, y = collect(tfq.data.build_dataset("imagenet", "val", **kwargs))
    np.testing.assert_array_equal(y, [lab for _, lab in val])
    np.testing.assert_array_equal(pixels(x), np.stack([im for im, _ in val]))  # PNG: exact
    xt, yt = collect(tfq.data.build_dataset("imagenet", "train", training=True, batch_size=5,
                                            data_dir=str(root), image_size=32))
    assert xt.shape == (10, 32, 32, 3) and -1 <= xt.min() and xt.max() <= 1
    # a synsets file in another order: labels are remapped to the sorted wnids
    order = [WNIDS[1], WNIDS[2], WNIDS[0]]
    write(str(root / "synsets.txt"), "\n".join(order).encode())
    with pytest.raises(DataError, match="does not match image/class/label 1 \\(which is n01443537"):
        with tfq.data.translate_errors():
            collect(tfq.data.build_dataset("imagenet", "val", **kwargs))


def test_tfrecord_holdout_and_limit_are_disjoint_and_repeatable(tmp_path):
    root = tmp_path / "shards"
    imagenet_shards(str(root), "train", 3, 7)
    write(str(root / "synsets.txt"), "\n".join(WNIDS).encode())
    kwargs = dict(data_dir=str(root), mean="none", image_size=16, augment="pad_crop")

    def fingerprint(split, **kw):
        x, y = collect(tfq.data.build_dataset("imagenet", split, **kwargs, **kw))
        return sorted((int(lab), pixels(img).tobytes()) for img, lab in zip(x, y))

    full = fingerprint("train")
    hold = fingerprint("holdout", holdout=6, seed=1)
    rest = fingerprint("train", holdout=6, seed=1)
    assert len(hold) == 6 and len(rest) == 15 and sorted(hold + rest) == full
    assert np.all(np.bincount([lab for lab, _ in hold]) == 2)
    assert hold == fingerprint("holdout", holdout=6, seed=1)
    # streams pick the first records per class in a shard order drawn from the seed
    assert len({tuple(fingerprint("holdout", holdout=6, seed=s)) for s in range(2, 5)}) > 1
    limited = fingerprint("train", holdout=6, limit=6, seed=1)
    assert len(limited) == 6 and set(limited) <= set(rest)
    unused = fingerprint("unused", holdout=6, limit=6, seed=1)
    assert len(unused) == 9 and sorted(hold + limited + unused) == full
    sizes = tfq.data.info("imagenet", holdout=6, limit=6, data_dir=str(root)).split_sizes
    assert sizes == {"train": 6, "holdout": 6, "unused": len(unused)}


# ----------------------------------------------------------------------------- tfds (mocked)


def test_tfds_sources_under_mock_data(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=10):
        info = tfq.data.info("tfds:mnist")
        assert info.image_shape == (28, 28, 3) and info.class_names[3] == "3"
        x, y = collect(tfq.data.build_dataset("tfds:mnist", "train", mean="none"))
        assert x.shape == (10, 28, 28, 3) and y.dtype == np.int32
        assert np.all(x[..., 0] == x[..., 2])  # grayscale repeated
        geometry = tfq.data.pipeline.resolve_geometry(
            tfq.data.pipeline.open_source("tfds:mnist")[0], None, {})
        assert geometry.flip is False and geometry.pad == 4  # digits: shifts, no flips
        xt, yt = collect(tfq.data.build_dataset("tfds:cifar10", "train", training=True,
                                                batch_size=4, seed=1, mean="none"))
        assert xt.shape == (8, 32, 32, 3) and 0 <= xt.min() and xt.max() <= 1
        # With an epoch variable the shuffle buffer and crops follow (seed, epoch); the
        # mock has one file, so tfds's own per-pass file order cannot interfere.
        epoch = tf.Variable(0, dtype=tf.int64)

        def keyed():
            return tfq.data.build_dataset("tfds:cifar10", "train", training=True, batch_size=5,
                                          seed=1, mean="none", shuffle_buffer=10,
                                          deterministic=True, epoch=epoch)

        first, second = [], keyed()
        ds = keyed()
        for e in range(2):
            epoch.assign(e)
            first.append(collect(ds))
        epoch.assign(1)
        np.testing.assert_array_equal(collect(second)[0], first[1][0])
        assert not np.array_equal(first[0][1], first[1][1])
        # streams take the first records per class: fewer when classes run short
        held = collect(tfq.data.build_dataset("tfds:cifar10", "holdout", holdout=3, seed=4,
                                              mean="none"))[0]
        rest = collect(tfq.data.build_dataset("tfds:cifar10", "train", holdout=3, seed=4,
                                              mean="none"))[0]
        assert 1 <= len(held) <= 3 and len(held) + len(rest) == 10
        coarse = tfq.data.info("cifar100", data_dir=str(tmp_path), layout="tfds",
                               label_mode="coarse", download=True)
        assert coarse.num_classes == 20 and coarse.source.startswith("tfds cifar100")
        x, y = collect(tfq.data.build_dataset("cifar100", "test", data_dir=str(tmp_path),
                                              layout="tfds", label_mode="coarse", mean="none",
                                              download=True))
        assert y.max() < 20
        imagenet = tfq.data.info("imagenet", data_dir=str(tmp_path), layout="tfds",
                                 download=True)
        assert imagenet.num_classes == 1000 and imagenet.class_names == sorted(
            imagenet.class_names)
        x, _ = next(iter(tfq.data.build_dataset(
            "imagenet", "validation", data_dir=str(tmp_path), layout="tfds", download=True,
            mean="none", image_size=32, batch_size=2)))
        assert x.shape == (2, 32, 32, 3)


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="not prepared.*tfds build cifar10 --data_dir=.*download=True"):
        tfq.data.info("tfds:cifar10", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="no such tensorflow-datasets dataset"):
        tfq.data.info("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
