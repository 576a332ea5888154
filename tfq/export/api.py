"""``export_model``: one call from a tfq model to deployable files and a report."""

from __future__ import annotations

import json
import numbers
import os
import shutil
import tempfile

import numpy as np

from tfq import precision as tfq_precision
from tfq.export import evaluate, packed, report as report_lib, runtime, source, tflite
from tfq.export import int8 as int8_lib
from tfq.export.graph import UnsupportedModelError, lower
from tfq.export.source import ExportError

EDGETPU_MODES = ("require", "report", "off")
MAX_CALIBRATION = 1000  # representative examples used for int8 ranges


def _check_args(io_dtype, threads, runs, warmup, check_edgetpu):
    if io_dtype not in ("int8", "uint8"):
        raise ExportError(f"io_dtype must be 'int8' or 'uint8'; got {io_dtype!r}")
    for name, value, low in (("threads", threads, 1), ("runs", runs, 0), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ExportError(f"{name} must be an int >= {low}; got {value!r}")
    mode = {True: "require", False: "off"}.get(check_edgetpu, check_edgetpu)
    if mode not in EDGETPU_MODES:
        raise ExportError(f"check_edgetpu must be True, False or one of {EDGETPU_MODES}; "
                          f"got {check_edgetpu!r}")
    return mode


def _prepare_out_dir(out_dir):
    """Creates ``out_dir`` and a staging folder inside it (proves it is writable)."""
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"{out_dir}: exists and is not a directory")
    try:
        os.makedirs(out_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix=".tfq-export-", dir=out_dir)
    except OSError as e:
        raise ExportError(f"{out_dir}: cannot write there ({e.strerror or e})") from None


def _precision(model):
    try:
        p = tfq_precision.get_precision(model)
        return {"w_bits": p.w_bits, "a_bits": p.a_bits, "precision": str(p)}
    except ValueError:
        return {"w_bits": None, "a_bits": None, "precision": "mixed"}


def _input_quant(graph):
    for node in graph:
        if node.kind == "input_quant":
            return node.params["bits"], node.params["low"], node.params["high"]
    return None


def _calibrate(model, graph, rep_x, val_x, notes):
    required, optional = tflite.required_stats(graph)
    if required and rep_x is None:
        raise ExportError(
            "int8 export of this model needs representative_data: these layers have "
            "full-precision (calibrated) outputs: " + ", ".join(required[:8])
            + (" ..." if len(required) > 8 else ""))
    stats = {}
    if rep_x is not None:
        stats = tflite.calibration_stats(model, required + optional, rep_x[:MAX_CALIBRATION])
    elif optional and val_x is not None:
        stats = tflite.calibration_stats(model, optional, val_x[:MAX_CALIBRATION])
        notes.append("no representative data: the int8 logit range was calibrated on the "
                     "validation data")
    return stats


def _edgetpu(int8_bytes, mode, staging):
    if mode == "off" or int8_bytes is None:
        return None, {"skipped": "not requested" if mode == "off" else "no int8 model"}
    try:
        from tfq.export import edgetpu
    except ImportError as e:
        return None, {"skipped": f"tfq.export.edgetpu is not available ({e})"}
    compiler_dir = os.path.join(staging, "edgetpu") if shutil.which("edgetpu_compiler") else None
    rep = edgetpu.check(int8_bytes, compiler_out_dir=compiler_dir)
    if mode == "require" and not rep.compatible:
        raise ExportError("the int8 model is not Edge TPU compatible (pass check_edgetpu="
                          "'report' to export anyway):\n  - " + "\n  - ".join(rep.problems))
    return rep, dict(rep.to_dict(), table=rep.format_table())


def _write(staging, name, data):
    path = os.path.join(staging, name)
    with open(path, "wb") as f:
        f.write(data)
    return name


def export_model(model_or_path, out_dir, *, representative_data=None, validation_data=None,
                 int8=True, io_dtype="int8", packed=False, threads=1, runs=50, warmup=5,
                 check_edgetpu=True, isolate=False, num_examples=None):
    """Exports a tfq model to float / int8 TFLite (and packed weights) with a report.

    Files written to ``out_dir`` (named after the model file, or the model):
    ``<name>_float.tflite``, ``<name>_int8.tflite`` (``_uint8`` with uint8 I/O),
    ``<name>.tfqpack`` (``packed=True``) and ``<name>_export.json`` (the report).
    Nothing is written unless every step succeeds: files are assembled in a hidden
    staging folder inside ``out_dir`` and moved into place at the end.

    Args:
      model_or_path: a Keras model, a ``.keras`` file, a training ``model_dir``
        (``results.json`` names the final model) or a ``source.ModelSource``.
      out_dir: output folder (created).
      representative_data: images (array, ``(images, labels)`` or a dataset) for the
        int8 ranges of full-precision parts; required for models with 32-bit
        activations. k-bit models need none (their logit range then comes from this,
        else from ``validation_data``, else from the weights).
      validation_data: images and labels for the agreement figures (optional).
      int8: also produce the full-integer model.
      io_dtype: ``"int8"`` or ``"uint8"`` input / output tensors of the int8 model.
      packed: also write the packed k-bit weights.
      threads: LiteRT interpreter threads for the latency figures.
      runs: timed runs per model (0: no latency measurement).
      warmup: untimed runs before the timed ones.
      check_edgetpu: True / "require" (fail when the int8 model cannot run entirely
        on the Edge TPU), "report" (check and report only), False / "off".
      isolate: run the TFLite conversions in a child process (the converter leaks
        memory on every call; use it when exporting many models in one process).
      num_examples: use at most this many validation / representative examples.

    Returns:
      The report (dict; also written as JSON): ``model``, ``files``, ``sizes``,
      ``latency``, ``agreement``, ``int8`` (construction details per layer),
      ``edgetpu``, ``targets``.

    Raises:
      ExportError: bad arguments, not a tfq model, unsupported layers, missing
        representative data, an Edge TPU incompatible model in "require" mode, an
        unwritable ``out_dir``.
    """
    mode = _check_args(io_dtype, threads, runs, warmup, check_edgetpu)
    src = model_or_path if isinstance(model_or_path, source.ModelSource) \
        else source.load(model_or_path)
    model = src.model
    rep_x, _ = source.as_arrays(representative_data, num_examples, "representative_data")
    val_x, val_y = source.as_arrays(validation_data, num_examples, "validation_data")
    in_shape = tuple(model.input_shape[1:])
    for what, x in (("representative_data", rep_x), ("validation_data", val_x)):
        if x is not None and tuple(x.shape[1:]) != in_shape:
            raise ExportError(f"{what}: images of shape {x.shape[1:]}, the model takes "
                              f"{in_shape}")
    try:
        graph = lower(model)
    except UnsupportedModelError as e:
        raise ExportError(f"{src.path or model.name}: {e}") from None
    staging = _prepare_out_dir(out_dir)
    try:
        result = _export(src, graph, staging, rep_x, val_x, val_y, int8=int8,
                         io_dtype=io_dtype, packed_weights=packed, threads=threads, runs=runs,
                         warmup=warmup, mode=mode, isolate=isolate)
        files = {}
        for key, name in result.pop("_staged").items():
            final = os.path.join(out_dir, name)
            if os.path.isdir(os.path.join(staging, name)):
                shutil.rmtree(final, ignore_errors=True)
            os.replace(os.path.join(staging, name), final)
            files[key] = final
        result["files"] = files
        report_path = os.path.join(out_dir, f"{src.stem}_export.json")
        with open(os.path.join(staging, "report.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=_json_default)
        os.replace(os.path.join(staging, "report.json"), report_path)
        result["files"]["report"] = report_path
        return result
    except OSError as e:
        raise ExportError(f"{out_dir}: writing the export failed ({e})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _export(src, graph, staging, rep_x, val_x, val_y, *, int8, io_dtype, packed_weights,
            threads, runs, warmup, mode, isolate):
    model = src.model
    notes = []
    stats = _calibrate(model, graph, rep_x, val_x, notes) if int8 else None
    try:
        if isolate:
            float_bytes, int8_bytes, info = tflite.convert_isolated(
                graph, stats, io_dtype if int8 else None)
        else:
            float_bytes = tflite.float_tflite(graph)
            int8_bytes, info = tflite.int8_tflite(graph, stats, io_dtype) if int8 else (None,
                                                                                          None)
    except int8_lib.NeedsData as e:
        raise ExportError(str(e)) from None
    except (tflite.ConversionError, UnsupportedModelError) as e:
        raise ExportError(f"{src.path or model.name}: {e}") from None
    etpu, etpu_dict = _edgetpu(int8_bytes, mode, staging)
    stem = src.stem
    staged = {"float": _write(staging, f"{stem}_float.tflite", float_bytes)}
    if int8_bytes is not None:
        staged["int8"] = _write(staging, f"{stem}_{io_dtype}.tflite", int8_bytes)
    if etpu is not None and etpu.compiler is not None and \
            os.path.isdir(os.path.join(staging, "edgetpu")):
        staged["edgetpu"] = "edgetpu"
    sizes = {"float_bytes": len(float_bytes),
             "float_weight_bytes": packed.float_weight_bytes(model)}
    if int8_bytes is not None:
        sizes["int8_bytes"] = len(int8_bytes)
        sizes["int8_over_float"] = len(int8_bytes) / len(float_bytes)
    if packed_weights:
        data = packed.encode(model)
        staged["packed"] = _write(staging, f"{stem}.tfqpack", data)
        sizes["packed_bytes"] = len(data)
        # The weights: the file without the architecture config (compressed JSON).
        sizes["packed_weight_bytes"] = len(data) - packed.config_bytes(data)
        sizes["packed_over_float_weights"] = (sizes["packed_weight_bytes"]
                                              / sizes["float_weight_bytes"])
        sizes["packed_file_over_float_weights"] = len(data) / sizes["float_weight_bytes"]
    input_quant = _input_quant(graph)
    latency = {}
    if runs:
        files = {"float": float_bytes}
        if int8_bytes is not None:
            files["int8"] = int8_bytes
        latency = runtime.latency_compare(files, threads=threads, runs=runs, warmup=warmup,
                                          input_quant=input_quant)
        if int8_bytes is not None:
            latency["int8_over_float"] = (latency["int8"]["median_ms"]
                                          / latency["float"]["median_ms"])
    prec = _precision(model)
    result = {
        "model": {"name": model.name, "source": src.path, "model_dir": src.model_dir,
                  "input_shape": list(model.input_shape[1:]), **prec,
                  "num_params": int(model.count_params())},
        "sizes": sizes, "latency": latency,
    }
    if val_x is not None:
        result["agreement"] = evaluate.agreement(
            model, graph, val_x, val_y, float_bytes=float_bytes, int8_bytes=int8_bytes,
            input_quant=input_quant, threads=threads)
    if int8_bytes is not None:
        details = runtime.Runner(int8_bytes)
        result["int8"] = {
            "io_dtype": io_dtype,
            "input": _qparams(details.inp), "output": _qparams(details.out),
            "layers": info["layers"], "notes": notes + info["notes"],
            "input_quantizer": list(input_quant) if input_quant else None,
        }
    result["edgetpu"] = etpu_dict
    result["targets"] = report_lib.targets(result)
    result["_staged"] = staged
    return result


def _qparams(detail):
    scale, zp = detail["quantization"]
    return {"dtype": np.dtype(detail["dtype"]).name, "scale": float(scale),
            "zero_point": int(zp), "shape": [int(d) for d in detail["shape"]]}

