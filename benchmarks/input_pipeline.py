"""Input pipeline speed vs training speed (issue 4): is tf.data >= 3x the training step?

Measures decoded + augmented images/s of ``tfq.data.build_dataset(..., training=True)``
at batch 128 for

- JPEG class folders: the real CIFAR-10 (``shared/data/cifar10-jpeg.tar.gz``, 50,000
  32x32 train JPEGs) extracted to a temporary folder, read by the "folder" source;
- TFRecord shards in the ``build_imagenet_data.py`` layout, written by this script from
  the same JPEG bytes, read by the "imagenet" source (``augment="pad_crop"``);

next to the training images/s of ``resnet20`` and ``alexnet_cifar`` (``tfq.models.build``,
SGD with Nesterov momentum, ``train_on_batch`` on batch 128), at full precision and at
W4A4, and prints the ratios. The machine's cores are shared by both measurements in
real training; here they are measured one after the other.

Usage:
  python benchmarks/input_pipeline.py [--batches 150] [--train_steps 8] [--tar PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tarfile
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfq  # noqa: E402
import tfq.data  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TAR = os.path.join(HERE, "..", "..", "shared", "data", "cifar10-jpeg.tar.gz")
BATCH = 128


def extract(tar_path, dest):
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and m.name.startswith("train/") and m.name.count("/") == 2]
        tar.extractall(dest, members=members, filter="data")
    return dest


def write_tfrecords(folder, dest, shards=16):
    """build_imagenet_data.py-style shards of the folder's JPEGs (labels from 1)."""
    classes = sorted(os.listdir(os.path.join(folder, "train")))
    files = [(os.path.join(folder, "train", c, f), i + 1, c)
             for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(folder, "train", c)))]
    order = np.random.default_rng(0).permutation(len(files))  # shards mix classes, as upstream
    os.makedirs(dest, exist_ok=True)
    writers = [tf.io.TFRecordWriter(os.path.join(dest, f"train-{s:05d}-of-{shards:05d}"))
               for s in range(shards)]
    for k, idx in enumerate(order):
        path, label, synset = files[idx]
        with open(path, "rb") as f:
            encoded = f.read()
        feature = {
            "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
            "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
            "image/class/synset": tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[synset.encode()])),
        }
        example = tf.train.Example(features=tf.train.Features(feature=feature))
        writers[k % shards].write(example.SerializeToString())
    for w in writers:
        w.close()
    with open(os.path.join(dest, "synsets.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    return dest


def pipeline_rate(ds, batches, warmup=10):
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    start, images = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(it)
        images += int(x.shape[0])
    return images / (time.perf_counter() - start)


def training_rate(name, bits, steps, warmup=2):
    keras.utils.set_random_seed(0)
    model = tfq.models.build(name, num_classes=10, input_shape=(32, 32, 3),
                             w_bits=bits, a_bits=bits)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                  "sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(-1, 1, (BATCH, 32, 32, 3)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 10, BATCH)
    for _ in range(warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return BATCH * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tar", default=DEFAULT_TAR)
    parser.add_argument("--batches", type=int, default=150, help="timed batches per pipeline")
    parser.add_argument("--train_steps", type=int, default=8, help="timed steps per model")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="tfq-bench-")
    try:
        t0 = time.perf_counter()
        folder = extract(args.tar, os.path.join(tmp, "cifar10"))
        shards = write_tfrecords(folder, os.path.join(tmp, "tfrecords"))
        print(f"prepared 50,000 JPEGs and 16 TFRecord shards in {time.perf_counter() - t0:.0f} s")
        mean = tfq.data.pixel_mean("folder", data_dir=folder)
        sources = {
            "JPEG folders (folder)": dict(name="folder", data_dir=folder),
            "TFRecords (imagenet)": dict(name="imagenet", data_dir=shards, image_size=32,
                                         augment="pad_crop"),
        }
        rates = {}
        for label, kw in sources.items():
            ds = tfq.data.build_dataset(kw.pop("name"), "train", training=True, batch_size=BATCH,
                                        mean=mean, seed=0, **kw)
            rates[label] = pipeline_rate(ds, args.batches)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    train = {}
    for name in ("resnet20", "alexnet_cifar"):
        for bits in (32, 4):
            train[(name, bits)] = training_rate(name, bits, args.train_steps)

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}, "
          f"batch {BATCH}")
    print("\n| input pipeline (decode + augment, training=True) | images/s |")
    print("|---|---:|")
    for label, rate in rates.items():
        print(f"| {label} | {rate:,.0f} |")
    heads = " | ".join(f"pipeline / training ({k})" for k in rates)
    print(f"\n| model (train_on_batch) | images/s | {heads} |")
    print("|---|---:|" + "---:|" * len(rates))
    for (name, bits), rate in train.items():
        ratios = " | ".join(f"{r / rate:.1f}x" for r in rates.values())
        print(f"| {name} {'FP32' if bits == 32 else f'W{bits}A{bits}'} | {rate:,.0f} | {ratios} |")
    worst = min(rates.values()) / max(train.values())
    print(f"\nslowest pipeline / fastest training step: {worst:.1f}x "
          f"({'meets' if worst >= 3 else 'MISSES'} the 3x goal)")


if __name__ == "__main__":
    main()
