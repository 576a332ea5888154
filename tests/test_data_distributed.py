"""tfq.data under tf.distribute: per-replica batches with MirroredStrategy over two logical
CPUs (in a subprocess: logical devices must be set before TensorFlow starts), sharding
by InputContext, and identical limit/holdout subsets in another process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import tfq.data

from test_data_helpers import WNIDS, class_tree, imagenet_shards, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent("""
    import hashlib, json, os, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    import tfq.data

    folder = sys.argv[1]
    out = {}
    x, y = next(iter(tfq.data.build_dataset("digits", "holdout", holdout=100, seed=9,
                                            mean="none", batch_size=100)))
    out["holdout"] = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    dist = tfq.data.distributed_dataset(strategy, "folder", "train", global_batch_size=8,
                                        data_dir=folder, training=True, skip_corrupt=True, seed=1)
    shapes, steps = set(), 0
    for x, y in dist:
        for part in strategy.experimental_local_results(x):
            shapes.add(tuple(part.shape))
        steps += 1
    out["replicas"] = strategy.num_replicas_in_sync
    out["shapes"] = sorted(shapes)
    out["steps"] = steps
    with strategy.scope():
        model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten(),
                                  keras.layers.Dense(2, activation="softmax")])
        model.compile("sgd", "sparse_categorical_crossentropy")
    lines = []
    report = tfq.data.SkippedImagesReport(dist, printer=lines.append)
    history = model.fit(dist, epochs=1, verbose=0, callbacks=[report])
    out["skipped"] = history.history["skipped_images"]
    out["report"] = lines
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFQ_CACHE_DIR", str(tmp_path / "cache"))


def test_mirrored_strategy_per_replica_batches_in_subprocess(tmp_path):
    folder = tmp_path / "d"
    class_tree(str(folder), ["a", "b"], 9, splits=("train",), size=(16, 16))
    write(str(folder / "train" / "b" / "0003.jpg"), b"broken")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUDA_VISIBLE_DEVICES="-1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True,
                          text=True, env=env, timeout=300)
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stderr[-3000:]
    out = json.loads(results[0][len("RESULT "):])
    assert out["replicas"] == 2
    assert out["shapes"] == [[4, 16, 16, 3]]  # global batch 8 = 2 replicas x 4
    assert out["steps"] == 2  # 17 readable images, batches of 8, remainder dropped
    assert out["skipped"] == [1] and "b/0003.jpg" in out["report"][0]
    # the same holdout subset in another process
    x, y = next(iter(tfq.data.build_dataset("digits", "holdout", holdout=100, seed=9,
                                            mean="none", batch_size=100)))
    assert out["holdout"] == hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()


def _labels_and_pixels(ds):
    return sorted((int(lab), np.round(img * 255).astype(np.uint8).tobytes())
                  for x, y in ds for img, lab in zip(x.numpy(), y.numpy()))


@pytest.mark.parametrize("source", ["digits", "folder", "tfrecord", "tfrecord_holdout"])
def test_input_context_shards_are_disjoint_and_complete(source, tmp_path):
    kwargs = dict(mean="none", batch_size=64)
    name = "digits"
    if source == "folder":
        class_tree(str(tmp_path), ["a", "b", "c"], 4, splits=("train",), size=(8, 8))
        name, kwargs["data_dir"] = "folder", str(tmp_path)
    elif source.startswith("tfrecord"):
        imagenet_shards(str(tmp_path), "train", 4, 5, size=(8, 8))
        write(str(tmp_path / "synsets.txt"), "\n".join(WNIDS).encode())
        name = "imagenet"
        kwargs.update(data_dir=str(tmp_path), image_size=8, augment="pad_crop")
        if source == "tfrecord_holdout":
            kwargs.update(holdout=3)
    full = _labels_and_pixels(tfq.data.build_dataset(name, "train", **kwargs))
    parts = [
        _labels_and_pixels(tfq.data.build_dataset(
            name, "train", input_context=tf.distribute.InputContext(2, i, 2), **kwargs))
        for i in range(2)
    ]
    assert parts[0] and parts[1]
    assert sorted(parts[0] + parts[1]) == full
