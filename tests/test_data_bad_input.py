"""tfq.data bad input (issue 4 "Bad input" and issue 7's safe loading): each case is a
``DataError`` naming the file, or, for corrupt images behind ``skip_corrupt=True``, a
counted and reported skip. Never a silently wrong label."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import tensorflow as tf

import tfq.data
from tfq.data import DataError, safe_pickle

from test_data_helpers import (WNIDS, cifar10_pickles, cifar_batch, class_tree, imagenet_shards,
                               jpeg_bytes, png_bytes, rgb, tf_example, write, write_pickle)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFQ_CACHE_DIR", str(tmp_path / "cache"))


def iterate(ds):
    return sum(int(x.shape[0]) for x, _ in ds)


def raises_while_iterating(ds, match):
    with pytest.raises(DataError, match=match):
        with tfq.data.translate_errors():
            iterate(ds)


# ----------------------------------------------------------------------------- folders


def test_missing_empty_and_malformed_folders(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nope: folder not found"):
        tfq.data.info("folder", data_dir=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no split folders"):
        tfq.data.info("folder", data_dir=str(tmp_path / "empty"))
    (tmp_path / "empty" / "train").mkdir()
    with pytest.raises(DataError, match="train: no class folders"):
        tfq.data.info("folder", data_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="data_dir is required"):
        tfq.data.info("folder")


def test_class_folder_problems_name_the_file(tmp_path):
    root = tmp_path / "d"
    class_tree(str(root), ["a", "b"], 2)
    write(str(root / "train" / "a" / ".DS_Store"), b"junk")  # ignored
    (root / "train" / "c").mkdir()
    with pytest.raises(DataError, match="train/c: class folder has no images"):
        tfq.data.info("folder", data_dir=str(root))
    write(str(root / "train" / "c" / "notes.txt"), b"hello")
    with pytest.raises(DataError, match=r"c/notes.txt: not an image file \(accepted extensions: "
                                        r"\.jpg, \.jpeg, \.png\)"):
        tfq.data.info("folder", data_dir=str(root))
    os.remove(root / "train" / "c" / "notes.txt")
    os.rmdir(root / "train" / "c")
    write(str(root / "train" / "readme.md"), b"hi")
    with pytest.raises(DataError, match="readme.md: file outside a class folder"):
        tfq.data.info("folder", data_dir=str(root))
    os.remove(root / "train" / "readme.md")
    class_tree(str(root), ["zebra"], 1, splits=("test",))
    with pytest.raises(DataError, match="test/zebra: class folder 'zebra' is not one of the 2"):
        tfq.data.info("folder", data_dir=str(root))


def _corrupt_tree(root):
    class_tree(str(root), ["a", "b", "c"], 3, splits=("train",))
    good = open(root / "train" / "a" / "0000.jpg", "rb").read()
    write(str(root / "train" / "b" / "0001.jpg"), good[: len(good) // 2])  # truncated
    write(str(root / "train" / "c" / "0002.jpg"), b"<html>not an image</html>")  # last file


def test_corrupt_images_are_errors_naming_the_file(tmp_path):
    root = tmp_path / "d"
    _corrupt_tree(root)
    ds = tfq.data.build_dataset("folder", "train", data_dir=str(root), mean="none", batch_size=2)
    raises_while_iterating(ds, "train/b/0001.jpg: cannot be read or decoded as an image")
    with pytest.raises(tf.errors.InvalidArgumentError, match="b/0001.jpg"):
        iterate(ds)  # without translate_errors: TensorFlow's error, still naming the file
    os.remove(root / "train" / "b" / "0001.jpg")
    # the last image of the epoch is checked too (the sentinel)
    ds = tfq.data.build_dataset("folder", "train", data_dir=str(root), mean="none", batch_size=2)
    raises_while_iterating(ds, "train/c/0002.jpg: cannot be read")


def test_skip_corrupt_counts_reports_and_keeps_labels(tmp_path):
    root = tmp_path / "d"
    _corrupt_tree(root)
    kwargs = dict(data_dir=str(root), mean="none", batch_size=1, skip_corrupt=True)
    x, y = zip(*[(a.numpy(), b.numpy()) for a, b in tfq.data.build_dataset("folder", "train",
                                                                          **kwargs)])
    assert list(np.concatenate(y)) == [0, 0, 0, 1, 1, 2, 2]  # labels still line up
    train = tfq.data.build_dataset("folder", "train", training=True, seed=1, **kwargs)
    lines = []
    report = tfq.data.SkippedImagesReport(train, printer=lines.append)
    for epoch in range(2):
        assert iterate(train) == 7
        logs = {}
        report.on_epoch_end(epoch, logs)
        assert logs["skipped_images"] == 2
    assert "skipped 2 unreadable image(s) in folder/train" in lines[0]
    assert "b/0001.jpg" in lines[0] and "c/0002.jpg" in lines[0]
    assert tfq.data.skip_counters(train)[0].total == 4


# ----------------------------------------------------------------------------- labels files


def _flat_val(root):
    class_tree(str(root), WNIDS, 1, splits=("train",), size=(24, 24))
    for i in range(1, 4):
        write(str(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG"), jpeg_bytes(rgb(i, (24, 24, 3))))


def test_labels_files_naming_unknown_classes_or_missing_images(tmp_path):
    _flat_val(tmp_path)
    with pytest.raises(DataError, match="flat validation folder but no labels file.*"
                                        "LOC_val_solution.csv"):
        tfq.data.info("imagenet", data_dir=str(tmp_path))
    csv = write(str(tmp_path / "val_labels.csv"),
                f"ILSVRC2012_val_00000001,{WNIDS[0]}\nILSVRC2012_val_00000002,n09999999\n".encode())
    with pytest.raises(DataError, match="val_labels.csv: line 2 names class 'n09999999', "
                                        "which is not one of the 3 classes"):
        tfq.data.info("imagenet", data_dir=str(tmp_path))
    write(csv, f"ILSVRC2012_val_00000001,{WNIDS[0]}\nILSVRC2012_val_00000002,{WNIDS[1]}\n".encode())
    with pytest.raises(DataError, match="ILSVRC2012_val_00000003.JPEG: no label for this image "
                                        "in .*val_labels.csv"):
        tfq.data.info("imagenet", data_dir=str(tmp_path))
    os.remove(csv)
    lines = write(str(tmp_path / "val_labels.txt"), f"{WNIDS[0]}\nn01234567\n{WNIDS[2]}".encode())
    with pytest.raises(DataError, match="val_labels.txt: image ILSVRC2012_val_00000002 names "
                                        "class 'n01234567'"):
        tfq.data.info("imagenet", data_dir=str(tmp_path))
    write(lines, b"1\n2\n1001\n")
    order = write(str(tmp_path / "order.txt"), "\n".join(WNIDS).encode())
    with pytest.raises(DataError, match="line 3: ID 1001 is outside 1..3"):
        tfq.data.info("imagenet", data_dir=str(tmp_path), synsets=order)
    write(order, b"n01440764\nnot-a-wnid\n")
    with pytest.raises(DataError, match="order.txt: expected one wnid"):
        tfq.data.info("imagenet", data_dir=str(tmp_path), synsets=order)
    write(lines, b"\x00" * (64 << 20) + b"x")
    with pytest.raises(DataError, match="larger than a labels file can be"):
        tfq.data.info("imagenet", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- pickles


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "cifar-10-batches-py"
    cifar10_pickles(str(tmp_path))
    write(str(folder / "data_batch_3"), pickle.dumps({b"data": Payload(), b"labels": []}))
    with pytest.raises(DataError, match="data_batch_3: not an acceptable CIFAR pickle: refusing "
                                        "global posix.system"):
        tfq.data.info("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()
    for evil in (b"cbuiltins\neval\n(S'1+1'\ntR.",
                 pickle.dumps(np.array([1, "a"], dtype=object)),
                 b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc."):
        path = write(str(tmp_path / "evil.pkl"), evil)
        with pytest.raises(DataError, match="evil.pkl"):
            safe_pickle.load(path)
    assert not marker.exists()


def test_pickles_of_the_wrong_layout(tmp_path):
    cifar10_pickles(str(tmp_path))
    folder = tmp_path / "cifar-10-batches-py"
    batch, _, labels = cifar_batch(4, 10, 1)
    cases = [
        ({**batch, b"data": batch[b"data"][:, :3000]}, r"'data' is \(4, 3000\) uint8, expected "
                                                       r"uint8 \[N, 3072\]"),
        ({**batch, b"labels": labels[:3]}, "'labels' has 3 entries for 4 images"),
        ({**batch, b"labels": [0, 1, 2, 10]}, r"'labels' holds 0..10, expected 0..9"),
        ({k: v for k, v in batch.items() if k != b"labels"}, "no 'labels' entry"),
        ([1, 2, 3], "expected a dict"),
    ]
    for obj, match in cases:
        write_pickle(str(folder / "data_batch_2"), obj)
        with pytest.raises(DataError, match="data_batch_2: " + match):
            tfq.data.info("cifar10", data_dir=str(tmp_path))
    write(str(folder / "data_batch_2"), pickle.dumps(batch)[:100])
    with pytest.raises(DataError, match="data_batch_2: not an acceptable CIFAR pickle"):
        tfq.data.info("cifar10", data_dir=str(tmp_path))
    write_pickle(str(folder / "batches.meta"), {b"label_names": [b"a", b"b"]})
    with pytest.raises(DataError, match="batches.meta: 'label_names' must be a list of 10"):
        tfq.data.info("cifar10", data_dir=str(tmp_path))
    os.remove(folder / "test_batch")
    with pytest.raises(DataError, match="test_batch: missing"):
        tfq.data.info("cifar10", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------- TFRecords


def _synsets(root):
    write(str(root / "synsets.txt"), "\n".join(WNIDS).encode())


def test_tfrecord_structure_checked_before_reading(tmp_path):
    root = tmp_path / "shards"
    imagenet_shards(str(root), "train", 2, 3)
    _synsets(root)
    os.remove(root / "train-00001-of-00002")
    with pytest.raises(DataError, match=r"incomplete train shards: found 1 of 2 \(missing e.g. \[1\]"):
        tfq.data.info("imagenet", data_dir=str(root))
    with tf.io.TFRecordWriter(str(root / "train-00001-of-00002")) as w:
        w.write(tf_example(png_bytes(rgb(0, (8, 8, 3))), synset=WNIDS[0]))  # no label
    with pytest.raises(DataError, match="train-00001-of-00002: record 0 has no int64_list "
                                        "feature 'image/class/label'"):
        tfq.data.info("imagenet", data_dir=str(root))
    data = open(root / "train-00000-of-00002", "rb").read()
    write(str(root / "train-00001-of-00002"), data[:-30])  # truncated
    with pytest.raises(DataError, match="train-00001-of-00002: record 2 at byte .* declares"):
        tfq.data.info("imagenet", data_dir=str(root))


def test_tfrecord_bad_records_named_at_iteration(tmp_path):
    root = tmp_path / "shards"
    _synsets(root)
    good = png_bytes(rgb(0, (8, 8, 3)))
    records = [tf_example(good, 1, WNIDS[0]), tf_example(good, 2, WNIDS[1]),
               tf_example(good, 0, ""), tf_example(good, synset=WNIDS[1])]
    kwargs = dict(data_dir=str(root), mean="none", image_size=8, augment="pad_crop")
    for i, match in ((2, "record 2: image/class/label 0 is outside 1..3"),
                     (3, "record 2: no feature image/class/label")):
        with tf.io.TFRecordWriter(str(root / "validation-00000-of-00001")) as w:
            for r in records[:2] + [records[i]]:
                w.write(r)
        ds = tfq.data.build_dataset("imagenet", "validation", **kwargs)
        raises_while_iterating(ds, match)
        # a wrong label is not a corrupt image: skip_corrupt does not hide it
        raises_while_iterating(tfq.data.build_dataset("imagenet", "validation",
                                                      skip_corrupt=True, **kwargs), match)


def test_corrupt_tfrecord_data_is_counted_never_dropped_silently(tmp_path):
    root = tmp_path / "shards"
    imagenet_shards(str(root), "validation", 1, 5, size=(8, 8))
    _synsets(root)
    path = root / "validation-00000-of-00001"
    data = bytearray(open(path, "rb").read())
    (length,) = struct.unpack("<Q", data[:8])
    data[2 * (length + 16) + 20] ^= 0xFF  # inside record 2's payload: its CRC fails
    write(str(path), bytes(data))
    kwargs = dict(data_dir=str(root), mean="none", image_size=8, augment="pad_crop")
    raises_while_iterating(tfq.data.build_dataset("imagenet", "validation", **kwargs),
                           "records could not be read")
    ds = tfq.data.build_dataset("imagenet", "validation", skip_corrupt=True, **kwargs)
    assert iterate(ds) == 2  # the reader stops at the bad record: 3 lost, all counted
    assert tfq.data.skip_counters(ds)[0].total == 3


# ----------------------------------------------------------------------------- idx files


def _idx(dims, payload=None, magic=None):
    header = magic or struct.pack(">HBB", 0, 8, len(dims))
    header += struct.pack(f">{len(dims)}I", *dims)
    return header + (payload if payload is not None else bytes(int(np.prod(dims))))


def test_idx_headers_checked_against_file_size(tmp_path):
    def files(images, labels, gz=False):
        for name, data in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels),
                           ("t10k-images-idx3-ubyte", _idx((2, 28, 28))),
                           ("t10k-labels-idx1-ubyte", _idx((2,)))):
            for stale in (name, name + ".gz"):
                if os.path.exists(tmp_path / stale):
                    os.remove(tmp_path / stale)
            write(str(tmp_path / (name + (".gz" if gz else ""))),
                  gzip.compress(data) if gz else data)

    def check(match):
        with pytest.raises(DataError, match=match):
            tfq.data.info("mnist", data_dir=str(tmp_path))

    files(_idx((3, 28, 28)), _idx((3,)))
    assert tfq.data.info("mnist", data_dir=str(tmp_path)).split_sizes == {"train": 3, "test": 2}
    files(_idx((3, 28, 28), magic=b"\x00\x00\x0d\x03"), _idx((3,)))
    check("train-images-idx3-ubyte: not an idx file of unsigned bytes")
    files(_idx((3, 28, 28), payload=bytes(100)), _idx((3,)))
    check(r"train-images-idx3-ubyte: header declares \(3, 28, 28\) = 2352 bytes, more than")
    files(_idx((1 << 30, 64, 64), payload=bytes(10)), _idx((3,)), gz=True)
    check(r"train-images-idx3-ubyte.gz: header declares \(1073741824, 64, 64\)")
    noise = np.random.default_rng(0).bytes(3000)  # incompressible: passes the size bound
    files(_idx((2000, 28, 28), payload=noise), _idx((3,)), gz=True)
    check(r"train-images-idx3-ubyte.gz: truncated idx data \(3000 of 1568000 bytes\)")
    files(_idx((3, 28, 28)), _idx((4,)))
    check("train-labels-idx1-ubyte: 4 labels for 3 images")
    files(_idx((3, 28, 28)), _idx((3,), payload=bytes([1, 2, 12])))
    check("train-labels-idx1-ubyte: label 12 outside 0..9")
    files(_idx((3, 28, 28)) + b"x", _idx((3,)))
    check("train-images-idx3-ubyte: header declares|trailing bytes")
    os.remove(tmp_path / "train-images-idx3-ubyte")
    check("no train images idx file")


def test_image_declaring_huge_size_is_refused_before_decoding(tmp_path):
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    root = tmp_path / "d"
    class_tree(str(root), ["a"], 2, splits=("train",))
    write(str(root / "train" / "a" / "0002.png"), bomb)  # 3.6e9 pixels: 10.8 GB if decoded
    ds = tfq.data.build_dataset("folder", "train", data_dir=str(root), mean="none")
    raises_while_iterating(ds, "a/0002.png: cannot be read or decoded")
