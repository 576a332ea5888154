"""Cost of a k-bit training step relative to full precision, and of a guided step.

Builds the same network at FP, 8, 4 and 2 bits (plus a guided 4-bit pair, and a
"naive" 4-bit variant whose activation quantizer is an elementwise custom-gradient
round, for reference; and the 4-bit and guided steps with and without waiting for
their batch, ``tfq.steps``), then times them interleaved, round after round, in one
process: each round runs every variant for a few steps, so drifts in machine speed
hit all variants alike. Reports the median step time and its ratio to FP. With
``--build_rounds``, also the time fresh models take to trace and build their graph
(their first two steps), with and without the wait.

Usage:
  python benchmarks/step_cost.py [--model resnet20] [--batch 128] [--rounds 8]
                                 [--build_rounds 0]
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


def guided(name, shape, wait):
    fp = tfq.models.build(name, num_classes=10, input_shape=shape)
    model = GuidedModel.from_model(fp, 4, 4)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True))
    model.wait_for_batch = wait  # what fit sets for data of unknown length
    return model


def variants(name, shape):
    """Factories of the compiled models timed, by variant name."""
    def kbit(bits):
        return lambda: compiled(tfq.models.build(name, num_classes=10, input_shape=shape,
                                                 w_bits=bits, a_bits=bits))

    out = {"FP" if bits == 32 else f"W{bits}A{bits}": kbit(bits) for bits in (32, 8, 4, 2)}
    out["W4A4 naive"] = lambda: compiled(naive_model(name, 4, shape))
    out["W4A4 guided"] = lambda: guided(name, shape, wait=False)
    # The price of tfq.steps' wait for the batch (put in only for data of unknown length).
    out["W4A4 waits"] = lambda: steps.guard_train_step(kbit(4)())
    out["guided waits"] = lambda: guided(name, shape, wait=True)
    return out


def build_times(factories, x, y, rounds):
    """Seconds of the first two ``train_on_batch`` calls of fresh models (tracing and
    graph building), variant after variant, round after round."""
    times = {k: [] for k in factories}
    for _ in range(rounds):
        for k, make in factories.items():
            model = make()
            t = time.perf_counter()
            for _ in range(2):
                model.train_on_batch(x, y)
            times[k].append(time.perf_counter() - t)
            keras.backend.clear_session()
    return {k: float(np.median(v)) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--build_rounds", type=int, default=0,
                   help="also time building the four W4A4 / guided variants (with and "
                        "without the wait) this many times each")
    args = p.parse_args()
    shape = (32, 32, 3)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch,) + shape).astype("float32")
    y = rng.integers(0, 10, args.batch)

    factories = variants(args.model, shape)
    models = {k: make() for k, make in factories.items()}
    for m in models.values():  # trace and warm up
        for _ in range(2):
            m.train_on_batch(x, y)
    times = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
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
          f"guided x{med['guided waits'] / med['W4A4 guided']:.3f}")
    if args.build_rounds:
        del models
        keras.backend.clear_session()
        names = ("W4A4", "W4A4 waits", "W4A4 guided", "guided waits")
        build = build_times({k: factories[k] for k in names}, x, y, args.build_rounds)
        print(f"\n# first two steps of a fresh model (trace + graph build), median of "
              f"{args.build_rounds}")
        print(f"{'variant':<15} {'build (s)':>10}")
        for k, v in build.items():
            print(f"{k:<15} {v:>10.2f}")
        print(f"waiting for the batch: W4A4 x{build['W4A4 waits'] / build['W4A4']:.2f}, "
              f"guided x{build['guided waits'] / build['W4A4 guided']:.2f}")


if __name__ == "__main__":
    main()
