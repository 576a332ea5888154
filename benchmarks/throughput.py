"""Training images per second: tfq at FP, 8, 4, 2 bits and guided, next to TF-MOT's 8-bit QAT.

Ours: ``tfq.models.build`` at full precision (FP), W8A8, W4A4 and W2A2, and a guided
W4A4 pair (``tfq.guided.GuidedModel``: the FP net and the 4-bit net trained jointly,
one step updating both), each compiled like ``tfq.train`` compiles a stage (SGD,
Nesterov momentum 0.9, weight decay 1e-4, accuracy metric) and stepped with
``train_on_batch`` on one fixed random batch (batch 128, 32x32x3, 10 classes). All
variants of a model live in one process and are timed interleaved: every round runs
each variant for ``--steps`` steps, round after round, so drifts in machine speed hit
all variants alike; the figure per variant is the median over rounds. Speeds are
reported as ratios to FP of the same model in the same process.

The peer: the TensorFlow Model Optimization Toolkit's default 8-bit quantization-aware
training (``tfmot.quantization.keras.quantize_model``) on the same architectures,
rebuilt layer for layer in legacy Keras 2 (``tf_keras``; ``tfq/models/resnet.py`` and
``tfq/models/alexnet.py``: same convolutions, BatchNorm momentum/epsilon, ReLU,
projection shortcuts, pools, FC widths, learnable output scalar and softmax). TF-MOT
only works with ``tf_keras``, which cannot share a process with Keras 3, so the peer
runs in a subprocess started with another virtualenv's python (``--peer_python``); it
times its FP and QAT models interleaved in the same way and reports QAT / FP, which is
set next to our W8A8 / FP. (The Scalar layer, unknown to TF-MOT, is annotated with a
no-op quantize config; everything else gets TF-MOT's default 8-bit scheme.)

Recreate the peer virtualenv (it is not part of the project's requirements.txt)::

  python3 -m venv /work/venv-tfmot
  /work/venv-tfmot/bin/pip install tensorflow==2.21.0 tf-keras==2.21.0 \\
      tensorflow-model-optimization==0.8.1 numpy

Usage::

  python benchmarks/throughput.py [--models resnet20,alexnet_cifar] [--rounds 5]
      [--steps 2] [--peer_python /work/venv-tfmot/bin/python | --no_peer]
      [--json runs/throughput.json]

The JSON file (images/s per variant and model) is what ``benchmarks/ablation.py
--dry_run`` reads to estimate the compute of an ablation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import numpy as np  # noqa: E402  (the only import shared with the peer virtualenv)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_PEER_PYTHON = "/work/venv-tfmot/bin/python"
MODELS = ("resnet20", "alexnet_cifar")
SHAPE = (32, 32, 3)
NUM_CLASSES = 10
# The optimizer every measured model is compiled with (tfq.train's stage optimizer).
LR, MOMENTUM, WEIGHT_DECAY = 1e-3, 0.9, 1e-4
PEER_FP, PEER_QAT = "tfmot FP", "tfmot QAT W8A8"


# ------------------------------------------------------------------ shared timing


def fixed_batch(batch):
    """One random batch in the models' input convention ([-1, 1]) and its labels."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch,) + SHAPE).astype("float32")
    y = rng.integers(0, NUM_CLASSES, batch).astype("int32")
    return x, y


def time_interleaved(variants, x, y, *, rounds, steps, warmup=2):
    """Median seconds per ``train_on_batch`` step of each variant, timed round-robin.

    Args:
      variants: name -> compiled model.
      x, y: the batch every step trains on.
      rounds: rounds; each round runs every variant for ``steps`` steps.
      steps: steps per variant per round.
      warmup: untimed steps per variant first (tracing, first-call allocations).

    Returns:
      name -> {"step_s": median, "min_s", "max_s", "rounds": per-round seconds/step}.
    """
    for model in variants.values():
        for _ in range(warmup):
            model.train_on_batch(x, y)
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, model in variants.items():
            t = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(x, y)
            times[name].append((time.perf_counter() - t) / steps)
    return {name: {"step_s": float(np.median(ts)), "min_s": float(min(ts)),
                   "max_s": float(max(ts)), "rounds": [float(t) for t in ts]}
            for name, ts in times.items()}


def add_rates(stats, batch, reference):
    """Adds images/s (from the median step) and the speed ratio to ``reference``.

    The ratio is paired by round: the median over rounds of (reference's step time in
    that round / this variant's step time in that round), so a slow spell of the
    machine, which hits both within a round, cancels out.
    """
    ref = stats[reference]["rounds"]
    for s in stats.values():
        s["images_per_s"] = batch / s["step_s"]
        s["vs_" + reference.replace(" ", "_")] = float(np.median(
            [r / t for r, t in zip(ref, s["rounds"])]))
    return stats


# ------------------------------------------------------------------ ours (Keras 3)


def our_variants(model_name):
    """Compiled tfq models: FP, W8A8, W4A4, W2A2 and a guided W4A4 pair."""
    import keras

    import tfq
    from tfq.guided import GuidedModel

    def sgd():
        return keras.optimizers.SGD(LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)

    def build(bits):
        return tfq.models.build(model_name, num_classes=NUM_CLASSES, input_shape=SHAPE,
                                w_bits=bits, a_bits=bits)

    variants = {}
    for bits in (32, 8, 4, 2):
        m = build(bits)
        m.compile(sgd(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        variants["FP" if bits == 32 else f"W{bits}A{bits}"] = m
    guided = GuidedModel.from_model(build(32), 4, 4)
    guided.compile(sgd(), metrics=["accuracy"], fp_optimizer=sgd())
    variants["guided W4A4"] = guided
    return variants


def measure_ours(model_name, batch, rounds, steps):
    """Interleaved timings of ``our_variants`` (see ``time_interleaved``), with rates."""
    x, y = fixed_batch(batch)
    stats = time_interleaved(our_variants(model_name), x, y, rounds=rounds, steps=steps)
    return add_rates(stats, batch, "FP")


# ------------------------------------------------------------------ the peer (tf_keras)
# Everything below runs only inside the peer virtualenv's python (--peer_worker).


def _peer_layers():
    """tf_keras, tfmot and the Scalar layer + its no-op quantize config."""
    import tensorflow_model_optimization as tfmot
    import tf_keras

    class Scalar(tf_keras.layers.Layer):
        """One trainable weight multiplying the logits (tfq.layers.Scalar), init 0.01."""

        def build(self, input_shape):
            self.scale = self.add_weight(name="scale", shape=(),
                                         initializer=tf_keras.initializers.Constant(0.01))

        def call(self, inputs):
            return inputs * self.scale

    class NoOpQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):
        """Leaves the Scalar unquantized (a 1-weight multiply TF-MOT does not know)."""

        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {}

    return tf_keras, tfmot, Scalar, NoOpQuantizeConfig


class _PeerBuilder:
    """tf_keras twin of ``tfq.models.common.Builder`` at full precision (ReLU)."""

    def __init__(self, tf_keras, scalar_cls):
        self.k = tf_keras
        self.scalar_cls = scalar_cls

    def bn(self, x, name):
        return self.k.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x)

    def act(self, x, name):
        return self.k.layers.ReLU(name=name)(x)

    def conv_bn(self, x, filters, kernel, *, strides=1, name):
        x = self.k.layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False,
                                 kernel_initializer="he_normal", name=name)(x)
        return self.bn(x, f"{name}_bn")

    def conv_bn_act(self, x, filters, kernel, *, strides=1, name):
        return self.act(self.conv_bn(x, filters, kernel, strides=strides, name=name), f"{name}_act")

    def dense_bn_act(self, x, units, *, name):
        x = self.k.layers.Dense(units, use_bias=False, kernel_initializer="he_normal", name=name)(x)
        return self.act(self.bn(x, f"{name}_bn"), f"{name}_act")

    def classifier(self, x, num_classes, *, name):
        x = self.k.layers.Dense(num_classes, name=name)(x)
        x = self.scalar_cls(name="scalar")(x)
        return self.k.layers.Activation("softmax", name="predictions")(x)


def peer_resnet20(b, inputs):
    """ResNet-20 as in tfq/models/resnet.py (post-activation, 1x1 projection shortcuts)."""
    x = b.conv_bn_act(inputs, 16, 3, name="stem")
    for s, (filters, first_stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
        for i in range(1, 4):
            name, strides = f"stage{s}_block{i}", first_stride if i == 1 else 1
            shortcut = x
            if strides != 1 or x.shape[-1] != filters:
                shortcut = b.conv_bn(x, filters, 1, strides=strides, name=f"{name}_proj")
            y = b.conv_bn_act(x, filters, 3, strides=strides, name=f"{name}_1")
            y = b.conv_bn(y, filters, 3, name=f"{name}_2")
            x = b.act(b.k.layers.Add(name=f"{name}_add")([y, shortcut]), f"{name}_out")
    x = b.k.layers.GlobalAveragePooling2D(name="pool")(x)
    return b.classifier(x, NUM_CLASSES, name="fc")


def peer_alexnet_cifar(b, inputs):
    """AlexNet-BN with the 32x32 stem of tfq/models/alexnet.py (fc_units 1024)."""
    def pool(x, n):
        return b.k.layers.MaxPooling2D(3, 2, padding="same", name=f"pool{n}")(x)

    x = pool(b.conv_bn_act(inputs, 64, 5, name="conv1"), 1)
    x = pool(b.conv_bn_act(x, 192, 5, name="conv2"), 2)
    for name, filters in (("conv3", 384), ("conv4", 256), ("conv5", 256)):
        x = b.conv_bn_act(x, filters, 3, name=name)
    x = b.k.layers.Flatten(name="flatten")(pool(x, 5))
    x = b.dense_bn_act(x, 1024, name="fc6")
    x = b.dense_bn_act(x, 1024, name="fc7")
    return b.classifier(x, NUM_CLASSES, name="fc8")


PEER_BUILDERS = {"resnet20": peer_resnet20, "alexnet_cifar": peer_alexnet_cifar}


def peer_variants(model_name):
    """The tf_keras FP model and its TF-MOT 8-bit QAT version, compiled."""
    tf_keras, tfmot, scalar_cls, noop = _peer_layers()
    qk = tfmot.quantization.keras

    def build():
        inputs = tf_keras.Input(SHAPE, name="image")
        outputs = PEER_BUILDERS[model_name](_PeerBuilder(tf_keras, scalar_cls), inputs)
        return tf_keras.Model(inputs, outputs, name=model_name)

    def annotate(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        return qk.quantize_annotate_layer(fresh, noop()) if isinstance(layer, scalar_cls) else fresh

    def sgd():
        return tf_keras.optimizers.SGD(LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)

    fp = build()
    annotated = qk.quantize_annotate_model(tf_keras.models.clone_model(fp, clone_function=annotate))
    with qk.quantize_scope({"Scalar": scalar_cls, "NoOpQuantizeConfig": noop}):
        qat = qk.quantize_apply(annotated)
    for m in (fp, qat):
        m.compile(sgd(), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return {PEER_FP: fp, PEER_QAT: qat}


def peer_worker(args):
    """Entry point inside the peer virtualenv: prints one JSON line with the timings."""
    import tensorflow as tf

    out = {"tensorflow": tf.__version__}
    import tf_keras
    import tensorflow_model_optimization as tfmot

    out.update(tf_keras=tf_keras.__version__, tfmot=tfmot.__version__, models={})
    x, y = fixed_batch(args.batch)
    for name in args.models:
        stats = time_interleaved(peer_variants(name), x, y, rounds=args.rounds, steps=args.steps)
        out["models"][name] = add_rates(stats, args.batch, PEER_FP)
        tf_keras.backend.clear_session()
    print("PEER_JSON " + json.dumps(out), flush=True)


def check_peer_python(peer_python):
    """Raises FileNotFoundError, saying how to make it, if the peer's python is missing."""
    if not os.path.exists(peer_python):
        raise FileNotFoundError(
            f"--peer_python {peer_python!r} does not exist. Create the peer virtualenv with:\n"
            "  python3 -m venv /work/venv-tfmot\n"
            "  /work/venv-tfmot/bin/pip install tensorflow==2.21.0 tf-keras==2.21.0 "
            "tensorflow-model-optimization==0.8.1 numpy\n"
            "or pass --no_peer."
        )


def measure_peer(peer_python, models, batch, rounds, steps):
    """Runs ``peer_worker`` with ``peer_python``; returns its JSON dict.

    Raises:
      FileNotFoundError: ``peer_python`` does not exist (the message says how to make it).
      RuntimeError: the peer process failed (the message holds its stderr tail).
    """
    check_peer_python(peer_python)
    # TF_USE_LEGACY_KERAS makes tf.keras (which TF-MOT uses inside) tf_keras too.
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "-1")}
    env.pop("PYTHONPATH", None)  # never let the peer import this project's Keras 3 code
    cmd = [peer_python, os.path.abspath(__file__), "--peer_worker", "--models", ",".join(models),
           "--batch", str(batch), "--rounds", str(rounds), "--steps", str(steps)]
    r = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("PEER_JSON ")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"peer process failed (exit {r.returncode}): {' '.join(cmd)}\n"
                           f"{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("PEER_JSON "):])


# ------------------------------------------------------------------ report


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def format_table(model_name, ours, peer, batch):
    """One model's table: our variants, then the peer's, with speed ratios."""
    head = f"{'variant':<18} {'step (ms)':>10} {'min..max (ms)':>15} {'images/s':>9} {'x FP':>6}"
    rows = [f"## {model_name}, batch {batch}, 32x32x3", head, "-" * len(head)]

    def row(name, s, ratio):
        spread = f"{1000 * s['min_s']:.0f}..{1000 * s['max_s']:.0f}"
        rows.append(f"{name:<18} {1000 * s['step_s']:>10.1f} {spread:>15} "
                    f"{s['images_per_s']:>9.1f} {ratio:>6.2f}")

    for name, s in ours.items():
        row(f"tfq {name}", s, s["vs_FP"])
    if peer:
        for name, s in peer.items():
            row(name, s, s["vs_" + PEER_FP.replace(" ", "_")])
        rows.append(f"8-bit training cost vs FP, each in its own framework: tfq W8A8 "
                    f"{ours['W8A8']['vs_FP']:.2f}x FP speed, TF-MOT QAT "
                    f"{peer[PEER_QAT]['vs_' + PEER_FP.replace(' ', '_')]:.2f}x FP speed")
    return "\n".join(rows)


def print_report(report):
    """Prints the header and every model's table of a run's report dict."""
    peer = report.get("peer")
    load = report["load_average"]
    print(f"# {report['date']}; {report['machine']}; TF {report['tensorflow']}, Keras {report['keras']}"
          + (f"; peer: TF {peer['tensorflow']}, tf_keras {peer['tf_keras']}, tfmot {peer['tfmot']}"
             if peer else "")
          + f"; load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after")
    print(f"# command: {report['command']}")
    print(f"# {report['rounds']} rounds x {report['steps']} steps per variant; step = median over "
          "rounds; x FP = median over rounds of (FP step / variant step), FP of the same "
          "framework, timed in the same process")
    for d in report["models"].values():  # ratios recomputed from the per-round times
        add_rates(d["ours"], report["batch"], "FP")
        if d.get("peer"):
            add_rates(d["peer"], report["batch"], PEER_FP)
    print("\n\n".join(format_table(name, d["ours"], d.get("peer"), report["batch"])
                      for name, d in report["models"].items()))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds (median over them)")
    p.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    p.add_argument("--peer_python", default=DEFAULT_PEER_PYTHON,
                   help="python of the virtualenv holding tf_keras + TF-MOT (see the docstring)")
    p.add_argument("--no_peer", action="store_true", help="skip the TF-MOT peer")
    p.add_argument("--json", default=os.path.join(ROOT, "runs", "throughput.json"),
                   help="where to write the figures ('' for nowhere)")
    p.add_argument("--report_only", metavar="JSON", default=None,
                   help="print the tables of an earlier run's JSON and exit")
    p.add_argument("--peer_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; accepted: {', '.join(MODELS)} "
                "(the peer rebuilds exactly these architectures)")
    for name in ("batch", "rounds", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.peer_worker:
        peer_worker(args)
        return
    if args.report_only:
        with open(args.report_only) as f:
            print_report(json.load(f))
        return
    if not args.no_peer:
        check_peer_python(args.peer_python)  # before minutes of measuring
    sys.path.insert(0, ROOT)
    import tensorflow as tf

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    report = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
              "batch": args.batch, "rounds": args.rounds, "steps": args.steps,
              "tensorflow": tf.__version__, "models": {}}
    import keras

    report["keras"] = keras.__version__
    peer = None
    for name in args.models:
        ours = measure_ours(name, args.batch, args.rounds, args.steps)
        keras.backend.clear_session()
        report["models"][name] = {"ours": ours}
        print(format_table(name, ours, None, args.batch), flush=True)
    if not args.no_peer:
        peer = measure_peer(args.peer_python, args.models, args.batch, args.rounds, args.steps)
        report["peer"] = {k: v for k, v in peer.items() if k != "models"}
        for name in args.models:
            report["models"][name]["peer"] = peer["models"][name]
    report["load_average"] = {"before": load_before, "after": os.getloadavg()}
    print()
    print_report(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"figures: {args.json}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, RuntimeError) as e:
        print(f"throughput.py: error: {e}", file=sys.stderr)
        sys.exit(2)
