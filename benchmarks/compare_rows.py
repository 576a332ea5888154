r"""Paired comparison of ablation rows taken from several results directories.

``benchmarks/ablation.py`` compares rows within one results_dir, whose ``protocol.json``
pins every option. A question such as "does guiding the logits do better than guiding
feature maps?" changes one option, so its rows live in two results_dirs (run with the
same ``--fp_results_dir``, they start from the same FP nets). This script reads the
finished rows named on the command line, pairs them by seed and prints, for the tuning
split (each row's final ``top1``, on the ablation's ``--eval_split``, the holdout by
default) and for the reported split (``test_top1``), every row's top-1 per seed with
its mean, and each asked change: per seed, its mean with the 95% t interval and on how
many seeds it is above zero. A change is taken over the seeds both rows finished.

Choose on the tuning split; the reported split is for reading afterwards.

``--unused`` adds a third split: each seed's unused training images (``tfq.data``'s
split ``"unused"``: every training image in neither that seed's training subset nor
its holdout; 38,000 CIFAR-10 images under the ablation's protocol). No net of that
seed has seen them, so they are a validation set for a choice the small holdout
cannot resolve. Each row's final model is evaluated once (``tfq.train.evaluate_run``)
and the result kept beside it in ``unused.json``; rows whose models were not kept
(the archived ones keep only their logs) show no value.

Usage::

  python benchmarks/compare_rows.py --bits=2 --seeds=1,2,3,4 \
      "Baseline=runs/abl-lr005:baseline" "Guided=runs/abl-lr005:guided" \
      "Guided (logits)=runs/abl-lr005-logits:guided" \
      --change="Guided (logits),Guided" --change="Guided (logits),Baseline"

A row is ``NAME=RESULTS_DIR:ROW`` with ROW an ablation row key (``baseline``,
``pq+ts+guided**``, ``baseline@10``, ``fp``...). Without ``--change``, every row is
compared with the first. ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import ablation  # noqa: E402  (the row layout, key names and statistics of the tables)

SPLITS = (("tuning", "top1"), ("reported", "test_top1"))
UNUSED = ("unused", "unused_top1")
LABELS = {"tuning": "{tuning} (tuning)", "reported": "{reported} (reported)",
          "unused": "unused training images (validation)"}


class CompareError(ValueError):
    """A row or change that cannot be read; the message says why."""


def parse_row(text):
    """``NAME=RESULTS_DIR:ROW`` -> (name, results_dir, row key)."""
    name, eq, rest = text.partition("=")
    results_dir, colon, key = rest.rpartition(":")
    if not (eq and colon and name.strip() and results_dir and key):
        raise CompareError(f"row {text!r}: expected NAME=RESULTS_DIR:ROW")
    if "," in name:
        raise CompareError(f"row {text!r}: a name cannot hold a comma (--change splits on it)")
    if key not in ablation.ROWS and ablation.fixed_epochs(key) is None:
        raise CompareError(f"row {text!r}: unknown row {key!r}; accepted: "
                           f"{', '.join(ablation.ROWS)}, and baseline@N")
    if not os.path.isdir(results_dir):
        raise CompareError(f"row {text!r}: {results_dir!r} is not a folder")
    return name.strip(), results_dir, key


def read_row(results_dir, key, act, seed, bits, evaluate=None, note=print):
    """{split field: top-1 in %} of a finished row, or None (missing or unfinished).

    With ``evaluate`` (``tfq.train.evaluate_run``'s signature), also ``unused_top1``:
    see ``unused_top1``.
    """
    d = ablation.row_dir(results_dir, act, seed, key, bits)
    results = ablation.runstate.read_json(os.path.join(d, "results.json"))
    if not results or not results.get("complete"):
        return None
    m = results["methods"][ablation.method_of(key)]
    values = {field: 100 * m[field] for _, field in SPLITS if field in m}
    if evaluate is not None:
        top1 = unused_top1(d, results, evaluate, note)
        if top1 is not None:
            values[UNUSED[1]] = top1
    return values


def unused_top1(model_dir, results, evaluate, note=print):
    """Top-1 in % of a finished row's final model on its seed's unused training images.

    Evaluated once: the result is kept in ``model_dir/unused.json`` with the model's
    path and modification time, and read back while they match. None (and a note)
    when the row's final model was not kept.
    """
    try:
        model = ablation.runstate.final_model_path(model_dir, results)
    except ValueError as e:
        raise CompareError(f"{model_dir}/results.json: {e}") from None
    if not os.path.exists(model):
        note(f"{model_dir}: its final model was not kept; no unused-image value")
        return None
    stamp = {"final_model": os.path.relpath(model, model_dir),
             "model_mtime_ns": os.stat(model).st_mtime_ns}
    path = os.path.join(model_dir, "unused.json")
    kept = ablation.runstate.read_json(path)
    if not (isinstance(kept, dict) and all(kept.get(k) == v for k, v in stamp.items())):
        try:
            kept = {**evaluate(model_dir, "unused"), **stamp}
        except ValueError as e:  # tfq's ConfigError and DataError say what is wrong
            raise CompareError(f"{model_dir}: cannot evaluate on the unused images: {e}") from None
        ablation.runstate.write_json(path, kept)
    return 100 * kept["top1"]


def paired(a, b, seeds):
    """(seed, a - b) for every seed both rows have."""
    return [(s, a[s] - b[s]) for s in seeds if a.get(s) is not None and b.get(s) is not None]


def compare(rows, changes, seeds, bits, act="relu", evaluate=None, note=print):
    """The comparison as a dict: per split, every row's values and every change.

    Args:
      rows: (name, results_dir, row key) triples.
      changes: (name, reference name) pairs.
      seeds, bits, act: which model_dirs to read.
      evaluate: ``tfq.train.evaluate_run`` (or a stand-in) to add the split
        ``"unused"``; None: the tuning and reported splits only.
      note: where to say which rows have no model to evaluate.
    """
    names = [r[0] for r in rows]
    for a, b in changes:
        unknown = [n for n in (a, b) if n not in names]
        if unknown:
            raise CompareError(f"--change {a},{b}: no row named {unknown[0]!r}; rows: {', '.join(names)}")
    read = {name: {s: read_row(d, key, act, s, bits, evaluate, note) for s in seeds}
            for name, d, key in rows}
    splits = SPLITS + ((UNUSED,) if evaluate is not None else ())
    out = {"seeds": list(seeds), "bits": bits, "fp_activation": act,
           "rows": {name: {"results_dir": d, "row": key} for name, d, key in rows},
           "splits": [split for split, _ in splits]}
    for split, field in splits:
        values = {name: {s: (v or {}).get(field) for s, v in per_seed.items()}
                  for name, per_seed in read.items()}
        table = {"rows": {}, "changes": []}
        for name, per_seed in values.items():
            done = [v for v in per_seed.values() if v is not None]
            table["rows"][name] = {"per_seed": per_seed, "mean": ablation._mean_sd(done)[0]}
        for a, b in changes:
            d = paired(values[a], values[b], seeds)
            diffs = [x for _, x in d]
            table["changes"].append({
                "row": a, "against": b, "per_seed": dict(d),
                "mean": ablation._mean_sd(diffs)[0], "interval": ablation._interval(diffs),
                "above": sum(x > 0 for x in diffs), "n": len(diffs)})
        out[split] = table
    return out


def _num(v, signed=False):
    return "-" if v is None else (f"{v:+.2f}" if signed else f"{v:.2f}")


def format_comparison(result, tuning_label="holdout", reported_label="test"):
    """Markdown tables of ``compare``'s result, one pair per split."""
    seeds = result["seeds"]
    lines = [f"W{result['bits']}A{result['bits']}, FP activation {result['fp_activation']}, "
             f"seeds {', '.join(map(str, seeds))}; top-1 in %, changes in points, paired per seed."]
    for split in result.get("splits", [split for split, _ in SPLITS]):
        label = LABELS[split].format(tuning=tuning_label, reported=reported_label)
        t = result[split]
        lines += ["", f"**{label}**", "",
                  "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
                  "|---|" + "---|" * (len(seeds) + 1)]
        for name, r in t["rows"].items():
            lines.append(f"| {name} | " + " | ".join(_num(r["per_seed"][s]) for s in seeds)
                         + f" | {_num(r['mean'])} |")
        if t["changes"]:
            lines += ["", "| change | " + " | ".join(f"seed {s}" for s in seeds)
                      + " | mean (95% interval) | above zero |",
                      "|---|" + "---|" * (len(seeds) + 2)]
            for c in t["changes"]:
                ci = c["interval"]
                mean = _num(c["mean"], signed=True) + (
                    f" ({ci[0]:+.2f} .. {ci[1]:+.2f})" if ci else "")
                lines.append(f"| {c['row']} - {c['against']} | "
                             + " | ".join(_num(c["per_seed"].get(s), signed=True) for s in seeds)
                             + f" | {mean} | {c['above']} of {c['n']} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("rows", nargs="+", help="NAME=RESULTS_DIR:ROW, e.g. 'Guided=runs/abl:guided'")
    p.add_argument("--change", action="append", default=[], metavar="ROW,REFERENCE",
                   help="a change to give: two row names, comma-separated (repeatable); "
                        "default: every row against the first")
    p.add_argument("--bits", type=ablation._int_list("bits"), default=[2],
                   help="bit-width of the rows (one value)")
    p.add_argument("--seeds", type=ablation._int_list("seeds"), default=[0])
    p.add_argument("--fp_activation", choices=ablation.FP_ACTIVATIONS, default="relu")
    p.add_argument("--unused", action="store_true",
                   help="also compare on each seed's unused training images (evaluates each "
                        "row's final model once; kept in the row's unused.json)")
    p.add_argument("--json", default=None, help="also write the comparison to this file")
    args = p.parse_args(argv)
    if len(args.bits) != 1:
        p.error(f"--bits takes one bit-width; got {args.bits}")
    return args


def main(argv=None, out=print):
    args = parse_args(argv)
    try:
        rows = [parse_row(r) for r in args.rows]
        if len({r[0] for r in rows}) != len(rows):
            raise CompareError("two rows share a name")
        changes = []
        for c in args.change:
            parts = [x.strip() for x in c.split(",")]
            if len(parts) != 2:
                raise CompareError(f"--change {c!r}: expected ROW,REFERENCE")
            changes.append(tuple(parts))
        if not args.change:
            changes = [(r[0], rows[0][0]) for r in rows[1:]]
        evaluate = None
        if args.unused:
            from tfq.train import evaluate_run as evaluate
        result = compare(rows, changes, args.seeds, args.bits[0], args.fp_activation, evaluate,
                         note=lambda text: print(f"compare_rows: {text}", file=sys.stderr))
    except CompareError as e:
        print(f"compare_rows: error: {e}", file=sys.stderr)
        return 2
    out(format_comparison(result))
    if args.json:
        ablation.runstate.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
