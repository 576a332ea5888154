r"""The paper's ablation table (Zhuang et al. 2018, section 4) through the training CLI.

Rows: full precision, then for every bit-width of ``--bits``: Baseline, TS, PQ, Guided,
PQ+TS, TS+Guided, PQ+TS+Guided and PQ+TS+Guided** (first conv and last FC at 32-bit
weights), and a control the paper lacks: Baseline (long), row ``baseline_long``, the
Baseline trained as many epochs as the longest method gets under ``--budget`` (its lr
decay interval stretched by the same factor); it is left out where no method is longer
than the Baseline. ``--rows`` also takes ``baseline@N``, the Baseline trained N epochs
(lr decay stretched alike; not in the default rows): the equal-epochs control of a method
of N epochs, e.g. ``baseline@10`` and ``baseline@12`` for TS and PQ at 2 bits under
``final:8``. Every row is one ``python -m tfq.train`` subprocess with its own model_dir,
so a kill loses at most the current epoch of one row: rerunning this script with the
same options skips finished rows (their ``results.json`` says ``complete``), reuses
their numbers, and reruns an unfinished row with the same command, which the CLI
resumes from its last completed epoch, with the data passes (order, augmentation) an
uninterrupted row would have seen (rows run before commit 4a6d84a drew each pass
from the process's pass count instead, so where they were interrupted changed them;
rows run from 4a6d84a until 1dc68d8 also took one extra optimizer call per epoch
that applied weight decay and nothing else, see BENCHMARKS.md).

All rows of one seed (and FP activation) start from ONE full-precision model, trained
once (``--method=fp --epochs=<fp_epochs>``) in its own model_dir and handed to every
quantized row with ``--init_from`` (the CLI rebuilds it with the row's options, so the
``**`` row pins its first conv and last FC).

Budget rule (``--budget``), for the quantized stages of a row (the FP model is shared):
  - ``stage:N``: every quantized stage gets N epochs (a method with more stages trains
    longer; the paper trains each stage to convergence);
  - ``total:N``: each method gets N epochs in all, split evenly over its stages (the
    later stages get the remainder), but never fewer than ``--min_stage_epochs`` per
    stage, so a method with many stages may exceed N;
  - ``final:N``: the last stage (the target precision) gets N epochs, as many as the
    single-stage Baseline, and every earlier stage ``--min_stage_epochs``: each method
    trains equally long at the target precision, the multi-stage ones longer in all.
Stages per method at 2 bits with the default PQ sequence 32,8,4,2: Baseline 1, TS 2,
PQ 3 (W8A8, W4A4, W2A2), Guided 1, PQ+TS 6 (W8A32, W4A32, W2A32, W2A8, W2A4, W2A2),
TS+Guided 2, PQ+TS+Guided 6; at 4 bits PQ has 2 and PQ+TS 4.

A finished row is only reused if its saved ``config.json`` matches the row's flags (as
``tfq.train`` would check on resuming; options added to the CLI after the row ran are
shown as a note), and ``protocol.json`` refuses a results_dir made with other options.
The table shows the rows selected by ``--bits``, ``--rows``, ``--seeds`` and
``--fp_activation``: after running parts in several sessions, rerun with the full
selection to print the whole table (finished rows are only read). ``--fp_results_dir``
takes the FP models from (or trains them under) another results_dir, so tuning runs of
quantized options can share the FP models of an earlier ablation.

Splits: every epoch is validated on ``--eval_split``. Tune on ``holdout`` (taken from
the training images, ``--holdout`` of them); the table is meant to report ``test``.
The two are separate runs: use a separate ``--results_dir`` for each.

Layout of ``--results_dir``::

  protocol.json                       the options every row depends on (a rerun must match)
  table.json, table.md                the table, rewritten after every row
  curves.png                          validation top-1 per epoch, one panel per bit-width (zoomed;
                                      with several seeds, each row's mean over them)
  changes.png                         each row's paired top-1 change against the Baseline
                                      (per seed, mean, 95% interval), one panel per bit-width
  <fp_activation>/seed<S>/fp/         the shared full-precision model_dir
  <fp_activation>/seed<S>/w<B>/<row>/ one model_dir per quantized row (+ ablation_cli.log)

The table gives top-1 / top-5 (%) per row, bit-width and seed, the mean and standard
deviation over seeds, and the top-1 change against the Baseline and against FP (paired
per seed, then averaged); with more than one seed, a second table gives each change's
95% t interval and on how many seeds it is above zero; then one PASS / FAIL / PENDING
line per goal of issue 8 (judged on the mean, with the interval beside it):
4-bit PQ+TS+Guided within 0.5 points top-1 of FP; 2-bit PQ+TS+Guided at least 1.5
points above the 2-bit Baseline; TS, PQ and Guided each at least the 2-bit Baseline.
Where a compared method trained longer than the Baseline, its goal line says so and,
once Baseline (long) has finished, gives the change against it too, and against a
Baseline of the method's own epochs where one has finished (``baseline@N``, or the
Baseline itself); the table's column "Δ at equal epochs" gives that change for every row.

``--dry_run`` prints the rows, their stages, epochs and CLI commands, the status of
each row in ``--results_dir``, the total planned epochs and an estimate of the compute:
per stage-epoch, (training images + evaluation images / 3) / images-per-second of that
stage's kind (FP, quantized at the nearest measured bit-width, guided), read from
``benchmarks/throughput.py``'s JSON (``--throughput_json``) or from ``--images_per_second``,
plus a fixed cost per stage (tracing) and per row (process start). It is as good as the
throughput figures: on a shared machine, rerun throughput.py under similar load.

Usage::

  python benchmarks/ablation.py --dry_run                      # the default plan
  python benchmarks/ablation.py --eval_split=holdout --results_dir=runs/ablation-holdout
  python benchmarks/ablation.py --eval_split=holdout --bits=2 --rows=guided \
      --guidance_weight=0.1 --results_dir=runs/tune-lambda0.1 --fp_results_dir=runs/ablation-holdout
  python benchmarks/ablation.py --eval_split=holdout --bits=2 --rows=guided \
      --guidance_layers=scalar --results_dir=runs/tune-logits --fp_results_dir=runs/ablation-holdout
  python benchmarks/ablation.py --eval_split=test --seeds=0,1 --results_dir=runs/ablation-test
  python benchmarks/ablation.py <the options of an earlier run> --seeds=0,1 --report_only \
      --import_table=benchmarks/results/ablation_lr005_table.json   # seed 0 ran elsewhere
  python benchmarks/ablation.py --dataset=cifar100 --data_dir=/data/cifar-100-python \
      --model=alexnet_cifar --extra="--data_option=label_mode=fine"

Options given with a leading dash must use ``=``: ``--extra=--steps_per_epoch=3``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Importing any tfq module runs tfq/__init__, which loads Keras and TensorFlow: the layers
# must be registered for load_model without custom_objects whatever is imported first.
from tfq import runstate  # noqa: E402

# The rows of the paper's table, in its order; "**" = first conv and last FC at 32 bits.
# "baseline_long" is not the paper's: the Baseline trained as long as the longest method,
# the control that tells a scheme's effect from the extra epochs its stages bring.
ROWS = ("fp", "baseline", "ts", "pq", "guided", "pq+ts", "ts+guided", "pq+ts+guided",
        "pq+ts+guided**", "baseline_long")
LABELS = {"fp": "Full precision", "baseline": "Baseline", "ts": "TS", "pq": "PQ",
          "guided": "Guided", "pq+ts": "PQ+TS", "ts+guided": "TS+Guided",
          "pq+ts+guided": "PQ+TS+Guided", "pq+ts+guided**": "PQ+TS+Guided**",
          "baseline_long": "Baseline (long)"}
FP_ACTIVATIONS = ("relu", "clip")
# "baseline@N": the Baseline trained N epochs, the equal-epochs control of a method of N.
FIXED_EPOCHS_ROW = re.compile(r"baseline@([1-9][0-9]*)")
BASELINES = ("baseline", "baseline_long")  # with every baseline@N: rows of method Baseline

CIFAR10_TAR = os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz")
CIFAR10_SHA256 = "b7b80d42e0fd1d036c0f66a3b62486cf252e06c28ccd6023dd86a7d613247019"
CIFAR10_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tfq", "cifar10-jpeg")
DEFAULT_THROUGHPUT = os.path.join(ROOT, "runs", "throughput.json")

# Options that define the numbers of every row: a results_dir holds one protocol.
PROTOCOL_KEYS = ("model", "dataset", "data_dir", "train_limit", "holdout", "eval_split", "test_split",
                 "eval_limit", "batch_size", "fp_epochs", "fp_lr", "fp_lr_decay_epochs",
                 "budget", "min_stage_epochs", "lr", "lr_decay_epochs", "guidance_weight",
                 "guidance_norm", "guidance_layers", "pq_sequence", "extra", "fp_results_dir")
EVAL_COST = 1 / 3  # an evaluated image costs about a third of a trained one (forward only)
ROW_OVERHEAD_S = 30  # CLI start, data pipeline and model build per row
STAGE_OVERHEAD_S = 20  # every stage traces its train and eval functions anew


class AblationError(ValueError):
    """Bad options or a results_dir that cannot be used; the message says why."""


# ------------------------------------------------------------------ budget


@dataclasses.dataclass(frozen=True)
class Budget:
    """How many epochs each quantized stage of a row gets (see the module docstring)."""

    kind: str  # "stage", "total" or "final"
    epochs: int
    min_stage: int = 1

    def split(self, n_stages):
        """Epochs of each of a method's ``n_stages`` stages, in order."""
        if self.kind == "stage":
            return [self.epochs] * n_stages
        if self.kind == "final":
            return [self.min_stage] * (n_stages - 1) + [self.epochs]
        if n_stages * self.min_stage >= self.epochs:
            return [self.min_stage] * n_stages
        base, extra = divmod(self.epochs, n_stages)
        return [base + (i >= n_stages - extra) for i in range(n_stages)]

    def __str__(self):
        text = f"{self.kind}:{self.epochs}"
        if self.kind == "total":
            return text + f" (min {self.min_stage} per stage)"
        if self.kind == "final":
            return text + f" (earlier stages {self.min_stage} each)"
        return text


def parse_budget(text, min_stage_epochs=1):
    """``"stage:N"``, ``"total:N"`` or ``"final:N"`` -> ``Budget``.

    Raises:
      AblationError: anything else, or N / the minimum below 1.
    """
    kind, _, n = str(text).partition(":")
    if kind not in ("stage", "total", "final") or not n.strip().isdigit() or int(n) < 1:
        raise AblationError(
            f"--budget must be stage:N, total:N or final:N with N >= 1; got {text!r}")
    if min_stage_epochs < 1:
        raise AblationError(f"--min_stage_epochs must be >= 1; got {min_stage_epochs}")
    return Budget(kind, int(n), int(min_stage_epochs))


# ------------------------------------------------------------------ rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table for one seed and FP activation: one CLI run."""

    key: str  # an entry of ROWS
    bits: int | None  # None for the FP row
    seed: int
    fp_activation: str
    model_dir: str
    stages: tuple  # ((name, w_bits, a_bits, guided, epochs), ...)
    argv: tuple  # flags of python -m tfq.train
    init_from: str | None = None  # what the row starts from (the FP dir or the pinned copy)
    fp_dir: str | None = None  # the model_dir of the FP row it depends on

    @property
    def method(self):
        return method_of(self.key)

    @property
    def epochs(self):
        return sum(s[4] for s in self.stages)

    @property
    def command(self):
        return [sys.executable, "-m", "tfq.train", *self.argv]

    @property
    def label(self):
        where = "FP" if self.bits is None else f"W{self.bits}A{self.bits}"
        return f"{self.fp_activation} seed{self.seed} {where} {label(self.key)}"


def fixed_epochs(key):
    """N of a ``baseline@N`` row key, else None."""
    m = FIXED_EPOCHS_ROW.fullmatch(key)
    return int(m.group(1)) if m else None


def is_baseline(key):
    """Whether the row trains the Baseline method (the Baseline and its epoch controls)."""
    return key in BASELINES or fixed_epochs(key) is not None


def label(key):
    """The table's name of a row key ("baseline@10" -> "Baseline (10 ep)")."""
    n = fixed_epochs(key)
    return LABELS[key] if n is None else f"Baseline ({n} ep)"


def row_order(key):
    """Sort key of a row: the paper's order, then the ``baseline@N`` rows by N."""
    n = fixed_epochs(key)
    return (0, ROWS.index(key)) if n is None else (1, n)


def method_of(key):
    """The ``tfq.train --method`` of a row key ("pq+ts+guided**" -> "pq+ts+guided")."""
    return "baseline" if is_baseline(key) else key.rstrip("*")


def slug(key):
    """The folder name of a row ("pq+ts+guided**" -> "pq+ts+guided_fp_first_last")."""
    return key.replace("**", "_fp_first_last")


def row_dir(results_dir, act, seed, key, bits=None):
    """The model_dir of row ``key`` under ``results_dir`` (``bits`` unused for ``fp``)."""
    seed_path = os.path.join(results_dir, act, f"seed{seed}")
    if key == "fp":
        return os.path.join(seed_path, "fp")
    return os.path.join(seed_path, f"w{bits}", slug(key))


def fp_model_dir(args, act, seed):
    """Where the FP net of ``seed`` lives: ``--fp_results_dir``, else ``--results_dir``."""
    return row_dir(args.fp_results_dir or args.results_dir, act, seed, "fp")


def fp_activations(args):
    return list(FP_ACTIVATIONS) if args.fp_activation == "both" else [args.fp_activation]


def common_flags(args, act, seed, model_dir):
    flags = [f"--model={args.model}", f"--dataset={args.dataset}"]
    if args.data_dir:
        flags.append(f"--data_dir={args.data_dir}")
    for name in ("train_limit", "eval_limit"):
        if getattr(args, name) is not None:
            flags.append(f"--{name}={getattr(args, name)}")
    flags += [f"--holdout={args.holdout}", f"--eval_split={args.eval_split}",
              f"--test_split={args.test_split}",
              f"--batch_size={args.batch_size}", f"--seed={seed}", f"--fp_activation={act}",
              "--verbose=2", f"--model_dir={model_dir}"]
    return flags


def fp_row(args, act, seed):
    model_dir = fp_model_dir(args, act, seed)
    argv = common_flags(args, act, seed, model_dir) + [
        "--method=fp", f"--epochs={args.fp_epochs}", f"--pretrain_lr={args.fp_lr:g}",
        f"--pretrain_lr_decay_epochs={args.fp_lr_decay_epochs}"] + shlex.split(args.extra)
    return Row("fp", None, seed, act, model_dir, (("fp", 32, 32, False, args.fp_epochs),),
               tuple(argv))


def longest_epochs(args, bits, budget):
    """Epochs of the longest method at ``bits`` under ``budget``: the long Baseline's.

    Taken over every method of ``ROWS``, not only the selected ones, so that the row
    (and its model_dir's config) does not change with ``--rows``.
    """
    from tfq import precision

    methods = {method_of(k) for k in ROWS if k != "fp"}
    return max(sum(budget.split(len(precision.plan_stages(
        m, w_bits=bits, a_bits=bits, pq_sequence=args.pq_sequence)))) for m in methods)


def quantized_row(args, key, bits, act, seed, budget):
    """The row ``key`` at ``bits``, or None for a Baseline control that would repeat the Baseline.

    (``baseline@N`` with N the Baseline's epochs, or ``baseline_long`` where no method is
    longer than the Baseline.)
    """
    from tfq import precision

    method = method_of(key)
    plan = precision.plan_stages(method, w_bits=bits, a_bits=bits, pq_sequence=args.pq_sequence)
    epochs = budget.split(len(plan))
    decay = args.lr_decay_epochs
    if key != "baseline" and is_baseline(key):
        longer = fixed_epochs(key) or longest_epochs(args, bits, budget)
        if longer == epochs[0] or (key == "baseline_long" and longer < epochs[0]):
            return None  # the Baseline itself is that control
        # The Baseline's lr schedule stretched to the longer run, as one would train it.
        decay = max(1, int(decay * longer / epochs[0] + 0.5))
        epochs = [longer]
    stages = tuple((s.name, s.w_bits, s.a_bits, s.guided, e) for s, e in zip(plan, epochs))
    model_dir = row_dir(args.results_dir, act, seed, key, bits)
    pinned = key.endswith("**")
    fp_dir = fp_model_dir(args, act, seed)
    init = fp_dir
    argv = common_flags(args, act, seed, model_dir) + [
        f"--method={method}", f"--bits={bits}", f"--stage_epochs={','.join(map(str, epochs))}",
        f"--lr={args.lr:g}", f"--lr_decay_epochs={decay}",
        f"--guidance_weight={args.guidance_weight:g}", f"--guidance_norm={args.guidance_norm}",
        f"--pq_sequence={','.join(map(str, args.pq_sequence))}", f"--init_from={init}"]
    if args.guidance_layers and any(s[3] for s in stages):
        # Only rows with a guided stage: the others' config stays that of the default run.
        argv.append(f"--guidance_layers={','.join(args.guidance_layers)}")
    if pinned:
        argv.append("--fp_first_last")
    return Row(key, bits, seed, act, model_dir, stages, tuple(argv + shlex.split(args.extra)),
               init, fp_dir)


def plan_rows(args):
    """Every row to run, in running order: per seed, per FP activation, FP first.

    The FP row of a seed is included whenever one of its quantized rows is, since they
    all start from it.
    """
    budget = parse_budget(args.budget, args.min_stage_epochs)
    keys = sorted({k for k in args.rows if k != "fp"}, key=row_order)
    rows = []
    for seed in args.seeds:
        for act in fp_activations(args):
            if keys or "fp" in args.rows:
                rows.append(fp_row(args, act, seed))
            for bits in args.bits:
                planned = (quantized_row(args, k, bits, act, seed, budget) for k in keys)
                rows += [r for r in planned if r is not None]
    return rows


# ------------------------------------------------------------------ status of a row


def check_finished_config(row):
    """Refuses a finished row whose model_dir ran another configuration than ``row.argv``.

    The row's flags go through ``tfq.train``'s own flag-to-config mapping and are compared
    with the saved ``config.json`` the way the CLI compares them when it resumes, except
    that keys the saved config lacks (options added to the CLI after the row ran) are
    returned as a note instead of refusing the row.

    Returns:
      A note naming the new keys and their values now, or None.

    Raises:
      AblationError: a saved key differs (names the keys and both values).
    """
    saved = runstate.read_json(os.path.join(row.model_dir, "config.json"))
    if saved is None:
        return None
    from absl import flags

    from tfq import train

    flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["tfq.train", *row.argv])
        planned = json.loads(json.dumps(train.config_from_flags().to_dict()))
    finally:
        flags.FLAGS.unparse_flags()
    diff = sorted(k for k in set(saved) | set(planned)
                  if k not in train.TrainConfig.RESUME_FREE and k in saved
                  and saved.get(k) != planned.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {planned.get(k)!r}" for k in diff)
        raise AblationError(f"{row.model_dir} finished a run with another config ({detail}); "
                            "use another --results_dir (or --fp_results_dir)")
    newer = sorted(k for k in planned if k not in saved)
    if newer:
        return ("ran before these CLI options existed: "
                + ", ".join(f"{k} (now {planned[k]!r})" for k in newer))
    return None


def row_status(row):
    """What the row's model_dir holds (a finished row must match ``row.argv``).

    Returns:
      dict: ``status`` (done / partial / pending), ``epochs_done``, ``top1`` and
      ``top5`` (fractions, when done), ``wall_s`` (training seconds so far).
    """
    results = runstate.read_json(os.path.join(row.model_dir, "results.json"))
    if results and results.get("complete"):
        note = check_finished_config(row)
        r = results["methods"][row.method]
        wall = sum(s.get("wall_time_s", 0.0) for s in results["stages"])
        # The table reports the final evaluation on --test_split; the per-epoch
        # curves (and any tuning) use --eval_split.
        status = {"status": "done", "epochs_done": sum(s["epochs"] for s in results["stages"]),
                  "top1": r.get("test_top1", r["top1"]), "top5": r.get("test_top5", r["top5"]),
                  "eval_top1": r["top1"], "wall_s": wall}
        return {**status, "note": note} if note else status
    state = runstate.read_json(os.path.join(row.model_dir, "state.json"), {"stages": {}})
    done = wall = 0
    for st in state["stages"].values():
        hist = st.get("history", [])
        done += (st["result"]["epochs"] if st.get("status") == "done" and "result" in st
                 else st.get("epochs_done", 0))
        wall += sum(h.get("time_s", 0.0) for h in hist)
    return {"status": "partial" if done else "pending", "epochs_done": done, "wall_s": wall}


def read_curve(model_dir):
    """(global epoch, validation top-1, stage) per epoch from the row's log.csv."""
    path = os.path.join(model_dir, "log.csv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [(int(r["global_epoch"]), float(r["val_accuracy"]), r["stage"])
                for r in csv.DictReader(f) if r.get("val_accuracy") not in (None, "")]


# Protocol keys that name a folder: they differ between machines for the same numbers.
LOCATION_KEYS = ("data_dir", "fp_results_dir")


def import_statuses(rows, statuses, paths, args):
    """Rows that never ran here, filled in with their numbers from earlier ``table.json`` files.

    A table written by this script (e.g. one committed under ``benchmarks/results/``)
    keeps each finished row's top-1 / top-5 after its run directory is gone; merging it
    lets the script compute the means, paired deltas and goals over seeds that ran on
    different machines, instead of by hand. Only a row with nothing in its model_dir here
    (``pending``) is filled, from the first table that has it finished with the same
    stages; what ran here always wins.

    Args:
      rows, statuses: the plan and ``row_status`` of each row.
      paths: table.json files of earlier runs of this script.
      args: the options; each table's protocol must match them (folders excepted).

    Returns:
      The statuses, an imported row as ``done`` with ``imported_from`` naming its file.

    Raises:
      AblationError: a file is missing, is not such a table, or has another protocol.
    """
    mine = protocol(args)
    found = {}
    for path in paths:
        try:
            report = runstate.read_json(path)
        except (OSError, ValueError) as e:
            raise AblationError(f"--import_table {path}: cannot read it ({e})")
        if report is None:
            raise AblationError(f"--import_table {path}: no such file")
        if not (isinstance(report, dict) and isinstance(report.get("rows"), list)
                and isinstance(report.get("protocol"), dict)):
            raise AblationError(f"--import_table {path}: not a table.json of benchmarks/ablation.py")
        theirs = report["protocol"]
        diff = protocol_diff(theirs, mine, ignore=LOCATION_KEYS)
        if diff:
            detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} here" for k in diff)
            raise AblationError(f"--import_table {path} was made with other options ({detail}); "
                                "only tables of the same protocol can be merged")
        try:
            for r in report["rows"]:
                if r.get("status") == "done":
                    r["stages"] = tuple((s["name"], s["w_bits"], s["a_bits"], s["guided"], s["epochs"])
                                        for s in r["stages"])
                    r["top1"], r["top5"] = float(r["top1"]), float(r["top5"])
                    found.setdefault((r["fp_activation"], r["bits"], r["key"], r["seed"]), (path, r))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise AblationError(f"--import_table {path}: a finished row lacks a field or has a "
                                f"wrong one ({type(e).__name__}: {e}); not a table.json of "
                                "benchmarks/ablation.py")
    merged = []
    for row, st in zip(rows, statuses):
        hit = found.get((row.fp_activation, row.bits, row.key, row.seed))
        if st["status"] != "pending" or hit is None:
            merged.append(st)
            continue
        path, r = hit
        if r["stages"] != row.stages:
            merged.append({**st, "note": f"{path} has it with other stages {r['stages']}; not used"})
            continue
        merged.append({"status": "done", "epochs_done": r.get("epochs_done", row.epochs),
                       "top1": r["top1"], "top5": r["top5"], "eval_top1": r.get("eval_top1"),
                       "wall_s": r.get("wall_s", 0.0), "imported_from": path})
    return merged


# ------------------------------------------------------------------ table


def _mean_sd(values):
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _interval(values, level=0.95):
    """Two-sided t interval of the mean of ``values``, or None with fewer than two."""
    if len(values) < 2:
        return None
    from scipy import stats  # only the report needs it; planning and running rows do not

    m, sd = _mean_sd(values)
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return [m - half, m + half]


def summarize(rows, statuses, args):
    """Per FP activation, bit-width and row key: per-seed numbers, means, deltas.

    Deltas are in points of top-1, paired per seed (row minus Baseline / FP of the
    same seed and FP activation), then averaged over the seeds that have both.
    ``vs_equal_epochs`` is the change against the Baseline row (``baseline``,
    ``baseline_long`` or a ``baseline@N``) of the row's own epochs, named in
    ``equal_epochs_ref``; both are None where no such row is planned. Beside every change
    ``<name>``: ``<name>_n`` seeds paired, ``<name>_above`` of them above zero and
    ``<name>_ci``, the 95% t interval of the mean (None below two seeds): with seeds as
    noisy as short fine-tunes, whether an interval excludes zero says more than a mean.
    """
    pct = {}  # (act, bits, key, seed) -> (top1, top5, eval_top1 or None) in %
    for row, st in zip(rows, statuses):
        if st["status"] == "done":
            ev = st.get("eval_top1")
            pct[(row.fp_activation, row.bits, row.key, row.seed)] = (
                100 * st["top1"], 100 * st["top5"], None if ev is None else 100 * ev)
    summary = {}
    for act in fp_activations(args):
        for bits in args.bits:
            mine = [r for r in rows if r.fp_activation == act and r.bits in (bits, None)]
            epochs_of = {r.key: r.epochs for r in mine}  # a key's rows share their stages
            table = {}
            for key in epochs_of:
                b = None if key == "fp" else bits
                seeds = {s: pct[(act, b, key, s)] for s in args.seeds if (act, b, key, s) in pct}

                def delta(name, ref_key, ref_bits):
                    ref = [pct.get((act, ref_bits, ref_key, s)) for s in seeds]
                    d = [seeds[s][0] - r[0] for s, r in zip(seeds, ref) if r]
                    m, sd = _mean_sd(d)
                    return {name: m, name + "_sd": sd, name + "_n": len(d),
                            name + "_above": sum(x > 0 for x in d), name + "_ci": _interval(d)}

                t1, t1sd = _mean_sd([v[0] for v in seeds.values()])
                t5, t5sd = _mean_sd([v[1] for v in seeds.values()])
                # The final model on --eval_split: the split read while tuning, shown
                # beside the reported one so that their disagreements are visible.
                ev, evsd = _mean_sd([v[2] for v in seeds.values() if v[2] is not None])
                epochs = epochs_of[key]
                table[key] = {
                    "seeds": {str(s): {"top1": v[0], "top5": v[1]} for s, v in seeds.items()},
                    "n": len(seeds), "top1": t1, "top1_sd": t1sd, "top5": t5, "top5_sd": t5sd,
                    "eval_top1": ev, "eval_top1_sd": evsd, "epochs": epochs}
                if key != "fp":
                    for name, ref in (("vs_baseline", ("baseline", bits)), ("vs_fp", ("fp", None)),
                                      ("vs_baseline_long", ("baseline_long", bits))):
                        table[key].update(delta(name, *ref))
                if key != "fp" and not is_baseline(key):
                    ref = next((k for k in epochs_of if is_baseline(k) and epochs_of[k] == epochs),
                               None)
                    table[key]["equal_epochs_ref"] = ref
                    table[key].update(delta("vs_equal_epochs", ref, bits) if ref else
                                      {"vs_equal_epochs": None, "vs_equal_epochs_sd": None})
            summary.setdefault(act, {})[str(bits)] = table
    return summary


def unequal_epochs(table, keys):
    """A caveat for a goal comparing rows trained longer than the Baseline, or "".

    With a finished long Baseline (``baseline_long``) in the table, the caveat gives each
    row's top-1 change against it: the comparison at (nearly) equal epochs; with a
    finished Baseline of a longer row's own epochs (``baseline@N``), the change against
    that one as well: the comparison at exactly equal epochs.
    """
    base = table["baseline"]["epochs"]
    longer = [k for k in keys if table[k]["epochs"] != base]
    if not longer:
        return ""
    # stage:N and final:N give multi-stage methods more epochs: part of a gain may be that
    named = ", ".join(f"{label(k)} {table[k]['epochs']}" for k in longer)
    text = f"; not at equal epochs ({named} vs Baseline {base})"
    parts = []
    long = table.get("baseline_long")
    if long is not None and long["top1"] is not None:
        got = ", ".join(f"{label(k)} {_fmt(table[k].get('vs_baseline_long'), signed=True)}"
                        for k in keys)
        parts.append(f"against the Baseline trained {long['epochs']} epochs: {got}")
    same = [(k, table[k]["equal_epochs_ref"]) for k in longer
            if table[k].get("vs_equal_epochs") is not None
            and table[k]["equal_epochs_ref"] != "baseline_long"]
    if same:
        parts.append("against a Baseline of the same epochs: " + ", ".join(
            f"{label(k)} {table[k]['vs_equal_epochs']:+.2f} ({label(ref)})" for k, ref in same))
    if not parts:
        return text + (": compare a Baseline trained as long (row baseline_long), or as long "
                       "as each method (rows baseline@N)")
    return text + "".join(f"; {p}" for p in parts)


def reported_split(args):
    """The split of each row's final evaluation, which the table reports."""
    return args.test_split or args.eval_split


# Issue 8's goals, in points of top-1.
GOAL_4BIT_GAP = 0.5  # 4-bit PQ+TS+Guided at most this far below FP
GOAL_2BIT_GAIN = 1.5  # 2-bit PQ+TS+Guided at least this far above the Baseline


def goals(summary, args):
    """The issue's goals per FP activation: (activation, status, text) tuples."""
    out = []
    reported = reported_split(args)
    split = "" if reported == "test" else f" [{reported} split, for tuning]"
    for act, by_bits in summary.items():
        def check(bits, keys, field, threshold, text):
            table = by_bits.get(str(bits))
            ref = {"vs_fp": "fp", "vs_baseline": "baseline"}[field]
            if table is None or any(k not in table for k in keys + [ref]):
                return out.append((act, "N/A", f"{text}: row or bit-width not planned"))
            vals = [table[k].get(field) for k in keys]
            if any(v is None for v in vals):
                # A change needs both rows on one seed: name every row with no seed yet.
                missing = [label(k) for k in [ref] + keys if not table[k]["n"]] or [
                    f"{label(ref)} on the rows' seeds"]
                return out.append((act, "PENDING", f"{text}: waiting for {', '.join(missing)}"))
            ok = all(v >= threshold for v in vals)
            got = ", ".join(f"{label(k)} {v:+.2f}" for k, v in zip(keys, vals))
            n = min(table[k]["n"] for k in keys)
            cis = [table[k].get(field + "_ci") for k in keys]
            # The verdict is on the mean, as the issue states it; the interval says how
            # far the seeds' noise leaves that verdict open.
            ci = "" if None in cis else "; 95% interval " + ", ".join(
                f"{label(k)} {lo:+.2f} .. {hi:+.2f}" for k, (lo, hi) in zip(keys, cis))
            out.append((act, "PASS" if ok else "FAIL",
                        f"{text}: {got} (needs >= {threshold:+.2f}; mean of {n} seed(s)){ci}{split}"
                        + (unequal_epochs(table, keys) if field == "vs_baseline" else "")))

        check(4, ["pq+ts+guided"], "vs_fp", -GOAL_4BIT_GAP,
              f"4-bit PQ+TS+Guided within {GOAL_4BIT_GAP:g} top-1 of FP")
        check(2, ["pq+ts+guided"], "vs_baseline", GOAL_2BIT_GAIN,
              f"2-bit PQ+TS+Guided >= {GOAL_2BIT_GAIN:g} above Baseline")
        check(2, ["ts", "pq", "guided"], "vs_baseline", 0.0, "2-bit TS, PQ, Guided each >= Baseline")
    return out


def _fmt(v, sd=None, signed=False):
    if v is None:
        return "—"
    text = f"{v:+.2f}" if signed else f"{v:.2f}"
    return text + (f" ± {sd:.2f}" if sd is not None else "")


def _paired_cell(t, field):
    """A change as "+1.47 (+0.91 .. +2.03; 9 of 9 above)": mean, 95% interval, sign count."""
    m, n = t.get(field), t.get(field + "_n", 0)
    if m is None or not n:
        return "—"
    ci = t.get(field + "_ci")
    spread = f"{ci[0]:+.2f} .. {ci[1]:+.2f}; " if ci else ""
    return f"{m:+.2f} ({spread}{t[field + '_above']} of {n} above)"


def _paired_table(table, deltas):
    """The changes of one bit-width over seeds, with 95% t intervals (Markdown lines)."""
    head = ["row", "epochs", "seeds", "mean top-1", "mean top-5"] + [
        title for title, _, _ in deltas]
    lines = ["Paired changes over seeds (mean, 95% t interval of the mean, seeds above zero):",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, t in table.items():
        cells = [label(key), str(t["epochs"]), str(t["n"]), _fmt(t["top1"], t["top1_sd"]),
                 _fmt(t["top5"], t["top5_sd"])]
        cells += ["" if key in skip else _paired_cell(t, field) for _, field, skip in deltas]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def format_table(rows, statuses, summary, goal_lines, args):
    """The table as Markdown (readable on a terminal too)."""
    by = {(r.fp_activation, r.bits, r.key, r.seed): (r, s) for r, s in zip(rows, statuses)}
    lines = [f"# Ablation: {args.model} on {args.dataset}"
             + (f" ({args.data_dir})" if args.data_dir else ""),
             "",
             f"Table: final top-1 / top-5 on the **{reported_split(args)}** split; "
             f"per-epoch validation (curves, and the final model in column 'mean "
             f"{args.eval_split} top-1' where it is another split) on **{args.eval_split}**"
             + (f" ({args.eval_limit} images max)" if args.eval_limit else "")
             + f"; train limit {args.train_limit or 'none'}, holdout {args.holdout}; "
             f"FP {args.fp_epochs} epochs (lr {args.fp_lr:g}, /10 every {args.fp_lr_decay_epochs}); "
             f"quantized budget {parse_budget(args.budget, args.min_stage_epochs)}, lr {args.lr:g} "
             f"(/10 every {args.lr_decay_epochs}), guidance weight {args.guidance_weight:g} "
             f"({args.guidance_norm}"
             + (f", on {', '.join(args.guidance_layers)}" if args.guidance_layers else "")
             + f"), batch {args.batch_size}"
             + (f", extra CLI flags `{args.extra}`" if args.extra else "") + ".",
             "Top-1 / top-5 in %; Δ = top-1 change in points, paired per seed; ± = standard "
             "deviation over seeds; Baseline (long): the Baseline trained as long as the longest "
             "method (lr schedule stretched alike), the equal-epochs control; Baseline (N ep): "
             "the Baseline trained N epochs, likewise; Δ at equal epochs: against the Baseline "
             "row of the row's own epochs.", ""]
    other_split = args.eval_split != reported_split(args)
    for act, by_bits in summary.items():
        for bits, table in by_bits.items():
            lines.append(f"## FP activation {act}, W{bits}A{bits}")
            lines.append("")
            head = ["row", "epochs"] + [f"seed {s} top-1 / top-5" for s in args.seeds]
            head += ["mean top-1", "mean top-5"]
            if other_split:
                head.append(f"mean {args.eval_split} top-1")
            # (column title, summary field, rows that leave the column empty)
            deltas = [("Δ vs Baseline", "vs_baseline", ("fp", "baseline")),
                      ("Δ vs FP", "vs_fp", ("fp",))]
            if "baseline_long" in table:
                deltas.append(("Δ vs Baseline (long)", "vs_baseline_long", ("fp", "baseline_long")))
            if any(fixed_epochs(k) for k in table):
                deltas.append(("Δ at equal epochs", "vs_equal_epochs",
                               tuple(k for k in table if k == "fp" or is_baseline(k))))
            head += [title for title, _, _ in deltas]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for key, t in table.items():
                b = None if key == "fp" else int(bits)
                cells = [label(key)]
                first = by.get((act, b, key, args.seeds[0]))
                cells.append(str(first[0].epochs) if first else "—")
                for s in args.seeds:
                    r, st = by.get((act, b, key, s), (None, {"status": "—"}))
                    if st["status"] == "done":
                        cells.append(f"{100 * st['top1']:.2f} / {100 * st['top5']:.2f}")
                    elif st["status"] == "partial":
                        cells.append(f"running {st['epochs_done']}/{r.epochs} ep")
                    else:
                        cells.append(st.get("error", st["status"]))
                cells += [_fmt(t["top1"], t["top1_sd"]), _fmt(t["top5"], t["top5_sd"])]
                if other_split:
                    cells.append(_fmt(t["eval_top1"], t["eval_top1_sd"]))
                for _, field, skip in deltas:
                    cells.append("" if key in skip else _fmt(t.get(field), t.get(field + "_sd"), True))
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
            if len(args.seeds) > 1:
                lines += _paired_table(table, deltas)
    notes, imported = [], {}
    for r, st in zip(rows, statuses):
        if st.get("imported_from"):
            imported.setdefault(st["imported_from"], []).append(r.label)
        elif st.get("note"):
            notes.append(f"- {r.label}: {st['note']}")
    notes += [f"- read from {path} (their run directories are not here, so no curves): "
              + ", ".join(labels) for path, labels in imported.items()]
    if notes:
        lines += ["Notes on finished rows:", ""] + notes + [""]
    lines.append("## Goals")
    lines.append("")
    lines += [f"- {status} [{act}] {text}" for act, status, text in goal_lines]
    return "\n".join(lines) + "\n"


FP_TAIL_EPOCHS = 3  # FP epochs left in view before the quantized part of a panel


def zoom_limits(points, fp_epochs, fp_tail=FP_TAIL_EPOCHS, margin=0.08):
    """Axis limits that show the quantized epochs of a panel, not the FP warm-up.

    The 30-odd FP epochs climb from ~30% and would squeeze the quantized curves, which
    differ by a point or two, into a sliver; the panel keeps the FP model's last
    ``fp_tail`` epochs (where the methods start from) and everything after them.

    Args:
      points: (x, y) of every point drawn in the panel, FP included.
      fp_epochs: the FP model's epochs (quantized epochs are drawn after them).
      fp_tail: FP epochs kept in view.
      margin: fraction of the y range added above and below.

    Returns:
      ((x_lo, x_hi), (y_lo, y_hi)), or None when there is nothing after the FP epochs.
    """
    x_lo = fp_epochs - fp_tail + 0.5
    seen = [(x, y) for x, y in points if x >= x_lo]
    if not any(x > fp_epochs for x, _ in seen):
        return None
    ys = [y for _, y in seen]
    pad = max((max(ys) - min(ys)) * margin, 0.5)
    return (x_lo, max(x for x, _ in seen) + 0.5), (min(ys) - pad, max(ys) + pad)


def _pyplot():
    # Imported here: planning and running rows do not need matplotlib.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path):
    with runstate.atomic_path(path, ".png") as tmp:  # a reader never sees half a PNG
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)


def mean_curve(curves):
    """The mean of a row's seeds, epoch by epoch, over the seeds that finished.

    Rows of one key share their stages, so every finished seed has the same epochs; a
    seed still running has fewer and is left out (it would make the mean jump where it
    stops).

    Args:
      curves: one ``read_curve`` list of (epoch, top-1, stage) per seed.

    Returns:
      (the mean curve as (epoch, top-1, stage) tuples, the number of seeds averaged).
    """
    full = max(len(c) for c in curves)
    done = [c for c in curves if len(c) == full]
    mean = [(done[0][k][0], sum(c[k][1] for c in done) / len(done), done[0][k][2])
            for k in range(full)]
    return mean, len(done)


def plot_curves(rows, path, args):
    """Validation top-1 per epoch: one panel per FP activation and bit-width.

    Every method's curve starts where the FP model's ends (its epochs counted from its
    first quantized stage); dots mark the start of each stage. A row with one seed is
    drawn as it is; with several, each seed is a thin faint line and the row's mean
    (``mean_curve``) a thick one: a dozen rows of nine seeds each are unreadable
    otherwise. Each panel is zoomed on the quantized epochs and the FP model's last few
    (``zoom_limits``, on the thick lines), with the FP model's final top-1 as a dotted
    line.
    """
    plt = _pyplot()
    acts, bits = fp_activations(args), list(args.bits)
    fig, axes = plt.subplots(len(acts), len(bits), figsize=(9 * len(bits), 4.5 * len(acts)),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    order = {k: i for i, k in enumerate(ROWS)}
    # baseline@N rows, by N: colours none of the paper's rows (the default cycle) has.
    fixed = sorted({fixed_epochs(r.key) for r in rows} - {None})
    order.update({f"baseline@{n}": len(colours) + i for i, n in enumerate(fixed)})
    colours += ["#aa3377", "#44aa99", "#999933", "#882255", "#444444"]
    several = False
    for i, act in enumerate(acts):
        for j, b in enumerate(bits):
            ax = axes[i][j]
            by_key = {}
            for row in rows:
                if row.fp_activation == act and row.bits in (b, None):
                    curve = read_curve(row.model_dir)
                    if curve:
                        by_key.setdefault(row.key, []).append(curve)
            drawn = []
            for key, curves in by_key.items():
                start = 0 if key == "fp" else args.fp_epochs
                colour = "black" if key == "fp" else colours[order[key] % len(colours)]
                if len(curves) > 1:
                    several = True
                    for c in curves:
                        ax.plot([start + e for e, _, _ in c], [100 * v for _, v, _ in c], "-",
                                lw=0.6, alpha=0.3, color=colour)
                    curve, n = mean_curve(curves)
                    name = f"{label(key)} (mean of {n})"
                else:
                    curve, name = curves[0], label(key)
                xs = [start + e for e, _, _ in curve]
                ys = [100 * v for _, v, _ in curve]
                drawn += zip(xs, ys)
                ax.plot(xs, ys, "-", lw=1.6, color=colour, label=name)
                starts = [k for k in range(len(curve)) if k == 0 or curve[k][2] != curve[k - 1][2]]
                ax.plot([xs[k] for k in starts], [ys[k] for k in starts], "o", ms=3, color=colour)
                if key == "fp":
                    ax.axvline(args.fp_epochs + 0.5, color="grey", lw=0.6, ls=":")
                    ax.axhline(ys[-1], color="black", lw=0.6, ls=":")
            limits = zoom_limits(drawn, args.fp_epochs)
            if limits:
                ax.set_xlim(*limits[0])
                ax.set_ylim(*limits[1])
            ax.set_title(f"W{b}A{b}, FP activation {act}")
            ax.set_xlabel(f"epoch (FP's last {FP_TAIL_EPOCHS} of {args.fp_epochs}, "
                          "then each method's quantized stages)")
            ax.set_ylabel(f"{args.eval_split} top-1 (%)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # outside: inside it hid the curves
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"{args.model} on {args.dataset}: validation top-1 per epoch\n(dots: stage "
                 "starts; dotted: FP's final top-1" + ("; faint: single seeds" if several else "")
                 + ")", fontsize=10)
    fig.tight_layout()
    _save_png(fig, path)


def paired_changes(table, key, ref):
    """Per seed that both rows have, ``key``'s top-1 minus ``ref``'s, in points.

    Args:
      table: one bit-width of ``summarize``'s output.
      key, ref: row keys in it.

    Returns:
      {seed: change}, seeds as the table's strings.
    """
    mine, theirs = table[key]["seeds"], table.get(ref, {}).get("seeds", {})
    return {s: v["top1"] - theirs[s]["top1"] for s, v in mine.items() if s in theirs}


def change_marks(table):
    """What ``plot_changes`` draws for one bit-width: per row key, (field, ref, changes).

    ``changes`` is ``paired_changes`` against ``ref``: the Baseline (field
    ``vs_baseline``) and, where it is another row, the Baseline of the row's own epochs
    (``vs_equal_epochs``). A change paired on no seed is left out, and so is a row left
    with nothing.
    """
    out = {}
    for key, t in table.items():
        if key in ("fp", "baseline"):
            continue
        refs = [("vs_baseline", "baseline")]
        if t.get("equal_epochs_ref") not in (None, "baseline"):
            refs.append(("vs_equal_epochs", t["equal_epochs_ref"]))
        marks = [(field, ref, paired_changes(table, key, ref)) for field, ref in refs]
        marks = [m for m in marks if m[2]]
        if marks:
            out[key] = marks
    return out


# (marker, colour, legend) of each change changes.png draws
CHANGE_STYLE = {"vs_baseline": ("o", "C0", "vs Baseline: mean, 95% interval"),
                "vs_equal_epochs": ("s", "C1", "vs the Baseline of the row's own epochs")}


def plot_changes(summary, path, args):
    """The paired changes of every row against the Baseline, one panel per bit-width.

    One line per row (``change_marks``): each seed's change as a dot, the mean with its
    95% t interval as a bar (what the paired table gives in numbers); a second, square
    marker for the change at equal epochs, against the Baseline row of the row's own
    epochs, where that is not the Baseline itself. Vertical lines: the Baseline (0), FP
    (mean paired gap) and, at 2 bits, the issue's +1.5 goal for PQ+TS+Guided. Nothing is
    written while no row has a change to draw.
    """
    plt = _pyplot()
    panels = [(act, bits, table, marks) for act, by_bits in summary.items()
              for bits, table in by_bits.items() for marks in [change_marks(table)] if marks]
    if not panels:
        return
    height = max(len(marks) for *_, marks in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 1.6 + 0.45 * height),
                             squeeze=False)
    for ax, (act, bits, table, marks) in zip(axes[0], panels):
        keys = list(marks)[::-1]  # the table's first row at the top
        for y, key in enumerate(keys):
            t = table[key]
            offsets = [0.0] if len(marks[key]) == 1 else [0.15, -0.15]
            for dy, (field, _, seeds) in zip(offsets, marks[key]):
                marker, colour, _ = CHANGE_STYLE[field]
                ax.plot(list(seeds.values()), [y + dy] * len(seeds), ".", ms=4, alpha=0.45,
                        color=colour)
                ci = t.get(field + "_ci")
                err = None if ci is None else [[t[field] - ci[0]], [ci[1] - t[field]]]
                ax.errorbar([t[field]], [y + dy], xerr=err, fmt=marker, ms=5, capsize=3,
                            color=colour)
        ax.axvline(0, color="grey", lw=0.8)
        title = f"W{bits}A{bits}, FP activation {act}"
        fp = table.get("baseline", {}).get("vs_fp")
        if fp is not None:
            lo, hi = ax.get_xlim()
            if lo <= -fp <= hi:
                ax.axvline(-fp, color="black", lw=0.8, ls=":")
                ax.annotate("FP", (-fp, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                            textcoords="offset points", fontsize=7)
            else:  # a line far off to the right would squeeze every row into a corner
                title += f"\n(FP: {-fp:+.2f} over the Baseline, off the axis)"
        if int(bits) == 2 and "pq+ts+guided" in keys:
            ax.axvline(GOAL_2BIT_GAIN, color="C3", lw=0.8, ls="--")
            ax.annotate(f"goal for PQ+TS+Guided (+{GOAL_2BIT_GAIN:g})", (GOAL_2BIT_GAIN, 0),
                        xycoords=("data", "axes fraction"), xytext=(-2, 3), ha="right",
                        textcoords="offset points", fontsize=7, color="C3")
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels([f"{label(k)} ({table[k]['epochs']} ep, {table[k]['n']} seeds)"
                            for k in keys], fontsize=8)
        ax.set_ylim(-0.6, len(keys) - 0.4)
        ax.set_xlabel(f"{reported_split(args)} top-1 change, points (paired per seed)")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker=m, ls="", label=text)
               for m, c, text in CHANGE_STYLE.values()]
    handles.append(plt.Line2D([], [], color="grey", marker=".", ls="", alpha=0.6, label="one seed"))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"{args.model} on {args.dataset}: each row's change in top-1 against the "
                 "Baseline", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _save_png(fig, path)


def write_outputs(rows, statuses, args, out=print, show=False):
    """Rewrites table.json, table.md, curves.png and changes.png; returns the Markdown."""
    summary = summarize(rows, statuses, args)
    goal_lines = goals(summary, args)
    md = format_table(rows, statuses, summary, goal_lines, args)
    report = {
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "protocol": protocol(args),
        "rows": [{"key": r.key, "label": label(r.key), "bits": r.bits, "seed": r.seed,
                  "fp_activation": r.fp_activation, "model_dir": r.model_dir,
                  "stages": [{"name": n, "w_bits": w, "a_bits": a, "guided": g, "epochs": e}
                             for n, w, a, g, e in r.stages],
                  "epochs": r.epochs, "command": shlex.join(r.command), **st}
                 for r, st in zip(rows, statuses)],
        "summary": summary,
        "goals": [{"fp_activation": a, "status": s, "goal": t} for a, s, t in goal_lines],
    }
    runstate.write_json(os.path.join(args.results_dir, "table.json"), report)
    runstate.write_text(os.path.join(args.results_dir, "table.md"), md)
    plot_curves(rows, os.path.join(args.results_dir, "curves.png"), args)
    plot_changes(summary, os.path.join(args.results_dir, "changes.png"), args)
    if show:
        out(md)
    return md


# ------------------------------------------------------------------ data, protocol


def ensure_cifar10(tar_path=CIFAR10_TAR, dest=CIFAR10_CACHE, out=print):
    """Extracts the real CIFAR-10 JPEGs once into ``dest`` (verified, atomic); returns it.

    Raises:
      AblationError: the tarball is missing or its checksum is wrong.
    """
    marker = os.path.join(dest, ".complete")
    if os.path.exists(marker):
        return dest
    if not os.path.exists(tar_path):
        raise AblationError(f"{tar_path} not found: pass --data_dir (a folder with train/ and test/)")
    digest = hashlib.sha256()
    with open(tar_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != CIFAR10_SHA256:
        raise AblationError(f"{tar_path}: sha256 {digest.hexdigest()} != expected {CIFAR10_SHA256}")
    out(f"extracting {tar_path} into {dest} (once)")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".cifar10-jpeg-", dir=parent)
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(tmp, filter="data")
        open(os.path.join(tmp, ".complete"), "w").close()
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if os.path.exists(dest):  # a half-extracted copy from a killed run
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except OSError:
        if not os.path.exists(marker):  # another process may have won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def protocol(args):
    """The options that define an ablation, as they read back from JSON (tuples as lists)."""
    return json.loads(json.dumps({k: getattr(args, k) for k in PROTOCOL_KEYS}))


def protocol_diff(old, new, ignore=()):
    """Keys on which two protocols differ; a key absent on one side counts as None."""
    return [k for k in sorted(set(old) | set(new)) if k not in ignore and old.get(k) != new.get(k)]


def check_model(args, rows):
    """Refuses an unknown --model, or --guidance_layers it lacks, before any row runs.

    The CLI would say so too, but only when the row reaches it: after the FP row's
    training, or in the middle of a table.
    """
    from tfq import models, train

    try:
        models.spec(args.model)
    except ValueError as e:
        raise AblationError(f"--model: {e}") from None
    if args.guidance_layers and any(s[3] for r in rows for s in r.stages):
        train.check_guidance_layers(args.model, args.guidance_layers)


def check_protocol(args, write):
    """Refuses a results_dir made with other options; writes protocol.json if asked."""
    path = os.path.join(args.results_dir, "protocol.json")
    old, new = runstate.read_json(path), protocol(args)
    if old is None:
        if write:
            runstate.write_json(path, new)
        return
    diff = protocol_diff(old, new)
    if diff:  # protocols written by older scripts may lack keys
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
        raise AblationError(f"{args.results_dir} holds an ablation with other options ({detail}); "
                            "use another --results_dir")


# ------------------------------------------------------------------ compute estimate


def load_rates(args):
    """Images/s by stage kind -> (rates dict, source text), or (None, reason)."""
    if args.images_per_second:
        r = args.images_per_second
        return {"FP": r, "W8A8": r, "W4A4": r, "W2A2": r, "guided W4A4": r / 2}, \
            f"--images_per_second={r:g} (guided at half)"
    report = runstate.read_json(args.throughput_json)
    ours = ((report or {}).get("models", {}).get(args.model) or {}).get("ours")
    if not ours:
        return None, (f"no figures for {args.model} in {args.throughput_json}: run "
                      "benchmarks/throughput.py or pass --images_per_second")
    rates = {k: v["images_per_s"] for k, v in ours.items()}
    return rates, (f"{args.throughput_json} ({report.get('date', '?')}, batch {report.get('batch')}: "
                   + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " images/s)")


def stage_rate(rates, w_bits, a_bits, guided):
    if guided:
        return rates["guided W4A4"]
    k = min(w_bits, a_bits)
    if k >= 32:
        return rates["FP"]
    measured = sorted(int(n[1:].split("A")[0]) for n in rates if n.startswith("W"))
    nearest = min(measured, key=lambda m: (abs(m - k), m))
    return rates[f"W{nearest}A{nearest}"]


def image_counts(args):
    """(training images per epoch, evaluation images per epoch), or None if unknown."""
    from tfq import data

    try:
        sizes = data.info(args.dataset, data_dir=args.data_dir, holdout=args.holdout).split_sizes
    except Exception as e:  # DataError, or a source that needs options passed in --extra
        return None, f"image counts unknown ({e})"
    train = sizes["train"] if args.train_limit is None else min(sizes["train"], args.train_limit)
    split = args.eval_split if args.eval_split in sizes else next(
        (s for s in ("test", "validation", "val") if s in sizes), None)
    evaluated = sizes.get(split, 0)
    if args.eval_limit is not None:
        evaluated = min(evaluated, args.eval_limit)
    extra = shlex.split(args.extra)
    steps = [int(f.split("=", 1)[1]) for f in extra if f.startswith("--steps_per_epoch=")]
    if steps:
        train = min(train, steps[-1] * args.batch_size)
    return (train, evaluated), f"{train} training and {evaluated} {args.eval_split} images per epoch"


def row_seconds(row, images, rates):
    train, evaluated = images
    total = ROW_OVERHEAD_S
    for _, w, a, guided, epochs in row.stages:
        per_image = 1 / stage_rate(rates, w, a, guided)
        total += STAGE_OVERHEAD_S
        total += (epochs * (train + EVAL_COST * evaluated) + EVAL_COST * evaluated) * per_image
    return total


def dry_run(rows, statuses, args, out=print):
    """Prints the plan, its commands, the status of each row and the compute estimate."""
    images, images_text = image_counts(args)
    rates, rates_text = load_rates(args)
    estimate = images is not None and rates is not None
    out(f"ablation plan: {args.model} on {args.dataset}, bits {','.join(map(str, args.bits))}, "
        f"FP activation {args.fp_activation}, seeds {','.join(map(str, args.seeds))}; "
        f"validation on {args.eval_split}; budget {parse_budget(args.budget, args.min_stage_epochs)}; "
        f"results in {args.results_dir}")
    head = (f"{'#':>3}  {'act':<4} {'seed':>4} {'bits':>4}  {'row':<16} {'epochs':>6}  "
            f"{'status':<14} {'est. h':>6}  stages (W/A:epochs; g = guided)")
    out(head)
    out("-" * len(head))
    total_s = remaining_s = 0.0
    for i, (row, st) in enumerate(zip(rows, statuses), 1):
        secs = row_seconds(row, images, rates) if estimate else None
        left = 0.0 if st["status"] == "done" else (
            secs * (1 - st["epochs_done"] / row.epochs) if estimate else None)
        if estimate:
            total_s, remaining_s = total_s + secs, remaining_s + left
        status = (f"partial {st['epochs_done']}/{row.epochs}" if st["status"] == "partial"
                  else st["status"])
        stages = " ".join(f"W{w}A{a}{'g' if g else ''}:{e}" for _, w, a, g, e in row.stages)
        out(f"{i:>3}  {row.fp_activation:<4} {row.seed:>4} {row.bits or 32:>4}  {label(row.key):<16} "
            f"{row.epochs:>6}  {status:<14} {f'{secs / 3600:.2f}' if estimate else '?':>6}  {stages}")
    for row, st in zip(rows, statuses):
        if st.get("note"):
            out(f"note: {row.label} {st['note']}")
    out("")
    out("commands (run from the repository root):")
    for row in rows:
        out(f"  # {row.label}\n  {shlex.join(row.command)}")
    fp_ep = sum(r.epochs for r in rows if r.key == "fp")
    q_ep = sum(r.epochs for r in rows if r.key != "fp")
    g_ep = sum(s[4] for r in rows for s in r.stages if s[3])
    out("")
    out(f"planned: {fp_ep + q_ep} epochs in {len(rows)} rows ({fp_ep} full-precision, "
        f"{q_ep} quantized stage-epochs of which {g_ep} guided, i.e. two nets per step)")
    out(f"images: {images_text}")
    if images is not None and images[0] == 0:
        out("WARNING: no training images are left after --holdout and --train_limit")
    out(f"speed: {rates_text}")
    if estimate:
        out(f"estimated compute: {total_s / 3600:.1f} hours in all, {remaining_s / 3600:.1f} hours "
            f"left (per stage-epoch: (training images + {EVAL_COST:.2f} x evaluation images) / "
            f"images-per-second, + {STAGE_OVERHEAD_S} s per stage and {ROW_OVERHEAD_S} s per row)")


# ------------------------------------------------------------------ running


def run_row(row, args, out=print):
    """Runs one row's CLI command (resuming it if it ran before); returns the exit code."""
    os.makedirs(row.model_dir, exist_ok=True)
    log_path = os.path.join(row.model_dir, "ablation_cli.log")
    path = [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
           "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    with open(log_path, "a") as log:
        now = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"\n# {now} {shlex.join(row.command)}\n")
        log.flush()
        child = subprocess.Popen(row.command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
        try:
            for line in child.stdout:
                log.write(line)
                if not args.quiet:
                    out("    " + line.rstrip("\n"))
            return child.wait()
        finally:
            if child.poll() is None:  # interrupted: stop the CLI; its last epoch is kept
                child.terminate()
                child.wait()


def run(rows, args, out=print):
    """Runs every unfinished row in order, rewriting the table after each; returns 0 or 1."""
    statuses = [row_status(r) for r in rows]
    write_outputs(rows, statuses, args)
    failed = set()
    for i, row in enumerate(rows):
        st = statuses[i]
        tag = f"[{i + 1}/{len(rows)}] {row.label}"
        if st["status"] == "done":
            out(f"{tag}: finished earlier (top-1 {100 * st['top1']:.2f}%); skipped"
                + (f" (note: it {st['note']})" if st.get("note") else ""))
            continue
        fp_key = (row.fp_activation, row.seed)
        if row.key != "fp" and fp_key in failed:
            statuses[i] = {**st, "status": "blocked", "error": "blocked (FP row failed)"}
            out(f"{tag}: blocked: its FP row failed")
            continue
        verb = "resuming" if st["status"] == "partial" else "running"
        out(f"{tag}: {verb}: {shlex.join(row.command)}")
        t0 = time.time()
        rc = run_row(row, args, out)
        statuses[i] = row_status(row)
        if rc != 0 or statuses[i]["status"] != "done":
            statuses[i] = {**statuses[i], "status": "failed", "error": f"failed (exit {rc})"}
            if row.key == "fp":
                failed.add(fp_key)
            out(f"{tag}: FAILED (exit {rc}); see {os.path.join(row.model_dir, 'ablation_cli.log')}")
        else:
            out(f"{tag}: done in {(time.time() - t0) / 60:.1f} min: top-1 "
                f"{100 * statuses[i]['top1']:.2f}%, top-5 {100 * statuses[i]['top5']:.2f}%")
        write_outputs(rows, statuses, args)
    write_outputs(rows, statuses, args, out=out, show=True)
    out(f"table: {os.path.join(args.results_dir, 'table.md')} (and table.json); "
        f"plots: {os.path.join(args.results_dir, 'curves.png')}, changes.png")
    return 1 if any(s["status"] in ("failed", "blocked") for s in statuses) else 0


# ------------------------------------------------------------------ options


def _int_list(name):
    def parse(text):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} must be comma-separated integers; got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"--{name} is empty")
        return values
    return parse


def _name_list(name):
    def parse(text):
        names = [n.strip() for n in text.split(",")]
        if not all(names):
            raise argparse.ArgumentTypeError(f"--{name}: an empty name in {text!r}")
        return names
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="folder",
      help="tfq.data dataset name (folder, cifar10, cifar100, imagenet, digits...)")
    a("--data_dir", default=None,
      help="dataset folder; default for --dataset=folder: the real CIFAR-10 JPEGs, extracted "
           f"once from shared/data/cifar10-jpeg.tar.gz into {CIFAR10_CACHE}")
    a("--model", default="resnet20")
    a("--train_limit", type=int, default=10000, help="class-balanced training subset (0: all)")
    a("--holdout", type=int, default=2000, help="training images held out as split 'holdout'")
    a("--test_split", choices=("holdout", "test"), default="test",
      help="split of the final evaluation of every row, which the table reports")
    a("--eval_split", choices=("holdout", "test"), default="holdout",
      help="validation split: tune on holdout, report test")
    a("--eval_limit", type=int, default=None, help="evaluate on at most this many images")
    a("--fp_epochs", type=int, default=30, help="epochs of the shared full-precision model")
    a("--fp_lr", type=float, default=0.01, help="initial lr of the FP model")
    a("--fp_lr_decay_epochs", type=int, default=20, help="FP lr /10 every this many epochs")
    a("--budget", default="total:8", help="stage:N (N epochs per quantized stage), "
      "total:N (N epochs per method, split over its stages) or final:N (N epochs in the "
      "last stage, --min_stage_epochs in each earlier one)")
    a("--min_stage_epochs", type=int, default=2,
      help="minimum epochs per stage under total:N; epochs of each earlier stage under final:N")
    a("--lr", type=float, default=1e-3, help="initial lr of every quantized stage")
    a("--lr_decay_epochs", type=int, default=10, help="quantized stages: lr /10 every this many epochs")
    a("--guidance_weight", type=float, default=0.5, help="lambda of the guidance loss")
    a("--guidance_norm", choices=("mean", "sum"), default="mean")
    a("--guidance_layers", type=_name_list("guidance_layers"), default=None,
      help="comma-separated layer names whose outputs the guidance loss compares, e.g. "
           "'scalar' for resnet20's logits (the authors' released code); default: the "
           "model's two guidance points (the paper's feature maps)")
    a("--pq_sequence", type=_int_list("pq_sequence"), default=[32, 8, 4, 2])
    a("--fp_activation", choices=("relu", "clip", "both"), default="clip",
      help="nonlinearity of the FP net (and of unquantized activations); both: a table for each")
    a("--bits", type=_int_list("bits"), default=[4, 2])
    a("--seeds", type=_int_list("seeds"), default=[0])
    a("--batch_size", type=int, default=128)
    a("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS)
      + "; and baseline@N (the Baseline trained N epochs, lr decay stretched alike)")
    a("--results_dir", default=os.path.join("runs", "ablation"))
    a("--fp_results_dir", default=None,
      help="take (or train) the FP models under this results_dir instead, e.g. to tune "
           "quantized options against the FP models of an earlier ablation")
    a("--extra", default="", help="extra flags for every tfq.train call, e.g. --extra=--deterministic")
    a("--dry_run", action="store_true", help="print the plan, commands and estimate; run nothing")
    a("--report_only", action="store_true",
      help="rewrite table.md/json, curves.png and changes.png from the finished rows; run nothing")
    a("--import_table", action="append", default=[], metavar="TABLE_JSON",
      help="with --report_only: fill rows that never ran here from this table.json of an "
           "earlier run of the same protocol (e.g. another seed's, committed under "
           "benchmarks/results/), so means and goals cover both; repeatable")
    a("--throughput_json", default=DEFAULT_THROUGHPUT, help="figures of benchmarks/throughput.py")
    a("--images_per_second", type=float, default=None,
      help="training speed for the estimate, instead of --throughput_json")
    a("--quiet", action="store_true", help="do not echo the CLI's output (it is still logged)")
    args = p.parse_args(argv)
    try:
        _check(args)
    except AblationError as e:
        p.error(str(e))
    return args


def _check(args):
    if args.train_limit == 0:
        args.train_limit = None
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS and fixed_epochs(r) is None]
    if unknown or not rows:
        raise AblationError(f"--rows: unknown {unknown or 'empty'}; accepted: {', '.join(ROWS)}, "
                            "and baseline@N with N >= 1 (the Baseline trained N epochs)")
    args.rows = rows
    bad = [b for b in args.bits if not 1 <= b <= 8]
    if bad:
        raise AblationError(f"--bits: {bad} outside 1..8")
    for name in ("fp_epochs", "batch_size", "fp_lr_decay_epochs", "lr_decay_epochs"):
        if getattr(args, name) < 1:
            raise AblationError(f"--{name} must be >= 1; got {getattr(args, name)}")
    for name in ("train_limit", "eval_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise AblationError(f"--{name} must be >= 1; got {getattr(args, name)}")
    if args.holdout < 0 or (args.eval_split == "holdout" and args.holdout == 0):
        raise AblationError(f"--eval_split=holdout needs --holdout > 0; got {args.holdout}")
    if len(set(args.seeds)) != len(args.seeds):
        raise AblationError(f"--seeds lists a seed twice: {args.seeds}")
    parse_budget(args.budget, args.min_stage_epochs)
    if args.import_table and not args.report_only:
        # Imported rows have no model here: a quantized row could not start from their FP.
        raise AblationError("--import_table only works with --report_only")
    args.results_dir = os.path.abspath(args.results_dir)
    if args.fp_results_dir is not None:
        args.fp_results_dir = os.path.abspath(args.fp_results_dir)


def main(argv=None, out=print):
    args = parse_args(argv)
    if args.data_dir is None and args.dataset == "folder":
        args.data_dir = ensure_cifar10(out=out)
    elif args.data_dir is not None:
        args.data_dir = os.path.abspath(args.data_dir)
    try:
        rows = plan_rows(args)
        check_model(args, rows)  # first: a refused option must not leave a protocol.json
        check_protocol(args, write=not (args.dry_run or args.report_only))
        statuses = [row_status(r) for r in rows]
        statuses = import_statuses(rows, statuses, args.import_table, args)
    except (AblationError, ValueError) as e:
        print(f"ablation: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(rows, statuses, args, out)
        return 0
    if args.report_only:  # e.g. a partial table while (or after) another run trains
        write_outputs(rows, statuses, args, out=out, show=True)
        return 0
    # A SIGTERM stops the running CLI too (run_row's finally), keeping its last epoch.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run(rows, args, out)


if __name__ == "__main__":
    sys.exit(main())
