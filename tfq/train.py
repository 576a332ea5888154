"""Training CLI: ``python -m tfq.train --flagfile=flags/X.cfg``.

Flags are turned into one frozen ``TrainConfig`` (``config_from_flags``; nothing else
reads ``FLAGS``), validated before any work, and written to ``model_dir/config.json``.
``train(config)`` then expands each method into stages (``tfq.precision.plan_stages``),
prints the plan and runs the stages, each starting from the previous stage's weights
with a fresh optimizer and learning-rate schedule.

Several methods can share one run (``--method=fp,baseline,pq+ts+guided``): the
full-precision pretraining stage runs once and every method starts from it.

Layout of ``model_dir``::

  config.json         the resolved config (a rerun must match it)
  state.json          what has finished: the source of truth for resuming; also
                      "processes", one entry per process that trained in this run
                      (start time, host, CPU, library versions, where it started),
                      and each epoch's "process" index and "data_pass" in the
                      stage histories
  mean.npy            the per-pixel mean the input pipeline subtracts
  results.json        per stage: method, name, bits, epochs, top-1, top-5, loss, wall
                      time, model path; "final_model": the last method's final model
  log.csv             one row per epoch of every stage
  curves.png          validation accuracy per epoch across the stages
  tensorboard/<stage> TensorBoard logs
  stages/00_fp/       model.keras (+ ckpt/ while the stage runs)
  stages/<method>/NN_<stage>/  model.keras, fp_model.keras for guided stages, ckpt/

Fault tolerance: after every epoch the weights and optimizer state are written to a
new checkpoint file, then ``state.json`` is atomically updated to point at it, then
older checkpoints are deleted. A run killed at any moment and restarted with the same
command resumes from the last completed epoch of the current stage and never reruns a
finished stage. Each epoch's pass over the data is drawn from the seed and the run's
epoch number (the pipeline's ``epoch`` variable), so resumed epochs see the same data
order and augmentation as an uninterrupted run. A NaN or infinite loss stops the stage
with a message; the last good checkpoint stays in place.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import glob
import io
import itertools
import math
import os
import shutil
import sys
import time

from absl import app, flags

from tfq.data.pipeline import UNUSED

FLAGS = flags.FLAGS

flags.DEFINE_string("model", "resnet20", "Registered model name (tfq.models.names()).")
flags.DEFINE_string("dataset", "digits", "Dataset name (tfq.data.names(), or tfds:<name>).")
flags.DEFINE_string("data_dir", None, "Folder holding the dataset (source-specific).")
flags.DEFINE_multi_string("data_option", [], "Source option key=value (repeatable), e.g. label_mode=coarse.")
flags.DEFINE_bool("download", False, "Let tensorflow-datasets download a catalogue dataset.")
flags.DEFINE_integer("train_limit", None, "Use a class-balanced subset of this many training images.")
flags.DEFINE_integer("eval_limit", None, "Evaluate on a subset of this many images.")
flags.DEFINE_integer("holdout", 0, "Hold out this many training images as split 'holdout'.")
flags.DEFINE_string("eval_split", "test", "Split used for validation each epoch: test, validation, holdout, or unused (the training images neither --train_limit nor --holdout took).")
flags.DEFINE_string("test_split", None, "Also evaluate every finished stage on this split (e.g. test, while --eval_split=holdout drives the per-epoch curves); reported as test_top1/test_top5/test_loss.")
flags.DEFINE_integer("image_size", None, "Crop size fed to the model (default: the dataset's).")
flags.DEFINE_enum("mean", "per_pixel", ["per_pixel", "none"], "Mean subtracted from every image.")
flags.DEFINE_bool("skip_corrupt", False, "Skip (and count) corrupt images instead of stopping.")

flags.DEFINE_string("method", "baseline", "Method(s), comma-separated: fp, baseline, ts, pq, guided, pq+ts, ts+guided, pq+guided, pq+ts+guided.")
flags.DEFINE_integer("bits", None, "Target bits for weights and activations (sets --w_bits and --a_bits).")
flags.DEFINE_integer("w_bits", 4, "Target weight bits (1..8 or 32).")
flags.DEFINE_integer("a_bits", 4, "Target activation bits (1..8 or 32).")
flags.DEFINE_list("pq_sequence", ["32", "8", "4", "2"], "Progressive bit-widths, strictly decreasing.")
flags.DEFINE_bool("fp_first_last", False, "The paper's ** variant: first conv and last FC keep 32-bit weights.")
flags.DEFINE_enum("fp_activation", "relu", ["relu", "clip"], "Nonlinearity of full-precision activation layers.")
flags.DEFINE_bool("calibrate_range", True, "Before the first quantized stage, rescale a ReLU full-precision model (exactly, via BatchNorm) so its activations fit [0, 1] (tfq.calibration).")
flags.DEFINE_float("calibration_percentile", 99.0, "Percentile of each layer's activations mapped to 1 by --calibrate_range (median over layers).")

flags.DEFINE_integer("epochs", 10, "Epochs of every quantized stage.")
flags.DEFINE_list("stage_epochs", None, "Per-quantized-stage epochs, overriding --epochs (one value per stage).")
flags.DEFINE_integer("pretrain_epochs", 0, "Epochs of full-precision pretraining before the quantized stages.")
flags.DEFINE_string("init_from", None, "Start from this full-precision model (.keras file or a tfq model_dir).")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("steps_per_epoch", None, "Limit the steps of every epoch (quick runs).")
flags.DEFINE_float("lr", 1e-3, "Initial learning rate of quantized stages.")
flags.DEFINE_integer("lr_decay_epochs", 10, "Quantized stages divide the lr every this many epochs.")
flags.DEFINE_float("pretrain_lr", 1e-2, "Initial learning rate of full-precision pretraining.")
flags.DEFINE_integer("pretrain_lr_decay_epochs", 30, "Pretraining divides the lr every this many epochs.")
flags.DEFINE_float("lr_decay_factor", 0.1, "Factor applied to the lr at each decay.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_bool("nesterov", True, "Nesterov momentum.")
flags.DEFINE_float("weight_decay", 1e-4, "Weight decay (Keras SGD's decoupled weight_decay).")

flags.DEFINE_float("guidance_weight", 0.5, "lambda: weight of the guidance loss R.")
flags.DEFINE_enum("guidance_norm", "mean", ["mean", "sum"], "R over a feature map: mean or sum of squares.")
flags.DEFINE_list("guidance_layers", None, "Guidance layer names (default: the model's two guidance points).")
flags.DEFINE_bool("freeze_fp", False, "Guided stages keep the full-precision net fixed (no joint training).")

flags.DEFINE_string("model_dir", "runs/demo", "Output folder (resumes if it holds the same run).")
flags.DEFINE_integer("seed", 0, "Random seed (weights, data order, augmentation).")
flags.DEFINE_bool("deterministic", False, "Deterministic ops and input pipeline (slower).")
flags.DEFINE_enum("verbose", "auto", ["auto", "0", "1", "2"], "Keras verbosity: auto = bars on a terminal, one line per epoch otherwise.")
flags.DEFINE_enum("distribution", "none", ["none", "mirrored", "multi_worker", "tpu"], "tf.distribute strategy.")
flags.DEFINE_bool("sync_batchnorm", False, "Synchronise BatchNorm statistics across replicas.")
flags.DEFINE_string("tpu", None, "TPU name or address for --distribution=tpu.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (see the flags for meanings)."""

    model: str = "resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    data_options: tuple = ()
    download: bool = False
    train_limit: int | None = None
    eval_limit: int | None = None
    holdout: int = 0
    eval_split: str = "test"
    test_split: str | None = None
    image_size: int | None = None
    mean: str = "per_pixel"
    skip_corrupt: bool = False
    methods: tuple = ("baseline",)
    w_bits: int = 4
    a_bits: int = 4
    pq_sequence: tuple = (32, 8, 4, 2)
    fp_first_last: bool = False
    fp_activation: str = "relu"
    calibrate_range: bool = True
    calibration_percentile: float = 99.0
    epochs: int = 10
    stage_epochs: tuple | None = None
    pretrain_epochs: int = 0
    init_from: str | None = None
    batch_size: int = 128
    steps_per_epoch: int | None = None
    lr: float = 1e-3
    lr_decay_epochs: int = 10
    pretrain_lr: float = 1e-2
    pretrain_lr_decay_epochs: int = 30
    lr_decay_factor: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    guidance_weight: float = 0.5
    guidance_norm: str = "mean"
    guidance_layers: tuple | None = None
    freeze_fp: bool = False
    model_dir: str = "runs/demo"
    seed: int = 0
    deterministic: bool = False
    verbose: str = "auto"
    distribution: str = "none"
    sync_batchnorm: bool = False
    tpu: str | None = None

    def to_dict(self):
        return dataclasses.asdict(self)

    # Keys that may differ between a run and its resumption.
    RESUME_FREE = ("verbose", "model_dir", "init_from", "download", "tpu")


class ConfigError(ValueError):
    """A flag value that cannot work; the message says what is accepted."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _positive(name, value, allow_none=False, allow_zero=False):
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"--{name} must be an integer {'>= 0' if allow_zero else '> 0'}; got {value!r}")


def validate(cfg):
    """Checks a config before any work; returns it.

    Raises:
      ConfigError: the first problem found, naming the flag and what is accepted.
    """
    from tfq import data, models, precision
    from tfq import quantizers as qz

    try:
        models.spec(cfg.model)
    except ValueError as e:
        raise ConfigError(f"--model: {e}") from None
    known = data.names()
    if cfg.dataset not in known and not cfg.dataset.startswith("tfds:"):
        raise ConfigError(f"--dataset: unknown dataset {cfg.dataset!r}; known: {', '.join(known)}, or tfds:<name>")
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise ConfigError(f"--data_dir: {cfg.data_dir!r} does not exist or is not a folder")
    for name in ("w_bits", "a_bits"):
        try:
            qz.check_bits(getattr(cfg, name), name)
        except ValueError as e:
            raise ConfigError(f"--{name}: {e}") from None
    try:
        precision.check_pq_sequence(cfg.pq_sequence)
    except ValueError as e:
        raise ConfigError(f"--pq_sequence: {e}") from None
    if not cfg.methods:
        raise ConfigError("--method is empty")
    for m in cfg.methods:
        try:
            precision.parse_method(m)
        except ValueError as e:
            raise ConfigError(f"--method: {e}") from None
    if len(set(cfg.methods)) != len(cfg.methods):
        raise ConfigError(f"--method lists a method twice: {','.join(cfg.methods)}")
    quantized = [m for m in cfg.methods if m != "fp"]
    if quantized and cfg.w_bits == 32 and cfg.a_bits == 32:
        raise ConfigError("--w_bits/--a_bits: quantized methods need a target below 32 bits")
    if "fp" in cfg.methods and len(cfg.methods) > 1 and not cfg.pretrain_epochs:
        raise ConfigError("--method lists fp with other methods: set --pretrain_epochs for the shared FP stage")
    _positive("epochs", cfg.epochs)
    _positive("pretrain_epochs", cfg.pretrain_epochs, allow_zero=True)
    _positive("batch_size", cfg.batch_size)
    _positive("steps_per_epoch", cfg.steps_per_epoch, allow_none=True)
    _positive("train_limit", cfg.train_limit, allow_none=True)
    _positive("eval_limit", cfg.eval_limit, allow_none=True)
    _positive("holdout", cfg.holdout, allow_zero=True)
    _positive("lr_decay_epochs", cfg.lr_decay_epochs)
    _positive("pretrain_lr_decay_epochs", cfg.pretrain_lr_decay_epochs)
    if cfg.stage_epochs is not None:
        for e in cfg.stage_epochs:
            _positive("stage_epochs", e)
    for name in ("lr", "pretrain_lr"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name} must be > 0; got {getattr(cfg, name)}")
    if not 0 < cfg.lr_decay_factor <= 1:
        raise ConfigError(f"--lr_decay_factor must be in (0, 1]; got {cfg.lr_decay_factor}")
    if not 0 <= cfg.momentum < 1:
        raise ConfigError(f"--momentum must be in [0, 1); got {cfg.momentum}")
    if cfg.weight_decay < 0 or cfg.guidance_weight < 0:
        raise ConfigError("--weight_decay and --guidance_weight must be >= 0")
    if not 0 < cfg.calibration_percentile <= 100:
        raise ConfigError(f"--calibration_percentile must be in (0, 100]; got {cfg.calibration_percentile}")
    if "holdout" in (cfg.eval_split, cfg.test_split) and not cfg.holdout:
        raise ConfigError("--eval_split/--test_split=holdout needs --holdout > 0")
    if UNUSED in (cfg.eval_split, cfg.test_split) and not cfg.train_limit:
        raise ConfigError(f"--eval_split/--test_split={UNUSED} (the training images "
                          "--train_limit leaves out) needs --train_limit")
    if UNUSED == cfg.eval_split and cfg.eval_limit:
        raise ConfigError(f"--eval_limit does not apply to --eval_split={UNUSED}: its size is "
                          "what --train_limit and --holdout leave of the training split")
    if cfg.init_from is not None and not os.path.exists(cfg.init_from):
        raise ConfigError(f"--init_from: {cfg.init_from!r} does not exist")
    if cfg.stage_epochs is not None and len(quantized) > 1:
        raise ConfigError("--stage_epochs applies to a single quantized method; run methods separately")
    guided = False
    for m in quantized:  # expands every plan, so stage_epochs mismatches fail now
        try:
            guided |= any(s.guided for s in _method_stages(cfg, m))
        except ValueError as e:
            raise ConfigError(f"--method {m}: {e}") from None
    if guided and cfg.guidance_layers:
        # Now, not at the first guided stage: after the pretraining and the stages
        # before it, and with config.json written, which a corrected rerun would refuse.
        check_guidance_layers(cfg.model, cfg.guidance_layers, fp_first_last=cfg.fp_first_last)
    parent = os.path.dirname(os.path.abspath(cfg.model_dir))
    if os.path.exists(cfg.model_dir) and not os.path.isdir(cfg.model_dir):
        raise ConfigError(f"--model_dir: {cfg.model_dir!r} exists and is not a folder")
    probe = cfg.model_dir if os.path.isdir(cfg.model_dir) else parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"--model_dir: cannot write under {probe!r}")
    return cfg


def check_guidance_layers(model, layers, **options):
    """Refuses guidance layer names that are not layers of a registered model.

    Builds the model once (names do not depend on the class count or input size).

    Args:
      model: a registered model name.
      layers: the layer names the guidance loss would compare.
      **options: model options that may rename layers (``fp_first_last``).

    Raises:
      ConfigError: names the missing layers, the model's guidance points, its logits
        layer and every layer name.
    """
    from tfq import models

    names = _layer_names(model, tuple(sorted(options.items())))
    missing = [g for g in layers if g not in names]
    if missing:
        logits = ", its logits 'scalar'" if "scalar" in names else ""
        raise ConfigError(
            f"--guidance_layers: {missing} are not layers of {model}; its guidance points "
            f"are {', '.join(models.spec(model).guidance_layers)}{logits}; "
            f"every layer: {', '.join(names)}")


@functools.lru_cache(maxsize=None)
def _layer_names(model, options):
    """Layer names of a registered model, built once per process for each option set.

    Cached because the ablation script validates every finished guided row's config, and
    building a network for each would cost seconds and memory in a long-lived process.
    """
    from tfq import models

    return tuple(layer.name for layer in models.build(model, num_classes=2, **dict(options)).layers)


def config_from_flags(f=FLAGS):
    """Maps parsed flags to a validated ``TrainConfig`` (the only reader of FLAGS)."""
    from tfq import data

    w_bits, a_bits = (f.bits, f.bits) if f.bits is not None else (f.w_bits, f.a_bits)

    def ints(name, values):
        try:
            return tuple(int(v) for v in values)
        except ValueError:
            raise ConfigError(f"--{name} must be comma-separated integers; got {','.join(values)}") from None

    options = []
    for item in f.data_option:
        if "=" not in item:
            raise ConfigError(f"--data_option must be key=value; got {item!r}")
        key, value = item.split("=", 1)
        try:
            options.append((key, data.option_from_text(key, value)))
        except data.DataError as e:
            raise ConfigError(f"--data_option={item}: {e}") from None
    cfg = TrainConfig(
        model=f.model, dataset=f.dataset, data_dir=f.data_dir, data_options=tuple(options),
        download=f.download, train_limit=f.train_limit, eval_limit=f.eval_limit,
        holdout=f.holdout, eval_split=f.eval_split, test_split=f.test_split,
        image_size=f.image_size, mean=f.mean,
        skip_corrupt=f.skip_corrupt,
        methods=tuple(m.strip() for m in f.method.split(",") if m.strip()),
        w_bits=w_bits, a_bits=a_bits, pq_sequence=ints("pq_sequence", f.pq_sequence),
        fp_first_last=f.fp_first_last, fp_activation=f.fp_activation,
        calibrate_range=f.calibrate_range, calibration_percentile=f.calibration_percentile,
        epochs=f.epochs,
        stage_epochs=ints("stage_epochs", f.stage_epochs) if f.stage_epochs else None,
        pretrain_epochs=f.pretrain_epochs, init_from=f.init_from, batch_size=f.batch_size,
        steps_per_epoch=f.steps_per_epoch, lr=f.lr, lr_decay_epochs=f.lr_decay_epochs,
        pretrain_lr=f.pretrain_lr, pretrain_lr_decay_epochs=f.pretrain_lr_decay_epochs,
        lr_decay_factor=f.lr_decay_factor, momentum=f.momentum, nesterov=f.nesterov,
        weight_decay=f.weight_decay, guidance_weight=f.guidance_weight,
        guidance_norm=f.guidance_norm,
        guidance_layers=tuple(f.guidance_layers) if f.guidance_layers else None,
        freeze_fp=f.freeze_fp, model_dir=f.model_dir, seed=f.seed,
        deterministic=f.deterministic, verbose=f.verbose, distribution=f.distribution,
        sync_batchnorm=f.sync_batchnorm, tpu=f.tpu,
    )
    return validate(cfg)


def _method_stages(cfg, method):
    from tfq import precision

    return precision.plan_stages(
        method, w_bits=cfg.w_bits, a_bits=cfg.a_bits, pq_sequence=cfg.pq_sequence,
        epochs=cfg.epochs, stage_epochs=cfg.stage_epochs, pretrain_epochs=0, lr=cfg.lr,
        lr_decay_epochs=cfg.lr_decay_epochs, lr_decay_factor=cfg.lr_decay_factor,
    )


def plan_run(cfg):
    """The run's stages as (method, stage key, Stage), in execution order.

    The shared full-precision stage (key ``00_fp``) comes first when pretraining or
    when ``fp`` is the only method.
    """
    from tfq import precision

    fp_epochs = cfg.pretrain_epochs or (cfg.epochs if cfg.methods == ("fp",) else 0)
    run = []
    if fp_epochs:
        fp = precision.plan_stages("fp", w_bits=32, a_bits=32, pretrain_epochs=fp_epochs,
                                   pretrain_lr=cfg.pretrain_lr,
                                   pretrain_lr_decay_epochs=cfg.pretrain_lr_decay_epochs,
                                   lr_decay_factor=cfg.lr_decay_factor)[0]
        run.append(("fp", "00_fp", fp))
    for method in cfg.methods:
        if method == "fp":
            continue
        for i, stage in enumerate(_method_stages(cfg, method), start=1):
            run.append((method, f"{method}/{i:02d}_{stage.name}", stage))
    return run


# --------------------------------------------------------------------------- run


class _Run:
    """Paths and persistent state of one model_dir."""

    def __init__(self, cfg, writable=True, task="chief"):
        from tfq import runstate

        self.cfg = cfg
        self.dir = cfg.model_dir
        self.writable = writable  # False on non-chief workers: they never write here
        # Non-chief workers must run the same saves as the chief (saving can involve
        # collective ops), so they write copies into a private scratch folder.
        self.scratch = os.path.join(cfg.model_dir, "workers", task)
        self.rs = runstate
        self.state_path = os.path.join(self.dir, "state.json")
        self.state = runstate.read_json(self.state_path, {"stages": {}})
        self.process = None  # this process's index in state["processes"], once it trains
        # The input pipeline's pass number (see tfq.data.build_dataset's ``epoch``) and
        # each stage's first epoch in the run: the pass an epoch gets never depends on
        # where the run was interrupted.
        self.data_epoch = None
        self.first_epoch = {}

    def note_process(self, key, epoch):
        """Records this process in the run's state the first time it trains; returns
        its index, which every epoch it runs carries (``history[i]["process"]``).

        A run continued across sessions or machines is then traceable: which epochs
        each process ran, where it resumed, on which CPU and library versions.
        """
        if self.process is None:
            processes = self.state.setdefault("processes", [])
            processes.append({**_environment(), "from": {"stage": key, "epoch": epoch}})
            self.process = len(processes) - 1
        return self.process

    def stage_dir(self, key):
        return os.path.join(self.dir if self.writable else self.scratch, "stages", key)

    def stage_state(self, key):
        return self.state["stages"].setdefault(key, {"status": "pending", "history": []})

    def save_state(self):
        if self.writable:
            self.rs.write_json(self.state_path, self.state)

    def check_config(self):
        path = os.path.join(self.dir, "config.json")
        new = self.cfg.to_dict()
        old = self.rs.read_json(path)
        if old is not None:
            defaults = TrainConfig().to_dict()
            # A key missing from an older run's config had the default behaviour.
            old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
            diff = sorted(k for k in set(old) | set(new)
                          if k not in TrainConfig.RESUME_FREE and _norm(old.get(k)) != _norm(new.get(k)))
            if diff:
                detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
                raise ConfigError(
                    f"{self.dir} holds a run with a different config ({detail}); "
                    "use another --model_dir to start a new run"
                )
        if self.writable:
            self.rs.write_json(path, new)


def _environment():
    """Where and with what this process trains: time, host, CPU, versions."""
    import datetime
    import platform

    import keras
    import tensorflow as tf

    import tfq

    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpu": _cpu_model(), "cores": os.cpu_count(), "pid": os.getpid(),
        "python": platform.python_version(), "tensorflow": tf.__version__,
        "keras": keras.__version__, "tfq": tfq.__version__,
    }


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _norm(v):
    """A config value as config.json gives it back: tuples, at any depth, are lists
    (``data_options`` is a tuple of pairs)."""
    if isinstance(v, (tuple, list)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _verbose(cfg):
    if cfg.verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return int(cfg.verbose)


def _optimizer(cfg, lr):
    import keras

    return keras.optimizers.SGD(learning_rate=lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay or None)


def _metrics():
    import keras

    return [keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5")]


def _callbacks(run, key, stage, ckpt_dir):
    """Keras callbacks of a stage: lr schedule, NaN guard, checkpoint + logs."""
    import keras

    class StageSchedule(keras.callbacks.Callback):
        """Step lr decay per epoch, applied to every optimizer of the model."""

        def on_epoch_begin(self, epoch, logs=None):
            lr = stage.lr * stage.lr_decay_factor ** (epoch // stage.lr_decay_epochs)
            for opt in (self.model.optimizer, getattr(self.model, "fp_optimizer", None)):
                if opt is not None:
                    opt.learning_rate = lr
            self.lr = lr

    class NanGuard(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.bad = None

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)) and self.bad is None:
                self.bad = (self.epoch, batch, float(loss))
                self.model.stop_training = True

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

    schedule, guard = StageSchedule(), NanGuard()

    class DataEpoch(keras.callbacks.Callback):
        """Tells the training pipeline which of the run's passes this epoch is."""

        def on_epoch_begin(self, epoch, logs=None):
            run.data_epoch.assign(run.first_epoch[key] + epoch)

    class EpochCheckpoint(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()

        def on_epoch_end(self, epoch, logs=None):
            if guard.bad is not None:
                return
            logs = {k: float(v) for k, v in (logs or {}).items()}
            if not all(math.isfinite(v) for k, v in logs.items() if "loss" in k):
                guard.bad = (epoch, None, logs.get("loss", float("nan")))
                self.model.stop_training = True
                return
            path = os.path.join(ckpt_dir, f"epoch_{epoch + 1:04d}.weights.h5")
            with run.rs.atomic_path(path, ".weights.h5") as tmp:
                self.model.save_weights(tmp)
            st = run.stage_state(key)
            st["status"] = "running"
            st["checkpoint"] = os.path.relpath(path, run.dir)
            st["epochs_done"] = epoch + 1
            st["history"].append({"epoch": epoch + 1, "lr": schedule.lr,
                                  "time_s": time.time() - self.t0, **logs,
                                  "process": run.process,
                                  "data_pass": int(run.data_epoch.numpy())})
            for old in glob.glob(os.path.join(ckpt_dir, "epoch_*.weights.h5")):
                if old != path:
                    os.unlink(old)
            if run.writable:
                run.save_state()
                _write_logs(run)

    return [DataEpoch(), schedule, guard, EpochCheckpoint()], guard


def _write_logs(run):
    """log.csv and curves.png, rebuilt from state.json (so they survive any crash)."""
    rows, order = [], [key for _, key, _ in plan_run(run.cfg)]
    g = 0
    for key in order:
        st = run.state["stages"].get(key)
        if not st:
            continue
        for h in st["history"]:
            g += 1
            rows.append({"stage": key, "global_epoch": g, **h})
    if not rows:
        return
    fields = ["stage", "global_epoch", "epoch", "lr", "time_s"]
    fields += sorted({k for r in rows for k in r} - set(fields))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    run.rs.write_text(os.path.join(run.dir, "log.csv"), buf.getvalue())
    from tfq import plots

    with run.rs.atomic_path(os.path.join(run.dir, "curves.png"), ".png") as tmp:
        plots.stage_curves(rows, tmp, title=f"{run.cfg.model} on {run.cfg.dataset}")


def _load_model(path, hint=" (--init_from takes a .keras file or a finished tfq model_dir)"):
    """The model of a ``.keras`` file, or the final model of a finished run's folder."""
    import keras

    from tfq import runstate

    if os.path.isdir(path):
        results_path = os.path.join(path, "results.json")
        try:
            results = runstate.read_json(results_path)
            if results is None:
                raise ValueError("missing")
            path = runstate.final_model_path(path, results)
        except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
            raise ConfigError(f"{results_path}: {e}{hint}") from None
        if not os.path.exists(path):
            raise ConfigError(f"{path}: the run's final model is not there (not kept, or moved)")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for unreadable files
        raise ConfigError(f"cannot load a Keras model from {path}: {e}") from None


def _check_same_architecture(model, reference, source):
    got = [(w.path, tuple(w.shape)) for w in model.weights]
    want = [(w.path, tuple(w.shape)) for w in reference.weights]
    if [s for _, s in got] != [s for _, s in want]:
        raise ConfigError(
            f"--init_from {source}: its architecture does not match {reference.name} "
            f"with these options ({len(got)} vs {len(want)} weights)"
        )


def train(cfg, out=print):
    """Runs (or resumes) every stage of ``cfg``; returns the results dict.

    Under a multi-worker strategy every worker runs this function; only the chief
    writes the run's files. The other workers keep their state in memory and make
    the same saves into ``model_dir/workers/<task>/`` (saving can involve collective
    ops, which every worker must join); their stage models stay there, so replicas
    can be compared.
    Stages hand their models to the next stage in memory, so workers never wait for
    files the chief is still writing; files are read only when resuming.

    Raises:
      ConfigError: bad configuration or a model_dir holding another run.
      TrainingDiverged: a stage's loss became NaN or infinite.
    """
    from tfq import distribute, runstate

    # MultiWorkerMirroredStrategy must exist before TensorFlow runs any op.
    try:
        strategy = distribute.make_strategy(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    chief = distribute.is_chief(strategy)
    run = _Run(cfg, writable=chief, task=distribute.task_name(strategy))
    lock = runstate.RunLock(cfg.model_dir) if chief else contextlib.nullcontext()
    with lock:
        results = _train_locked(cfg, run, strategy, out)
    if chief:
        out(format_results(results))
        out(f"results: {os.path.join(cfg.model_dir, 'results.json')}; "
            f"curves: {os.path.join(cfg.model_dir, 'curves.png')}")
    return results


def _train_locked(cfg, run, strategy, out):
    import keras
    import tensorflow as tf

    from tfq import calibration, data, distribute, models, precision

    run.check_config()
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    opts = dict(cfg.data_options)
    info = data.info(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, **opts)
    mean = _mean(cfg, run, info, opts, out)
    common = dict(data_dir=cfg.data_dir, image_size=cfg.image_size, mean=mean,
                  holdout=cfg.holdout, download=cfg.download, seed=cfg.seed,
                  deterministic=cfg.deterministic, **opts)
    run.data_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    train_ds = distribute.dataset(strategy, cfg.dataset, "train", cfg.batch_size,
                                  training=True, limit=cfg.train_limit, epoch=run.data_epoch,
                                  skip_corrupt=cfg.skip_corrupt, **common)
    eval_ds = distribute.dataset(strategy, cfg.dataset, cfg.eval_split, cfg.batch_size,
                                 training=False, **common,
                                 limit=_split_limit(cfg, cfg.eval_split, cfg.eval_limit))
    test_ds = (distribute.dataset(strategy, cfg.dataset, cfg.test_split, cfg.batch_size,
                                  training=False, limit=_split_limit(cfg, cfg.test_split, None),
                                  **common) if cfg.test_split else None)
    input_shape = tuple(info.image_shape)
    plan = plan_run(cfg)
    run.first_epoch = dict(zip((key for _, key, _ in plan),
                               itertools.accumulate((s.epochs for _, _, s in plan), initial=0)))
    if run.writable:
        out(f"tfq: {cfg.model} on {cfg.dataset} ({info.num_classes} classes, input {input_shape}), "
            f"methods {', '.join(cfg.methods)}, target W{cfg.w_bits}A{cfg.a_bits}"
            + (f", {strategy.num_replicas_in_sync} replicas" if strategy.num_replicas_in_sync > 1 else ""))
        out(_format_run_plan(plan))

    def fresh():
        return models.build(cfg.model, num_classes=info.num_classes, input_shape=input_shape,
                            fp_first_last=cfg.fp_first_last, fp_activation=cfg.fp_activation)

    start_weights = []  # the full-precision stage's weights, once trained in this process
    calibration_images = []

    def start_model(calibrate=True):
        """A new model holding the weights every method's first stage starts from,
        rescaled (function unchanged) so its ReLU activations fit [0, 1]."""
        fp_state = run.state["stages"].get("00_fp", {})
        if start_weights:
            m = fresh()
            m.set_weights(start_weights[0])
        elif fp_state.get("status") == "done" or cfg.init_from:
            # Rebuilt with this run's options (pinned layers of --fp_first_last,
            # fp_activation), then given the saved weights.
            source = (_load_model(cfg.init_from) if fp_state.get("status") != "done" else
                      keras.models.load_model(os.path.join(run.dir, fp_state["model"])))
            m = fresh()
            _check_same_architecture(source, m, cfg.init_from or fp_state["model"])
            m.set_weights(source.get_weights())
        else:
            keras.utils.set_random_seed(cfg.seed)  # every method from the same init
            m = fresh()
        if calibrate and cfg.calibrate_range and calibration.applicable(m):
            if not calibration_images:  # the same images for every method and worker
                calibration_images.extend(data.build_dataset(
                    cfg.dataset, "train", batch_size=256, training=False, limit=512,
                    **{k: v for k, v in common.items() if k != "deterministic"}))
            scale = calibration.calibrate_activation_range(m, calibration_images, cfg.calibration_percentile)
            if run.writable:
                out(f"activation range calibrated: ReLU outputs divided by {scale:.3f}")
        return m

    def load(key, what):
        return keras.models.load_model(os.path.join(run.dir, run.state["stages"][key][what]))

    carry = {}  # method -> (model, fp_model or None) handed from stage to stage
    prev_key = {}
    for method, key, stage in plan:
        st = run.stage_state(key)
        if st["status"] == "done":
            if run.writable:
                out(f"[{key}] finished earlier: top-1 {st['result']['top1']:.4f}; skipping")
            prev_key[method] = key
            continue
        prev = prev_key.get(method)
        with strategy.scope():
            if method in carry:
                model, fp_model = carry[method]
            elif prev is not None:  # resuming after a finished stage of this method
                model = load(prev, "model")
                fp_model = load(prev, "fp_model") if run.state["stages"][prev].get("fp_model") else None
            else:
                model, fp_model = start_model(calibrate=key != "00_fp"), None
            if stage.guided and fp_model is None:
                fp_model = start_model()
                precision.set_precision(fp_model, 32, 32, include_pinned=True)
            precision.set_precision(model, stage.w_bits, stage.a_bits)
            if cfg.sync_batchnorm:
                for net in (model, fp_model):
                    if net is not None:
                        distribute.sync_batchnorm(net)
            result = _run_stage(cfg, run, key, stage, model, fp_model, train_ds, eval_ds, out,
                                test_ds)
        if key == "00_fp":
            start_weights.append(model.get_weights())
        carry[method] = (model, fp_model if stage.guided else None)
        prev_key[method] = key
        st = run.stage_state(key)
        st.update(status="done", result={"method": method, **result}, model=result["model"])
        if stage.guided:
            st["fp_model"] = result["fp_model"]
        run.save_state()
        _write_results(run, plan)
    return _write_results(run, plan)


def _split_limit(cfg, split, limit):
    """The ``limit`` a run's pipeline for ``split`` takes: ``limit``, except for
    ``"unused"``, which is defined by the training subset it leaves out."""
    return cfg.train_limit if split == UNUSED else limit


def _mean(cfg, run, info, opts, out=print):
    import numpy as np

    from tfq import data
    from tfq.data.files import load_mean

    if cfg.mean == "none":
        return "none"
    path = os.path.join(run.dir, "mean.npy")
    mean = load_mean(path, tuple(info.image_shape[:2]) + (3,))
    if mean is not None:
        return mean
    if os.path.exists(path):  # recomputed: the same data gives the same mean
        out(f"{path}: not a valid pixel mean; recomputing it")
    mean = np.asarray(data.pixel_mean(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, **opts),
                      dtype="float32")
    if run.writable:
        with run.rs.atomic_path(path, ".npy") as tmp:
            np.save(tmp, mean)
    return mean


def _run_stage(cfg, run, key, stage, model, fp_model, train_ds, eval_ds, out, test_ds=None):
    import keras

    from tfq.guided import GuidedModel

    sdir = run.stage_dir(key)
    ckpt_dir = os.path.join(sdir, "ckpt")
    st = run.stage_state(key)
    os.makedirs(ckpt_dir, exist_ok=True)
    keep = os.path.join(run.dir, st["checkpoint"]) if st.get("checkpoint") else None
    for stray in glob.glob(os.path.join(ckpt_dir, "*")) + glob.glob(os.path.join(ckpt_dir, ".tmp-*")):
        if stray != keep:  # half-written files of a killed run, or never-recorded epochs
            os.unlink(stray)
    if stage.guided:
        trainee = GuidedModel(fp_model, model, guidance_layers=cfg.guidance_layers,
                              guidance_weight=cfg.guidance_weight,
                              guidance_norm=cfg.guidance_norm, freeze_fp=cfg.freeze_fp)
        trainee.compile(_optimizer(cfg, stage.lr), metrics=_metrics(),
                        fp_optimizer=_optimizer(cfg, stage.lr))
    else:
        trainee = model
        trainee.compile(_optimizer(cfg, stage.lr), loss="sparse_categorical_crossentropy",
                        metrics=_metrics())

    initial_epoch = 0
    if st.get("checkpoint") and st.get("epochs_done"):
        if not stage.guided:  # GuidedModel.compile builds its optimizers itself
            trainee.optimizer.build(model.trainable_variables)
        trainee.load_weights(os.path.join(run.dir, st["checkpoint"]))
        initial_epoch = st["epochs_done"]
        out(f"[{key}] resuming after epoch {initial_epoch}/{stage.epochs}")
    # History beyond the checkpoint belongs to epochs that will run again.
    st["history"] = [h for h in st["history"] if h["epoch"] <= initial_epoch]

    out(f"[{key}] W{stage.w_bits}A{stage.a_bits}{' guided' if stage.guided else ''}, "
        f"{stage.epochs} epochs, lr {stage.lr:g}")
    callbacks, guard = _callbacks(run, key, stage, ckpt_dir)
    from tfq import distribute, steps

    strategy = distribute.current_strategy()
    callbacks = distribute.prepare(trainee, strategy, train_ds.element_spec) + callbacks
    if steps.length_unknown(train_ds):  # see tfq.steps
        steps.guard_train_step(trainee)
    tb_root = run.dir if run.writable else run.scratch
    callbacks.append(keras.callbacks.TensorBoard(
        log_dir=os.path.join(tb_root, "tensorboard", key.replace("/", "_")),
        write_graph=False, profile_batch=0))
    from tfq import data

    callbacks += data.callbacks_for(train_ds, eval_ds)
    if initial_epoch < stage.epochs:
        run.note_process(key, initial_epoch)
        with data.translate_errors():  # a corrupt image surfaces as a DataError naming it
            trainee.fit(train_ds, validation_data=eval_ds, epochs=stage.epochs,
                        initial_epoch=initial_epoch, steps_per_epoch=cfg.steps_per_epoch,
                        callbacks=callbacks, verbose=_verbose(cfg), shuffle=False)
    if guard.bad is not None:
        epoch, batch, loss = guard.bad
        where = f"epoch {epoch + 1}" + (f", batch {batch + 1}" if batch is not None else "")
        kept = st.get("checkpoint")
        raise TrainingDiverged(
            f"stage {key}: the loss became {loss} at {where}; training stopped. "
            + (f"The last good checkpoint (epoch {st['epochs_done']}) is kept at "
               f"{os.path.join(run.dir, kept)}. " if kept else "No epoch had finished. ")
            + "Lower --lr (or --pretrain_lr), check the data, then rerun the same command."
        )

    # Final evaluation of the low-bit net alone: cross-entropy, top-1, top-5.
    ev = evaluate(model, eval_ds, strategy)
    model_path = os.path.join(sdir, "model.keras")
    _save_plain(run, model, model_path)
    result = {
        "name": stage.name, "stage": key, "w_bits": stage.w_bits, "a_bits": stage.a_bits,
        "guided": stage.guided, "epochs": stage.epochs,
        "top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"],
        "wall_time_s": float(sum(h.get("time_s", 0.0) for h in st["history"])),
        "model": os.path.relpath(model_path, run.dir),
    }
    if test_ds is not None:
        test = evaluate(model, test_ds, strategy)
        result.update(test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"])
    if fp_model is not None:
        fp_path = os.path.join(sdir, "fp_model.keras")
        _save_plain(run, fp_model, fp_path)
        result["fp_model"] = os.path.relpath(fp_path, run.dir)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    out(f"[{key}] done: top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f}, loss {result['loss']:.4f}")
    return result


def evaluate(model, dataset, strategy=None):
    """Top-1, top-5 and mean cross-entropy of ``model`` on ``dataset``.

    Recompiles ``model`` (stage models are saved as uncompiled copies, so the
    training optimizer it loses here is never needed again).
    """
    from tfq import distribute

    model.compile(loss="sparse_categorical_crossentropy", metrics=_metrics())
    if strategy is not None:
        distribute.prepare(model, strategy, dataset.element_spec)
    ev = model.evaluate(dataset, verbose=0, return_dict=True)
    return {"top1": float(ev["accuracy"]), "top5": float(ev["top5"]), "loss": float(ev["loss"])}


def evaluate_run(model_dir, split, batch_size=256):
    """Top-1, top-5 and loss of a finished run's final model on ``split`` of its own data.

    The pipeline is the run's: dataset, data options and image size from its
    ``config.json``, the per-pixel mean it trained with (``mean.npy``), and the seed,
    ``holdout`` and ``train_limit`` that decide which images ``"holdout"`` and
    ``"unused"`` hold (its ``eval_split`` keeps ``eval_limit``, as in training); so
    ``split="unused"`` gives every training image this run never saw, a validation set
    for choices made after its holdout was spent.

    Args:
      model_dir: a tfq training run with a finished stage.
      split: ``"test"``, ``"holdout"``, ``"unused"``... (``tfq.data.build_dataset``).
      batch_size: evaluation batch.

    Returns:
      {"top1", "top5", "loss"}.

    Raises:
      ConfigError: not a training run, or its final model is missing or unreadable.
      tfq.data.DataError: the run's data cannot be read (moved, or the split is empty).
    """
    from tfq import data, runstate

    stored = runstate.read_json(os.path.join(model_dir, "config.json"))
    if not isinstance(stored, dict):
        raise ConfigError(f"{model_dir}: no readable config.json; not a tfq training run")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = dataclasses.replace(
        TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in stored.items() if k in known}), model_dir=model_dir)
    model = _load_model(model_dir, hint=" (no stage of the run has finished?)")
    opts = dict(cfg.data_options)
    info = data.info(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size, **opts)
    mean = _mean(cfg, _Run(cfg, writable=False), info, opts)
    limit = _split_limit(cfg, split, cfg.eval_limit if split == cfg.eval_split else None)
    ds = data.build_dataset(cfg.dataset, split, data_dir=cfg.data_dir, batch_size=batch_size,
                            image_size=cfg.image_size, mean=mean, holdout=cfg.holdout,
                            seed=cfg.seed, limit=limit, **opts)
    with data.translate_errors():
        return evaluate(model, ds)


def _save_plain(run, model, path):
    """Saves an uncompiled copy: a stage's model carries no optimizer state."""
    import keras

    # From the config, not clone_model: Keras clones carry the compile state over.
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    with run.rs.atomic_path(path, ".keras") as tmp:
        copy.save(tmp)


def _write_results(run, plan):
    stages = []
    for _, key, _ in plan:
        st = run.state["stages"].get(key)
        if st and st.get("status") == "done":
            stages.append(st["result"])
    last = {}
    for method, key, _ in plan:
        st = run.state["stages"].get(key)
        if st and st.get("status") == "done":
            last[method] = st["result"]
    methods = {}
    for m in run.cfg.methods:
        src = "fp" if m == "fp" else m
        if src in last:
            methods[m] = {k: last[src][k] for k in ("top1", "top5", "loss", "test_top1",
                                                    "test_top5", "test_loss") if k in last[src]}
            methods[m]["final_model"] = last[src]["model"]
    final = stages[-1]["model"] if stages else None
    results = {"model": run.cfg.model, "dataset": run.cfg.dataset,
               "w_bits": run.cfg.w_bits, "a_bits": run.cfg.a_bits,
               "complete": len(stages) == len(plan),
               "stages": stages, "methods": methods, "final_model": final}
    if run.writable:
        run.rs.write_json(os.path.join(run.dir, "results.json"), results)
    return results


def _format_run_plan(plan):
    head = f"{'#':>2}  {'method':<14} {'stage':<16} {'W':>3} {'A':>3} {'guided':>6} {'epochs':>6} {'lr':>8}  schedule"
    rows = ["stages:", head, "-" * len(head)]
    for i, (method, _, s) in enumerate(plan):
        rows.append(f"{i:>2}  {method:<14} {s.name:<16} {s.w_bits:>3} {s.a_bits:>3} "
                    f"{'yes' if s.guided else 'no':>6} {s.epochs:>6} {s.lr:>8g}  "
                    f"x{s.lr_decay_factor:g} every {s.lr_decay_epochs} epochs")
    return "\n".join(rows)


def format_results(results):
    """The per-method results as a printable table."""
    test = any("test_top1" in r for r in results["methods"].values())
    head = f"{'method':<16} {'top-1':>7} {'top-5':>7} {'loss':>8}"
    rows = [head + (f" {'test top-1':>10} {'test top-5':>10}" if test else "") + "  final model"]
    for m, r in results["methods"].items():
        row = f"{m:<16} {100 * r['top1']:>6.2f}% {100 * r['top5']:>6.2f}% {r['loss']:>8.4f}"
        if test:
            row += f" {100 * r.get('test_top1', float('nan')):>9.2f}% {100 * r.get('test_top5', float('nan')):>9.2f}%"
        rows.append(row + f"  {r['final_model']}")
    return "\n".join(rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from tfq import data, runstate

    try:
        cfg = config_from_flags()
        train(cfg)
    except (ConfigError, data.DataError) as e:
        print(f"tfq.train: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (TrainingDiverged, runstate.RunBusy) as e:
        print(f"tfq.train: error: {e}", file=sys.stderr)
        sys.exit(1)


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
