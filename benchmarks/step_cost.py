"""Cost of a k-bit training step relative to full precision, and of a guided step.

Builds the same network at FP, 8, 4 and 2 bits (plus a guided 4-bit pair, and a
"naive" 4-bit variant whose activation quantizer is an elementwise custom-gradient
round, for reference; and the 4-bit and guided steps with and without waiting for
their batch, ``tfq.steps``), then times them interleaved, round after round, in one
process: each round runs every variant for a few steps, so drifts in machine speed
hit all variants alike. Reports the median step time and its ratio to FP.

Usage:
  python benchmarks/step_cost.py [--model resnet20] [--batch 128] [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfq  # noqa: E402
from tfq import layers as ql  # noqa: E402
from tfq import steps  # noqa: E402
from tfq.guided import GuidedModel  # noqa: E402


@tf.custom_gradient
def _naive_round(x):
    return tf.round(x), lambda dy: dy


class NaiveActivation(ql.QActivation):
    """Eq. (3) as separate elementwise ops with a custom-gradient round (reference)."""

    def call(self, inputs):
        n = 2.0**self.bits - 1
        x = tf.clip_by_value(inputs, 0.0, 1.0)
        return _naive_round(x * n) / n


def naive_model(name, bits, shape):
    m = tfq.models.build(name, num_classes=10, input_shape=shape, w_bits=bits, a_bits=bits)

    def swap(layer):
        if isinstance(layer, ql.QActivation):
            return NaiveActivation.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    return keras.models.clone_model(m, clone_function=swap)


def compiled(model):
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
                  loss="sparse_categorical_crossentropy")
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    args = p.parse_args()
    shape = (32, 32, 3)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch,) + shape).astype("float32")
    y = rng.integers(0, 10, args.batch)

    variants = {}
    for bits in (32, 8, 4, 2):
        variants["FP" if bits == 32 else f"W{bits}A{bits}"] = compiled(
            tfq.models.build(args.model, num_classes=10, input_shape=shape, w_bits=bits, a_bits=bits))
    variants["W4A4 naive"] = compiled(naive_model(args.model, 4, shape))
    fp = tfq.models.build(args.model, num_classes=10, input_shape=shape)
    guided = GuidedModel.from_model(fp, 4, 4)
    guided.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True))
    variants["W4A4 guided"] = guided
    # The price of tfq.steps' guard (tfq.train puts it on every model, GuidedModel has
    # it built in): the same steps without it.
    variants["W4A4 waits"] = steps.guard_train_step(compiled(
        tfq.models.build(args.model, num_classes=10, input_shape=shape, w_bits=4, a_bits=4)))
    unguarded = GuidedModel.from_model(tfq.models.build(args.model, num_classes=10,
                                                        input_shape=shape), 4, 4)
    unguarded.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True))
    unguarded.train_step = unguarded._train_step  # the step's body, without the wait
    variants["guided no wait"] = unguarded

    for m in variants.values():  # trace and warm up
        for _ in range(2):
            m.train_on_batch(x, y)
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, m in variants.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                m.train_on_batch(x, y)
            times[k].append((time.perf_counter() - t) / args.steps)

    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"# {args.model}, 32x32x3, batch {args.batch}, {args.rounds} rounds x {args.steps} steps, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TF {tf.__version__}")
    print(f"{'variant':<15} {'step (ms)':>10} {'x FP':>7} {'x W4A4':>7}")
    for k, v in med.items():
        print(f"{k:<15} {1000 * v:>10.1f} {v / med['FP']:>7.3f} {v / med['W4A4']:>7.3f}")
    print(f"waiting for the batch: W4A4 x{med['W4A4 waits'] / med['W4A4']:.3f}, "
          f"guided x{med['W4A4 guided'] / med['guided no wait']:.3f}")


if __name__ == "__main__":
    main()
