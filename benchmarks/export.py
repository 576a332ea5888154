"""Export sizes, LiteRT latency and int8 agreement for every registered model (issue 5).

For each model in ``tfq.models.names()`` at full precision and at W8A8, W4A4, W2A2
(ImageNet models at 224x224 with 1000 classes, CIFAR ones at 32x32 with 100
classes; random weights: size and latency need no training) this prints

- float TFLite, int8 TFLite and packed sizes, and the ratios the issue sets targets
  for (int8 <= 0.27 x float; packed weights <= k/32 of the float weights + 2%);
- float and int8 latency with the LiteRT interpreter (1 thread, median of the
  timed runs after warm-up, like ``benchmark_model``) and their ratio (<= 0.3),
  with LiteRT's default XNNPACK delegate, and (columns marked *) on TFLite's
  builtin kernels without it;
- int8 vs Keras on random inputs: top-1 agreement, and for k-bit models the share
  of the last quantized activation's values on the Keras level. With random weights
  the classifier's outputs are nearly uniform, so top-1 agreement mostly measures
  ties; the level figure is the meaningful one.

BatchNorm statistics are first re-estimated on random inputs (a few training-mode
batches) so that the random network's activations are not all saturated. Every
configuration runs in its own child process (the TFLite converter leaks memory).

``--agreement`` instead trains the small digits model of ``tests/test_export.py``
(PQ chain FP -> 8 -> 7 -> ... -> 2 bits) and prints, per bit-width, the int8
agreement with Keras and with a float64 NumPy reference of the k-bit network.

Usage:
  python benchmarks/export.py [--models resnet20,alexnet_cifar] [--bits 32,8,4,2]
      [--runs 20] [--big_runs 5] [--examples 50] [--json results.json]
  python benchmarks/export.py --agreement
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = ("alexnet", "resnet50")  # 224x224 ImageNet models: fewer timed runs


def _worker(args):
    import keras
    import numpy as np

    sys.path.insert(0, ROOT)
    import tfq
    from tfq.export import export_model

    spec = tfq.models.spec(args.model)
    classes = 1000 if args.model in BIG else 100
    keras.utils.set_random_seed(0)
    model = tfq.models.build(args.model, num_classes=classes, w_bits=args.bits,
                             a_bits=args.bits)
    shape = spec.default_input_shape
    rng = np.random.default_rng(0)

    def images(n):
        return rng.uniform(-1.0, 1.0, (n,) + tuple(shape)).astype(np.float32)

    calib_batch = 4 if args.model in BIG else 32
    for _ in range(6):  # re-estimate BN statistics (momentum 0.9) on random inputs
        model(images(calib_batch), training=True)
    runs = args.big_runs if args.model in BIG else args.runs
    examples = max(args.examples // 5, 8) if args.model in BIG else args.examples
    start = time.time()
    from tfq.export import runtime

    with tempfile.TemporaryDirectory() as out:
        rep = export_model(model, out, representative_data=images(calib_batch * 2),
                           validation_data=images(examples), packed=args.bits != 32,
                           runs=runs, warmup=2, threads=1, check_edgetpu="report")
        # The same files on TFLite's builtin kernels (no XNNPACK delegate).
        iq = rep["int8"]["input_quantizer"]
        builtin = runtime.latency_compare(
            {kind: rep["files"][kind] for kind in ("float", "int8")}, runs=max(runs // 2, 3),
            warmup=1, delegates=False, input_quant=tuple(iq) if iq else None)
        builtin = {kind: v["median_ms"] for kind, v in builtin.items()}
    agree = rep.get("agreement", {})
    i8 = agree.get("int8", {})
    row = {
        "model": args.model, "bits": args.bits, "input": list(shape),
        "params": rep["model"]["num_params"], **rep["sizes"],
        "float_ms": rep["latency"]["float"]["median_ms"],
        "int8_ms": rep["latency"]["int8"]["median_ms"],
        "latency_ratio": rep["latency"]["int8_over_float"],
        "float_ms_builtin": builtin["float"], "int8_ms_builtin": builtin["int8"],
        "examples": agree.get("examples"), "int8_top1": i8.get("top1_agreement"),
        "int8_same_level": i8.get("same_level"),
        "float_top1": agree.get("float", {}).get("top1_agreement"),
        "edgetpu_compatible": rep["edgetpu"].get("compatible"),
        "edgetpu_tpu_mac_share": rep["edgetpu"].get("tpu_mac_share"),
        "exact_layers": sum(1 for layer in rep["int8"]["layers"] if layer["exact"]),
        "layers": len(rep["int8"]["layers"]),
        "seconds": time.time() - start,
    }
    print("RESULT " + json.dumps(row))


def _agreement():
    """Agreement of int8 exports of a trained small digits model, k = 8..2."""
    import keras
    import numpy as np

    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    import test_export as t  # the small model, data and float64 reference of the tests

    import tfq
    from tfq.export import evaluate, export_model, graph, int8, runtime

    keras.utils.set_random_seed(7)
    model = t.small_model(32, 32)
    t._fit(model, 4, 3e-3)
    print(f"{'bits':>4s} {'Keras acc':>9s} {'int8 top1':>9s} {'near ties':>9s} "
          f"{'level vs Keras':>14s} {'int8 vs f64':>11s} {'Keras vs f64':>12s} "
          f"{'exact ch (XNNPACK)':>18s} {'exact ch (all)':>14s}")
    for k in (8, 7, 6, 5, 4, 3, 2):
        tfq.set_precision(model, k, k)
        t._fit(model, 2, 2e-3)
        with tempfile.TemporaryDirectory() as out:
            rep = export_model(model, out, validation_data=(t.X_VAL, t.Y_VAL), runs=0,
                               check_edgetpu="report")
            a, i8 = rep["agreement"], rep["agreement"]["int8"]
            convs = [layer for layer in rep["int8"]["layers"] if layer["op"] == "CONV_2D"]
            ref = ("-", "-")
            if k <= 7:
                g = graph.lower(model)
                index, last = evaluate.last_quantized_activation(g)
                want = t.reference_levels(g, t.X_VAL, last.name)
                with open(rep["files"]["int8"], "rb") as f:
                    probe, params = evaluate.with_probe(f.read(), int8.tag(index))
                _, raws = runtime.Runner(probe, input_quant=(8, -1.0, 1.0)).predict(t.X_VAL)
                got = (raws[1].astype(np.int64) - params[1]).reshape(want.shape)
                kl = np.round(np.asarray(keras.Model(model.inputs, model.get_layer(
                    last.keras_name).output).predict(t.X_VAL, verbose=0)) * last.act.levels)
                ref = (f"{100 * np.mean(got == want):.3f}%", f"{100 * np.mean(kl == want):.3f}%")
        channels = sum(layer["channels"] for layer in convs)
        print(f"{k:>4d} {100 * a['keras_top1_accuracy']:8.2f}% {100 * i8['top1_agreement']:8.2f}% "
              f"{i8['disagreements_near_tie']:>4d}/{i8['top1_disagreements']:<4d} "
              f"{100 * i8['same_level']:13.3f}% {ref[0]:>11s} {ref[1]:>12s} "
              f"{sum(layer['exact_channels_xnnpack'] for layer in convs):>10d}/{channels:<7d} "
              f"{sum(layer['exact_channels'] for layer in convs):>6d}/{channels:<7d}", flush=True)
    print(f"({a['examples']} validation examples: the held-out digits and their one-pixel "
          "shifts)")


def _run(model, bits, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model,
           "--bits", str(bits), "--runs", str(args.runs), "--big_runs", str(args.big_runs),
           "--examples", str(args.examples)]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
    return {"model": model, "bits": bits, "error": tail}


def _fmt(row):
    if "error" in row:
        return f"{row['model']:14s} {row['bits']:>4}  FAILED: {row['error'][-200:]}"
    k = "FP" if row["bits"] == 32 else f"W{row['bits']}A{row['bits']}"
    packed = (f"{row['packed_bytes'] / 1e6:9.2f} {row['packed_over_float_weights']:6.3f}"
              if "packed_bytes" in row else f"{'-':>9s} {'-':>6s}")
    level = f"{100 * row['int8_same_level']:8.3f}" if row.get("int8_same_level") is not None \
        else f"{'-':>8s}"
    top1 = f"{100 * row['int8_top1']:7.2f}" if row.get("int8_top1") is not None else f"{'-':>7s}"
    return (f"{row['model']:14s} {k:>6s} {row['float_bytes'] / 1e6:9.2f} "
            f"{row['int8_bytes'] / 1e6:8.2f} {row['int8_over_float']:6.3f} {packed} "
            f"{row['float_ms']:9.2f} {row['int8_ms']:8.2f} {row['latency_ratio']:6.3f} "
            f"{row['float_ms_builtin']:9.2f} {row['int8_ms_builtin']:8.2f} "
            f"{row['int8_ms_builtin'] / row['float_ms_builtin']:6.3f} "
            f"{top1} {level} {row['exact_layers']:>3d}/{row['layers']:<3d} "
            f"{'yes' if row['edgetpu_compatible'] else 'no':>4s}")


HEADER = (f"{'model':14s} {'bits':>6s} {'float MB':>9s} {'int8 MB':>8s} {'ratio':>6s} "
          f"{'packed MB':>9s} {'ratio':>6s} {'float ms':>9s} {'int8 ms':>8s} {'ratio':>6s} "
          f"{'float ms*':>9s} {'int8 ms*':>8s} {'ratio*':>6s} "
          f"{'top1 %':>7s} {'level %':>8s} {'exact':>7s} {'ETPU':>4s}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None, help="comma-separated (default: all registered)")
    p.add_argument("--bits", default="32,8,4,2")
    p.add_argument("--runs", type=int, default=20, help="timed runs, 32x32 models")
    p.add_argument("--big_runs", type=int, default=5, help="timed runs, 224x224 models")
    p.add_argument("--examples", type=int, default=50, help="random inputs for agreement")
    p.add_argument("--timeout", type=int, default=3600)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--agreement", action="store_true",
                   help="int8 agreement of a trained small digits model, k = 8..2")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.bits = int(args.bits)
        _worker(args)
        return
    if args.agreement:
        _agreement()
        return
    sys.path.insert(0, ROOT)
    import tfq

    models = args.models.split(",") if args.models else tfq.models.names()
    bits = [int(b) for b in args.bits.split(",")]
    print(f"# tfq export benchmark: {platform.node()} ({platform.processor() or platform.machine()}"
          f", {os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d %H:%M')}, LiteRT 1 thread")
    print(HEADER)
    rows = []
    for model in models:
        for b in bits:
            row = _run(model, b, args)
            rows.append(row)
            print(_fmt(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
