"""Trains the same low-bit net on 1 device and on 2 mirrored CPU replicas; prints JSON.

Three steps on fixed batches: longer runs drift apart chaotically, because rounding
to 2-bit levels turns reduction-order differences of 1e-7 into whole-level flips.

Run as a subprocess: logical devices must be configured before TensorFlow starts.
Usage: mirrored_equivalence.py {plain|guided} {sync|local}
"""

import json
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
# On an AVX-512 CPU oneDNN rounded each replica's half batch differently from the whole
# batch, and 2-bit rounding turned that into level flips (weights 0.18 apart after 3
# steps); TensorFlow's own kernels keep the two within 1e-6 there.
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tfq  # noqa: E402
from tfq import distribute  # noqa: E402
from tfq.guided import GuidedModel  # noqa: E402

kind, bn = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
x = rng.uniform(-1, 1, (96, 8, 8, 3)).astype("float32")
y = (np.arange(96) % 10).astype("int32")


def build():
    keras.utils.set_random_seed(1)
    low = tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3), w_bits=2, a_bits=2)
    nets = [low]
    if kind == "guided":
        fp = tfq.models.build("resnet20", num_classes=10, input_shape=(8, 8, 3))
        fp.set_weights(low.get_weights())
        nets.append(fp)
    for n in nets:
        distribute.sync_batchnorm(n, bn == "sync")
    if kind == "guided":
        m = GuidedModel(nets[1], low, guidance_weight=1.0)
        m.compile(keras.optimizers.SGD(0.1, momentum=0.9))
    else:
        m = low
        m.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss="sparse_categorical_crossentropy")
    return m


def train(strategy):
    with strategy.scope():
        m = build()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)  # 3 fixed global batches
    callbacks = distribute.prepare(m, strategy, ds.element_spec)
    m.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    return m


single = train(tf.distribute.get_strategy())
mirrored_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
mirrored = train(mirrored_strategy)


def trainable_and_stats(m):
    return [v for v in m.weights if v.trainable], [v for v in m.weights if not v.trainable]


(st, sn), (mt, mn) = trainable_and_stats(single), trainable_and_stats(mirrored)
copies = [mirrored_strategy.experimental_local_results(v.value) for v in mn]
print(json.dumps({
    "replicas": mirrored_strategy.num_replicas_in_sync,
    "trainable_diff": max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(st, mt)),
    "trainable_scale": max(float(np.max(np.abs(a.numpy()))) for a in st),
    "stats_diff": max(float(np.max(np.abs(a.numpy() - b.numpy()))) for a, b in zip(sn, mn)),
    "replica_copies_diff": max(float(np.max(np.abs(c[0].numpy() - c[1].numpy()))) for c in copies),
}))
