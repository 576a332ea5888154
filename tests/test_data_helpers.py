"""Writers of small real datasets for the tfq.data tests (no tests here)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import tensorflow as tf
from PIL import Image

CIFAR_TAR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                         "cifar10-jpeg.tar.gz")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
WNIDS = ["n01440764", "n01443537", "n01484850"]  # the first three ILSVRC-2012 wnids


def rgb(seed, shape=(32, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth(seed, shape=(32, 32, 3)):
    """A smooth random image: JPEG keeps it within a few levels (noise would not survive
    chroma subsampling)."""
    base = np.random.default_rng(seed).uniform(0, 255, (3, 3, shape[2]))
    return np.round(tf.image.resize(base, shape[:2], method="bilinear").numpy()).astype(np.uint8)


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def jpeg_bytes(image):
    return tf.io.encode_jpeg(image, quality=95).numpy()


def png_bytes(image):
    return tf.io.encode_png(image).numpy()


def cmyk_jpeg_bytes(image):
    buf = io.BytesIO()
    Image.fromarray(image).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def class_tree(root, classes, per_class, *, splits=("train", "test"), size=(32, 32), seed=0):
    """root/<split>/<class>/<i>.jpg with solid-ish random JPEGs; returns {path: image}."""
    images = {}
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            for i in range(per_class):
                image = smooth(seed + 1000 * s + 100 * c + i, (*size, 3))
                path = write(os.path.join(root, split, name, f"{i:04d}.jpg"), jpeg_bytes(image))
                images[path] = image
    return images


def cifar_batch(n, num_classes, seed, label_key=b"labels", extra=None):
    g = np.random.default_rng(seed)
    images = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = [int(v) for v in g.integers(0, num_classes, n)]
    data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # CIFAR: channel-major rows
    batch = {b"batch_label": b"test batch", b"data": data, label_key: labels,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    batch.update(extra or {})
    return batch, images, labels


def write_pickle(path, obj, protocol=2):
    return write(path, pickle.dumps(obj, protocol=protocol))


def cifar10_pickles(root, n=6, seed=0):
    """A cifar-10-batches-py folder with small batches; returns {split: (images, labels)}."""
    folder = os.path.join(root, "cifar-10-batches-py")
    out = {"train": ([], []), "test": ([], [])}
    for i in range(1, 6):
        batch, images, labels = cifar_batch(n, 10, seed + i)
        write_pickle(os.path.join(folder, f"data_batch_{i}"), batch)
        out["train"][0].append(images)
        out["train"][1].extend(labels)
    batch, images, labels = cifar_batch(n, 10, seed + 9)
    write_pickle(os.path.join(folder, "test_batch"), batch)
    out["test"] = ([images], labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
             b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle(os.path.join(folder, "batches.meta"),
                 {b"label_names": names, b"num_cases_per_batch": n, b"num_vis": 3072})
    return {s: (np.concatenate(im), np.array(lab)) for s, (im, lab) in out.items()}


def tf_example(encoded, label=None, synset=None):
    feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded]))}
    if label is not None:
        feature["image/class/label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
    if synset is not None:
        feature["image/class/synset"] = tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[synset.encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def imagenet_shards(root, split, shards, per_shard, wnids=WNIDS, seed=0, size=(40, 48)):
    """build_imagenet_data.py-style shards; returns [(image, label index)] in file order."""
    written = []
    for s in range(shards):
        path = os.path.join(root, f"{split}-{s:05d}-of-{shards:05d}")
        os.makedirs(root, exist_ok=True)
        with tf.io.TFRecordWriter(path) as w:
            for i in range(per_shard):
                c = (s * per_shard + i) % len(wnids)
                image = rgb(seed + 100 * s + i, (*size, 3))
                w.write(tf_example(png_bytes(image), c + 1, wnids[c]))
                written.append((image, c))
    return written


def extract_cifar(dest, classes=None, per_class=None, splits=("train", "test")):
    """Extracts (part of) the real CIFAR-10 JPEG tarball into ``dest``."""
    counts = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in splits:
                continue
            if classes is not None and parts[1] not in classes:
                continue
            key = (parts[0], parts[1])
            if per_class is not None and counts.get(key, 0) >= per_class:
                continue
            counts[key] = counts.get(key, 0) + 1
            write(os.path.join(dest, member.name), tar.extractfile(member).read())
    return dest
