"""``python -m tfq.export``: export a tfq model to TFLite (float, int8), packed weights.

Examples::

    python -m tfq.export --model=runs/demo --out_dir=export/
    python -m tfq.export --model=model.keras --out_dir=export/ --dataset=digits --packed
    python -m tfq.export --model=model.keras --out_dir=export/ --npz=val.npz --uint8

With a training ``model_dir`` the dataset, data dir, data options, image size and
mean image of the run are used unless flags override them, and its splits are its
own: ``holdout`` and ``unused`` as the run drew them (its ``--holdout``,
``--train_limit`` and ``--seed``). Data give the agreement figures
(``--split``, ``--num_examples``) and the int8 ranges of full-precision parts
(``--calibration_split``, ``--num_calibration``). The report is printed and
written next to the models as ``<name>_export.json``. Exit status: 0 on success,
1 when the export fails (the message says why), 2 for bad flags.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "A .keras file or a training model_dir (results.json).")
flags.DEFINE_string("out_dir", None, "Output folder (created).")
flags.DEFINE_string("dataset", None, "tfq.data dataset name (default: the run's config.json).")
flags.DEFINE_string("data_dir", None, "Dataset folder (default: the run's config.json).")
flags.DEFINE_string("split", None, "Validation split for the agreement figures (default: the "
                    "run's eval_split, else 'test').")
flags.DEFINE_string("calibration_split", "train", "Split of the representative data.")
flags.DEFINE_integer("num_examples", 1000, "Validation examples (class-balanced subset).")
flags.DEFINE_integer("num_calibration", 256, "Representative examples for int8 ranges.")
flags.DEFINE_string("npz", None, "Instead of a dataset: an .npz with images ('x' or 'images', "
                    "model input convention) and optional labels ('y' or 'labels'); used as "
                    "validation and representative data.")
flags.DEFINE_bool("uint8", False, "uint8 input and output for the int8 model (default int8).")
flags.DEFINE_bool("int8", True, "Produce the int8 model.")
flags.DEFINE_bool("packed", False, "Also write the packed k-bit weights (.tfqpack).")
flags.DEFINE_integer("threads", 1, "LiteRT interpreter threads for latency.")
flags.DEFINE_integer("runs", 50, "Timed runs per model (0: skip latency).")
flags.DEFINE_integer("warmup", 5, "Untimed warm-up runs before the timed ones.")
flags.DEFINE_enum("edgetpu", "require", ["require", "report", "off"],
                  "Edge TPU check of the int8 model: fail when incompatible, only report, "
                  "or skip.")
flags.DEFINE_bool("isolate", False, "Convert in a child process (the converter leaks memory).")
flags.DEFINE_bool("json", False, "Print the report as JSON instead of a table.")


class FlagError(ValueError):
    """A flag value is unusable."""


def _positive(name, low):
    value = getattr(FLAGS, name)
    if value is None or value < low:
        raise FlagError(f"--{name} must be >= {low}; got {value}")


def check_flags():
    """Validates the flags before any work (files, numbers, dataset name)."""
    if not FLAGS.model:
        raise FlagError("--model is required: a .keras file or a training model_dir")
    if not os.path.exists(FLAGS.model):
        raise FlagError(f"--model={FLAGS.model}: no such file or directory")
    if not os.path.isdir(FLAGS.model) and not FLAGS.model.endswith(".keras"):
        raise FlagError(f"--model={FLAGS.model}: expected a .keras file or a model_dir")
    if not FLAGS.out_dir:
        raise FlagError("--out_dir is required")
    if os.path.exists(FLAGS.out_dir) and not os.path.isdir(FLAGS.out_dir):
        raise FlagError(f"--out_dir={FLAGS.out_dir}: exists and is not a directory")
    _positive("threads", 1)
    _positive("runs", 0)
    _positive("warmup", 0)
    _positive("num_examples", 1)
    _positive("num_calibration", 1)
    if FLAGS.npz:
        if FLAGS.dataset:
            raise FlagError("give either --npz or --dataset, not both")
        if not os.path.isfile(FLAGS.npz):
            raise FlagError(f"--npz={FLAGS.npz}: no such file")
    if FLAGS.dataset:
        from tfq import data as tfq_data

        try:
            tfq_data.check_name(FLAGS.dataset)
        except tfq_data.DataError as e:
            raise FlagError(f"--dataset: {e}") from None


def _npz_data(path):
    import numpy as np

    from tfq.export.source import ExportError

    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            x_key = "x" if "x" in keys else "images" if "images" in keys else None
            if x_key is None:
                raise ExportError(f"{path}: needs an array 'x' (or 'images'); has {sorted(keys)}")
            y_key = "y" if "y" in keys else "labels" if "labels" in keys else None
            x = z[x_key]
            y = z[y_key] if y_key else None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not a readable .npz ({e})") from None
    return x, y


def resolve_data(src):
    """(representative, validation) data for ``src`` from the flags and the run config."""
    if FLAGS.npz:
        x, y = _npz_data(FLAGS.npz)
        return x[:FLAGS.num_calibration], (x[:FLAGS.num_examples],
                                           None if y is None else y[:FLAGS.num_examples])
    cfg = src.config
    name = FLAGS.dataset or cfg.get("dataset")
    if not name:
        return None, None
    from tfq.export import source

    data_dir = FLAGS.data_dir if FLAGS.data_dir is not None else cfg.get("data_dir")
    split = FLAGS.split or cfg.get("eval_split") or "test"
    image_size = tuple(src.model.input_shape[1:3])
    mean = src.mean
    if mean is None and cfg.get("mean") == "none":
        mean = "none"
    common = dict(data_dir=data_dir, image_size=image_size, mean=mean)
    if not FLAGS.dataset:  # the run's own data: its options, and its holdout and subsets
        common.update(options=dict(cfg.get("data_options") or []),
                      holdout=cfg.get("holdout") or 0, train_limit=cfg.get("train_limit"),
                      seed=cfg.get("seed") or 0)
    val = source.dataset_arrays(name, split, num_examples=FLAGS.num_examples, **common)
    rep_x, _ = source.dataset_arrays(name, FLAGS.calibration_split,
                                     num_examples=FLAGS.num_calibration, **common)
    return rep_x, val


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # the converter's INFO lines bury the report
    try:
        check_flags()
    except FlagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import json

    from tfq.export import api, report, source

    try:
        src = source.load(FLAGS.model)
        rep, val = resolve_data(src)
        result = api.export_model(
            src, FLAGS.out_dir,
            representative_data=rep, validation_data=val, int8=FLAGS.int8,
            io_dtype="uint8" if FLAGS.uint8 else "int8", packed=FLAGS.packed,
            threads=FLAGS.threads, runs=FLAGS.runs, warmup=FLAGS.warmup,
            check_edgetpu=FLAGS.edgetpu, isolate=FLAGS.isolate)
    except source.ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if FLAGS.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(report.format_table(result))
    return 0


if __name__ == "__main__":
    app.run(main)
