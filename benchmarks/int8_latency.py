"""Is int8 faster than float on this CPU? A plain small CNN, float vs standard
post-training int8 TFLite, timed with the LiteRT interpreter under each kernel set.

It checks the premise of issue 5's latency target ("plain post-training int8 of a
small CNN already reaches about 0.25x"), independently of tfq's exporter: the model
is a plain Keras CNN converted by the TFLite converter alone.

Usage: python benchmarks/int8_latency.py [--runs 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from ai_edge_litert.interpreter import Interpreter, OpResolverType  # noqa: E402


def small_cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])


def convert(model, int8):
    fn = tf.function(lambda x: model(x)).get_concrete_function(tf.TensorSpec((1, 32, 32, 3), tf.float32))
    c = tf.lite.TFLiteConverter.from_concrete_functions([fn])
    if int8:
        rng = np.random.default_rng(0)
        c.optimizations = [tf.lite.Optimize.DEFAULT]
        c.representative_dataset = lambda: ([rng.random((1, 32, 32, 3), dtype=np.float32)] for _ in range(50))
        c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        c.inference_input_type = tf.int8
        c.inference_output_type = tf.int8
    return c.convert()


def latency_ms(model, resolver, runs):
    it = Interpreter(model_content=model, num_threads=1, experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    for _ in range(20):
        it.invoke()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        it.invoke()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=200)
    args = p.parse_args()
    model = small_cnn()
    fl, q = convert(model, False), convert(model, True)
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split() if f.startswith(("avx512", "avx_vnni", "avx2"))})
    print(f"# {platform.machine()}, {os.cpu_count()} cores, SIMD: {' '.join(flags) or 'none'}, "
          f"TF {tf.__version__}, 1 thread, median of {args.runs} runs")
    print(f"{'LiteRT kernels':<34} {'float ms':>9} {'int8 ms':>9} {'int8/float':>10}")
    for name, resolver in [("AUTO (default: XNNPACK)", OpResolverType.AUTO),
                           ("BUILTIN_WITHOUT_DEFAULT_DELEGATES", OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES),
                           ("BUILTIN_REF (reference kernels)", OpResolverType.BUILTIN_REF)]:
        # Interleave: float, int8, float, int8 so drifts hit both alike.
        a = [latency_ms(fl, resolver, args.runs // 2) for _ in range(2)]
        b = [latency_ms(q, resolver, args.runs // 2) for _ in range(2)]
        a, b = float(np.mean(a)), float(np.mean(b))
        print(f"{name:<34} {a:>9.3f} {b:>9.3f} {b / a:>10.3f}")


if __name__ == "__main__":
    main()
