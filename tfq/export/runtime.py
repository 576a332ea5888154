"""Running exported TFLite models with the LiteRT interpreter: outputs and latency."""

from __future__ import annotations

import time

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from tfq.export import int8 as int8_lib


def fake_quant_codes(x, bits, low, high):
    """Integer codes (0..2^bits-1) of TF's fake quant, in float32 exactly like TF."""
    qmax = np.float32(2**bits - 1)
    scale, nudged = int8_lib.input_grid(bits, low, high)
    scale = np.float32(scale)
    nmin = np.float32(np.float32(-nudged) * scale)
    nmax = np.float32(np.float32(qmax - nudged) * scale)
    inv = np.float32(np.float32(1.0) / scale)
    shifted = np.clip(np.asarray(x, np.float32), nmin, nmax) - nmin
    return np.floor(shifted * inv + np.float32(0.5)).astype(np.int64), nudged


class Runner:
    """One LiteRT interpreter on a model, fed float images.

    Args:
      model: ``.tflite`` path or bytes.
      threads: interpreter threads.
      input_quant: ``(bits, low, high)`` of the model's ``InputQuantizer``: integer
        inputs are then computed exactly as the Keras model quantizes them.
      preserve: keep intermediate tensors readable (``tensor``).
      delegates: apply LiteRT's default delegate (XNNPACK); False runs TFLite's own
        builtin kernels.
    """

    def __init__(self, model, *, threads=1, input_quant=None, preserve=False, delegates=True):
        kwargs = ({"model_path": model} if isinstance(model, str)
                  else {"model_content": bytes(model)})
        resolver = (OpResolverType.AUTO if delegates
                    else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        self.interp = Interpreter(num_threads=int(threads), experimental_op_resolver_type=resolver,
                                  experimental_preserve_all_tensors=preserve, **kwargs)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.outs = self.interp.get_output_details()
        self.out = self.outs[0]
        self.input_quant = input_quant

    @property
    def input_shape(self):
        return tuple(self.inp["shape"])

    def _encode(self, x):
        dtype = self.inp["dtype"]
        if dtype == np.float32:
            return x.astype(np.float32)
        scale, zp = self.inp["quantization"]
        info = np.iinfo(dtype)
        if self.input_quant is not None:
            codes, nudged = fake_quant_codes(x, *self.input_quant)
            q = codes - nudged + zp
        else:
            q = np.floor(np.asarray(x, np.float64) / scale + 0.5) + zp
        return np.clip(q, info.min, info.max).astype(dtype)

    def _decode(self, y, detail):
        if detail["dtype"] == np.float32:
            return y.astype(np.float32)
        scale, zp = detail["quantization"]
        return (y.astype(np.float32) - zp) * np.float32(scale)

    def run(self, image):
        """Raw values of every output for one image (H, W, C), batch dimension dropped."""
        self.interp.set_tensor(self.inp["index"], self._encode(image[None]))
        self.interp.invoke()
        return [self.interp.get_tensor(d["index"])[0].copy() for d in self.outs]

    def predict(self, images):
        """(first output dequantized (N, ...), [raw values of every output (N, ...)])."""
        raws = [self.run(image) for image in images]
        stacked = [np.stack([r[i] for r in raws]) for i in range(len(self.outs))]
        return self._decode(stacked[0], self.out), stacked


def _stats(times, runs, warmup, threads, delegates):
    t = np.asarray(times)
    return {"median_ms": float(np.median(t)), "mean_ms": float(t.mean()),
            "std_ms": float(t.std()), "min_ms": float(t.min()), "max_ms": float(t.max()),
            "runs": int(runs), "warmup": int(warmup), "threads": int(threads),
            "delegate": "XNNPACK (default)" if delegates else "none (builtin kernels)"}


def latency_compare(models, *, threads=1, runs=50, warmup=5, input_quant=None, seed=0,
                    delegates=True):
    """Latency of one inference of several models, like TFLite's ``benchmark_model``.

    Each model gets ``warmup`` untimed runs, then ``runs`` timed ``invoke`` calls on a
    fixed random input. The models' timed runs are interleaved (a, b, a, b, ...), so
    a shared machine's load changes affect them alike and their ratio stays fair.
    Times are in milliseconds. ``delegates=False`` measures TFLite's builtin kernels
    without the default XNNPACK delegate.

    Args:
      models: {name: ``.tflite`` path or bytes}.
      input_quant: ``(bits, low, high)`` for integer inputs (see ``Runner``).

    Returns:
      {name: dict(median_ms, mean_ms, std_ms, min_ms, max_ms, runs, warmup, threads,
      delegate)}.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0; got {runs}, {warmup}")
    runners = {}
    for name, model in models.items():
        r = Runner(model, threads=threads, input_quant=input_quant, delegates=delegates)
        x = np.random.default_rng(seed).uniform(-1, 1, r.input_shape).astype(np.float32)
        r.interp.set_tensor(r.inp["index"], r._encode(x))
        for _ in range(warmup):
            r.interp.invoke()
        runners[name] = r
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, r in runners.items():
            start = time.perf_counter()
            r.interp.invoke()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _stats(t, runs, warmup, threads, delegates) for name, t in times.items()}


def latency(model, **kwargs):
    """``latency_compare`` of one model: its stats dict."""
    return latency_compare({"model": model}, **kwargs)["model"]
