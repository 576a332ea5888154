"""Float and int8 TFLite models of a tfq Keras model.

Both are converted from a TF function built from the exporter's graph
(``tfq.export.graph``), never from the Keras model itself:

* **float**: plain TF ops only. Weights are the k-bit weights already quantized
  (BatchNorm folded in), and the activation / input quantizers are written as
  ``floor(clip(x) * inv_scale + 0.5) * scale`` with the exact constants of TF's
  fake-quant kernel. A ``FakeQuant`` op would make the converter emit
  QUANTIZE / DEQUANTIZE pairs (INT4 below 5 bits), so none is used; the float model
  has no quantize or dequantize op and computes the Keras model's function.
* **int8**: see ``tfq.export.int8`` (fake-quant ranges chosen so that the 8-bit grid
  contains the k-bit grid, then the exact integer parameters are written into the
  converted flatbuffer and checked).

Both have a static input shape with batch 1. ``TFLiteConverter.convert`` leaks
memory on every call: ``convert_isolated`` runs a conversion in a child process,
for batch conversions (benchmarks, many models in one process).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfq.export import int8 as int8_lib
from tfq.export.graph import UnsupportedModelError


class ConversionError(RuntimeError):
    """The TFLite converter failed (its message is included)."""


# ------------------------------------------------------------------------ float


def _fake_quant_constants(bits, low, high):
    """(nudged_min, nudged_max, scale, inv_scale) float32, as TF's fake-quant kernel."""
    qmax = np.float32(2**bits - 1)
    scale, nudged = int8_lib.input_grid(bits, low, high)
    scale = np.float32(scale)
    nudged_min = np.float32(np.float32(0.0 - nudged) * scale)
    nudged_max = np.float32(np.float32(qmax - nudged) * scale)
    return nudged_min, nudged_max, scale, np.float32(np.float32(1.0) / scale)


def fake_quant_plain(x, bits, low, high, name=None):
    """TF's ``fake_quant_with_min_max_args`` forward pass in plain TF ops."""
    nmin, nmax, scale, inv = _fake_quant_constants(bits, low, high)
    shifted = tf.clip_by_value(x, nmin, nmax) - nmin
    levels = tf.floor(shifted * inv + np.float32(0.5))
    if nmin == 0:
        return tf.multiply(levels, scale, name=name)
    return tf.add(levels * scale, nmin, name=name)


def _float_act(x, act, tag=None):
    if act is None:
        return x
    if act.quantized:
        return fake_quant_plain(x, act.bits, 0.0, 1.0, name=tag)
    if act.fp == "relu":
        return tf.nn.relu(x)
    if act.fp == "clip":
        return tf.clip_by_value(x, 0.0, 1.0)
    return x


def _float_kernel(node):
    w = node.params["weights"].values.astype(np.float64) * node.params["scale"]
    return w.astype(np.float32), node.params["shift"].astype(np.float32)


def float_function(graph):
    """The float export graph as a ``tf.function`` with a batch-1 input signature.

    The op computing a node's k-bit activation is named ``int8.tag(i)`` (i: the
    node's position), so the tensor can be found in the converted model.
    """
    in_shape = graph[graph.input].shape
    tags = {name: int8_lib.tag(i) for i, name in enumerate(graph.nodes)}

    def emit(node, t, image):
        ins = [t[i] for i in node.inputs]
        kind = node.kind
        if kind == "input":
            return image
        if kind == "input_quant":
            return fake_quant_plain(ins[0], node.params["bits"], node.params["low"],
                                    node.params["high"])
        if kind == "conv":
            kernel, bias = _float_kernel(node)
            y = tf.nn.conv2d(ins[0], kernel, node.params["strides"], node.params["padding"],
                             dilations=node.params["dilation"])
            return _float_act(tf.nn.bias_add(y, bias), node.act, tags[node.name])
        if kind == "dense":
            kernel, bias = _float_kernel(node)
            return _float_act(tf.matmul(ins[0], kernel) + bias, node.act, tags[node.name])
        if kind == "add":
            return _float_act(ins[0] + ins[1], node.act, tags[node.name])
        if kind == "maxpool":
            return tf.nn.max_pool2d(ins[0], node.params["pool"], node.params["strides"],
                                    node.params["padding"])
        if kind == "avgpool":
            return tf.nn.avg_pool2d(ins[0], node.params["pool"], node.params["strides"],
                                    node.params["padding"])
        if kind == "gap":
            return tf.reduce_mean(ins[0], axis=[1, 2], keepdims=node.params["keepdims"])
        if kind == "flatten":
            return tf.reshape(ins[0], [1, -1])
        if kind == "softmax":
            return tf.nn.softmax(ins[0])
        if kind == "activation":
            return keras.activations.get(node.params["fn"])(ins[0])
        raise UnsupportedModelError(f"float export: cannot emit node kind {kind!r}")

    @tf.function(input_signature=[tf.TensorSpec(in_shape, tf.float32, name="image")],
                 autograph=False)
    def fn(image):
        t = {}
        for node in graph:
            t[node.name] = emit(node, t, image)
        return t[graph.output]

    return fn


def _run_converter(converter, what):
    try:
        with warnings.catch_warnings():
            # Expected: every tensor's range comes from a fake-quant op, not statistics.
            warnings.filterwarnings("ignore", "Statistics for quantized inputs were expected")
            return bytes(converter.convert())
    except Exception as e:  # the converter raises many types; keep its message
        raise ConversionError(f"TFLite conversion of the {what} model failed: {e}") from e


def float_tflite(graph):
    """Float TFLite bytes (no quantize / dequantize ops, batch 1)."""
    fn = float_function(graph)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    return _run_converter(converter, "float")


# ------------------------------------------------------------------------ int8


def int8_tflite(graph, stats, io_dtype="int8"):
    """Int8 TFLite bytes of ``graph`` and what the construction achieved.

    Args:
      graph: the lowered graph.
      stats: calibration statistics (``calibration_stats``), or None when the model
        needs none (``required_stats`` is empty).
      io_dtype: "int8" or "uint8" input and output tensors.

    Returns:
      (bytes, info dict: ``layers`` (per conv / FC layer: exact channels, weight
      encoding), ``notes``).

    Raises:
      int8.NeedsData: statistics are missing for some tensors.
    """
    if io_dtype not in ("int8", "uint8"):
        raise ValueError(f"io_dtype must be 'int8' or 'uint8'; got {io_dtype!r}")
    planner = int8_lib.Planner(graph, stats)
    if planner.missing:
        raise int8_lib.NeedsData(
            "int8 export needs representative data to calibrate these layer outputs: "
            + ", ".join(dict.fromkeys(planner.missing)))
    fn, tags = int8_lib.build_function(graph, planner)
    raw = _run_converter(_int8_converter(fn, io_dtype), "int8")
    data, layers = int8_lib.patch(raw, graph, planner, tags)
    return data, {"layers": [vars(r) for r in layers], "notes": planner.notes}


def _int8_converter(fn, io_dtype):
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
    # Every tensor carries a fake-quant range, so no representative dataset is needed
    # (TFLITE_BUILTINS_INT8 would demand one); float leftovers are caught by patch().
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    dtype = {"int8": tf.int8, "uint8": tf.uint8}[io_dtype]
    converter.inference_input_type = dtype
    converter.inference_output_type = dtype
    return converter


def required_stats(graph):
    """Layer outputs whose ranges int8 export calibrates.

    Returns:
      (required, optional): Keras layer names. ``required`` need representative
      data (full-precision activations); ``optional`` (the logits of a k-bit model)
      fall back to bounds derived from the weights.
    """
    planner = int8_lib.Planner(graph, None)
    return list(dict.fromkeys(planner.missing)), list(dict.fromkeys(planner.optional))


def calibration_stats(model, names, images, batch_size=64):
    """Min / max (and top-1 min / max for 2-D outputs) of layer outputs over ``images``.

    Args:
      model: the Keras model.
      names: layer names (``required_stats``).
      images: float32 array (N, H, W, C).
      batch_size: inference batch size.

    Returns:
      {name: {"min", "max", "top1_min", "top1_max", "top2_max"}} (top-k over the
      flattened output of each example).
    """
    if not names:
        return {}
    outputs = [model.get_layer(n).output for n in names]
    probe = keras.Model(model.input, outputs)
    stats = {n: {"min": np.inf, "max": -np.inf, "top1_min": np.inf, "top1_max": -np.inf,
                 "top2_max": -np.inf} for n in names}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        outs = probe([batch] if isinstance(probe.input, (list, tuple)) else batch,
                     training=False)
        if not isinstance(outs, (list, tuple)):
            outs = [outs]
        for n, o in zip(names, outs):
            o = np.asarray(keras.ops.convert_to_numpy(o))
            s = stats[n]
            s["min"] = min(s["min"], float(o.min()))
            s["max"] = max(s["max"], float(o.max()))
            flat = np.sort(o.reshape(len(o), -1), axis=1)
            s["top1_min"] = min(s["top1_min"], float(flat[:, -1].min()))
            s["top1_max"] = max(s["top1_max"], float(flat[:, -1].max()))
            second = flat[:, -2] if flat.shape[1] > 1 else flat[:, -1]
            s["top2_max"] = max(s["top2_max"], float(second.max()))
    return stats


# ------------------------------------------------------------------------ isolation


def convert_isolated(graph, stats=None, io_dtype="int8", timeout=3600):
    """Float and int8 conversions in a child process (the converter leaks memory).

    Returns:
      (float bytes, int8 bytes or None, int8 info or None); int8 is skipped when
      ``io_dtype`` is None.
    """
    with tempfile.TemporaryDirectory(prefix="tfq-convert-") as tmp:
        job = os.path.join(tmp, "job.pkl")
        out = os.path.join(tmp, "out.pkl")
        with open(job, "wb") as f:
            pickle.dump({"graph": graph, "stats": stats, "io_dtype": io_dtype}, f)
        proc = subprocess.run([sys.executable, "-m", "tfq.export.tflite", job, out],
                              capture_output=True, text=True, timeout=timeout,
                              env=_child_env())
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr or "").strip().splitlines()[-15:]
            raise ConversionError("conversion subprocess failed:\n" + "\n".join(tail))
        with open(out, "rb") as f:
            result = pickle.load(f)  # written by our own child process
    if isinstance(result, BaseException):
        raise result
    return result


def _child_env():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _worker(job_path, out_path):
    with open(job_path, "rb") as f:
        job = pickle.load(f)  # written by convert_isolated in the parent
    try:
        result = (float_tflite(job["graph"]),) + (
            int8_tflite(job["graph"], job["stats"], job["io_dtype"])
            if job["io_dtype"] else (None, None))
    except (UnsupportedModelError, ConversionError, int8_lib.NeedsData, ValueError,
            RuntimeError) as e:
        result = e
    with open(out_path, "wb") as f:
        pickle.dump(result, f)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
