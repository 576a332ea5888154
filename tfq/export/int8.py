"""Full-integer int8 TFLite that reproduces a k-bit tfq network.

The TF graph given to the converter carries an 8-bit fake-quant range on every
tensor (never ``num_bits`` < 8: the converter would emit INT4), so the converter
produces the op structure and tensor scales; ``patch`` then writes the integer
weights, weight scales and biases computed here into the flatbuffer and checks
every tensor scale. The construction:

* **Input.** ``InputQuantizer`` fake-quantizes to 8 bits on [-1, 1]. TF's float32
  nudging puts the zero point at 127 of 255, so the values are ``q * 2/255`` for
  ``q`` in [-127, 128]: the int8 input tensor has scale 2/255 and zero point -1
  (uint8 I/O: 127) and holds every quantized input exactly.
* **k-bit activations** (``n = 2^k - 1``) are stored as ``6 * a``: scale ``6 / n``,
  zero point -128, so code ``-128 + i`` is the level ``i / n``. The producing
  conv / add gets a fused RELU6, whose clamp [0, 6] is exactly ``clip(a, 0, 1)``; the
  factor 6 is folded into the weights of the consumers.
* **Conv / FC + BatchNorm** are folded: the integer weights are the k-bit weight
  codes ``m`` (odd integers, ``|m| <= 2^k - 1``) times the largest integer ``t`` that
  int8 allows, with a per-channel scale. FC layers followed by BN become
  convolutions (per-channel scales, which the Edge TPU supports for CONV_2D but not
  for FULLY_CONNECTED).
* **Input codes scaled by u.** A k-bit input uses codes 0..n of the 256; a QUANTIZE
  op (int8 -> int8, scale / u, ``u = floor(255 / n)``) in front of each such conv
  multiplies them by ``u`` exactly, so the accumulator is ``t u A + B`` for the
  weighted sum ``A`` of the k-bit model.
* **Bias and multiplier** come from ``requant.solve``: per channel, an int32 bias and
  a multiplier that put every k-bit level boundary strictly between the same two
  reachable accumulators as exact arithmetic, checked against TFLite's fixed-point
  requantization (both rounding variants) and XNNPACK's float32 one. The int8
  layer then outputs exactly the k-bit levels. Up to 4 bits this succeeds for
  every channel fed by a k-bit activation (``t u >= 136``). The first conv is fed
  by the 8-bit input (``u = 1``), so its bias grid is only ``1 / t`` of a step of
  ``A``, and a channel whose thresholds leave less room than that has no exact
  solution (seen: 1 of 16 channels of a trained 4-bit conv, ``t = 8``; none for any
  bias within 400 steps of the ideal). At 5..7 bits ``t u`` is too small for
  31..127 boundaries in some channels. Such channels get the best effort (fewest
  wrong boundaries); the report counts them.
* **Residual Add** of a conv branch (no activation) and a k-bit activation (an
  identity shortcut): the branch is stored on the same grid (codes
  ``round(n y)``, zero point 0), and since the shortcut is on the grid,
  ``round(n (y + s)) = round(n y) + n s``: the ADD (equal scales) is exact.
  **Projection shortcuts** (two conv branches) become one CONV_2D over
  ``concat(main input, shortcut input[::s, ::s])`` (a 1x1 max pool picks the
  strided pixels) with the projection's weights at the centre tap, so both
  branches meet in one accumulator before any rounding; the projection's weights
  are rounded to the main branch's integer scale, so these layers are close to,
  not exactly, the k-bit model.
* **Global average pooling**: MEAN with output scale ``scale_in / (H W)`` when
  ``n H W <= 255`` (exact); otherwise the finest scale that covers [0, 1].
* **Classifier**: the ``Scalar`` is folded into the last FC layer (per-tensor
  weights ``m``); its int8 logits cover only what the arg-max and the int8
  probabilities need: from ln 256 below the smallest top-1 logit to ln(256 (C - 1))
  above the largest second logit seen on the representative data (clamping there
  changes no probability by more than one output step, ``logit_margins``).
  Softmax output: scale 1/256, zero point -128 (TFLite's fixed choice).
* **Full-precision parts** (FP models, pinned 32-bit layers, 32-bit activations,
  8-bit DoReFa weights that do not fit int8) use ordinary post-training
  quantization: per-channel max-abs weights and min/max ranges of the
  representative data.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow as tf
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from tfq.export import requant
from tfq.export.graph import UnsupportedModelError

ACT_REP = 6.0  # activation tensors hold 6 * a so that RELU6 is clip(a, 0, 1)
SOFTMAX_SCALE = 1.0 / 256.0


def logit_margins(classes):
    """(low, high) softmax units the int8 logits keep below the smallest top-1 logit and
    above the largest second logit.

    A logit raised to ``top - ln 256`` gets a probability of at most 1/256 (one int8
    output step); a top logit lowered to ``second + ln(256 (C - 1))`` loses at most
    1/256 of probability. So clamping there changes no output by more than a step.
    """
    return float(np.log(256.0)), float(np.log(256.0 * max(classes - 1, 1)))


_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


class NeedsData(ValueError):
    """Int8 export of this model needs representative data (names the tensors)."""


@dataclasses.dataclass
class QParams:
    """Int8 quantization of one tensor of the export graph.

    Attributes:
      scale, zp: int8 scale and zero point (``real = scale * (q - zp)``).
      rep: the TF graph holds ``rep * true value`` (6 for k-bit activations).
      grid: ``(sigma, lo, hi)`` when the true values are exactly ``sigma * i`` for
        integer codes ``i = q - zp`` in [lo, hi]; None when the tensor is approximate.
    """

    scale: float
    zp: int
    rep: float = 1.0
    grid: tuple | None = None

    @property
    def range(self):
        return (-128 - self.zp) * self.scale, (127 - self.zp) * self.scale


def _from_range(lo, hi, rep=1.0):
    """Ordinary asymmetric int8 params of [lo, hi] (widened to contain 0)."""
    lo, hi = min(float(lo) * rep, 0.0), max(float(hi) * rep, 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = (hi - lo) / 255.0
    zp = int(np.clip(np.round(-128 - lo / scale), -128, 127))
    return QParams(float(np.float32(scale)), zp, rep)


def input_grid(bits, low, high):
    """(scale, nudged zero point) of TF's fake quant on [low, high] with ``bits``."""
    qmax = 2**bits - 1
    scale = np.float32((np.float32(high) - np.float32(low)) / np.float32(qmax))
    zp_from_min = np.float32(0.0) - np.float32(low) / scale
    nudged = float(np.clip(np.floor(zp_from_min + 0.5) if zp_from_min >= 0
                           else -np.floor(-zp_from_min + 0.5), 0, qmax))
    return float(scale), int(nudged)


def _act_params(act):
    if act.quantized:
        n = act.levels
        return QParams(float(np.float32(ACT_REP / n)), -128, ACT_REP, (1.0 / n, 0, n))
    if act.fp == "clip":
        return QParams(float(np.float32(ACT_REP / 255.0)), -128, ACT_REP)
    return None  # relu / linear: calibrated


class Planner:
    """Assigns ``QParams`` to every node output (and the shapes of the int8 graph).

    Args:
      graph: the lowered ``Graph``.
      stats: {keras layer name: dict(min, max, top1_min, top1_max)} or None (then
        ``missing`` lists what calibration must provide).
    """

    def __init__(self, graph, stats):
        self.graph = graph
        self.stats = stats
        self.missing = []
        self.optional = []  # statistics that help but have a data-free fallback
        self.notes = []
        self.q = {}
        self.window = set()  # conv nodes stored on the k-bit grid for an exact Add
        self.clamped = set()  # conv nodes stored on [-1, 1] for an 8-bit Add
        self.merged = {}  # add name -> (main conv, projection conv) fused into one conv
        self.prescaled = {}  # conv-like node -> QParams of its rescaled input (see input_q)
        for node in graph:
            self.q[node.name] = self._plan(node)
        for node in graph:
            self._plan_prescale(node)
        skipped = {graph[n].keras_name for pair in self.merged.values() for n in pair}
        self.missing = [m for m in self.missing if m not in skipped]

    def _plan_prescale(self, node):
        """Input codes ``u * i`` for convs on a k-bit input: ``u``x finer accumulator.

        A k-bit activation uses codes 0..n of the 256 int8 codes. Requantizing it to
        scale ``s / u`` (``u = floor(255 / n)``, a RELU op that is the identity on these
        non-negative values) multiplies every code by ``u`` exactly; the conv's
        integer bias then has ``u`` times the resolution, which is what makes the
        level boundaries of 5..7-bit layers fit between the reachable accumulators.
        """
        if self.skipped(node.name):
            return
        if node.kind == "add" and node.name in self.merged:
            main = self.graph[self.merged[node.name][0]]
            src = self.q[main.inputs[0]]
        elif node.kind == "conv" or (node.kind == "dense" and dense_as_conv(self.graph, node)):
            if not node.params["weights"].exact_int8:
                return
            src = self.q[node.inputs[0]]
        else:
            return
        if src.grid is None or src.grid[1] != 0 or src.zp != -128:
            return
        u = 255 // src.grid[2]
        if u < 2:
            return
        sigma, _, hi = src.grid
        self.prescaled[node.name] = (
            QParams(float(np.float32(src.scale / u)), -128, src.rep, (sigma / u, 0, hi * u)), u)

    def input_q(self, node):
        """QParams of the k-bit tensor a conv-like node reads (before any prescaling)."""
        if node.name in self.merged:
            return self.q[self.graph[self.merged[node.name][0]].inputs[0]]
        return self.q[node.inputs[0]]

    def skipped(self, name):
        """True for conv nodes that live inside a merged residual conv."""
        return any(name in pair for pair in self.merged.values())

    # ---------------------------------------------------------------- helpers
    def _stat(self, node):
        if self.stats is None or node.keras_name not in self.stats:
            self.missing.append(node.keras_name)
            return None
        return self.stats[node.keras_name]

    def _calibrated(self, node, rep=1.0, nonneg=False):
        s = self._stat(node)
        if s is None:
            return QParams(1.0, 0, rep)
        return _from_range(0.0 if nonneg else s["min"], s["max"], rep)

    def _output_params(self, node):
        act = node.act
        if act is not None:
            p = _act_params(act)
            if p is not None:
                return p
            return self._calibrated(node, nonneg=act.fp == "relu")
        return None

    # ---------------------------------------------------------------- per kind
    def _plan(self, node):
        kind = node.kind
        if kind == "input":
            if all(u.kind == "input_quant" for u in self.graph.consumers(node.name)):
                return None
            return self._calibrated(node)
        if kind == "input_quant":
            scale, nudged = input_grid(node.params["bits"], node.params["low"],
                                       node.params["high"])
            qmax = 2 ** node.params["bits"] - 1
            return QParams(scale, nudged - 128, 1.0, (scale, -nudged, qmax - nudged))
        if kind in ("conv", "dense"):
            p = self._output_params(node)
            if p is not None:
                return p
            if self._is_logits(node):
                return self._logits(node)
            window = self._window_params(node)
            if window is not None:
                if window.grid is not None:
                    self.window.add(node.name)
                return window
            return self._calibrated(node, rep=self._add_rep(node))
        if kind == "add":
            p = self._output_params(node)
            if p is not None and p.grid is not None:
                pair = self._merge_pair(node)
                if pair is not None:
                    self.merged[node.name] = pair
            return p if p is not None else self._calibrated(node)
        if kind in ("maxpool", "avgpool", "flatten"):
            return dataclasses.replace(self.q[node.inputs[0]])
        if kind == "gap":
            return self._gap(node)
        if kind == "softmax":
            return QParams(SOFTMAX_SCALE, -128)
        if kind == "activation":
            return self._calibrated(node)
        raise UnsupportedModelError(f"int8 export: node {node.name!r} of kind {kind!r}")

    def _is_logits(self, node):
        if node.kind != "dense" or node.params.get("bn"):
            return False
        users = self.graph.consumers(node.name)
        return node.name == self.graph.output or (
            len(users) == 1 and users[0].kind == "softmax")

    def _logits(self, node):
        s = self._stat(node)
        if s is None:
            return self._logit_bounds(node)
        if node.name == self.graph.output:  # raw logits are the product: keep them all
            return _from_range(s["min"], s["max"])
        low, high = logit_margins(node.shape[-1])
        lo = max(s["min"], s["top1_min"] - low)
        hi = min(s["top1_max"], s["top2_max"] + high)
        pad = 0.03 * (hi - lo)  # headroom for inputs beyond the calibration data
        return _from_range(lo - pad, hi + pad)

    def _logit_bounds(self, node):
        """Logit range from the weights alone (no data): loose, hence a note."""
        src = self.q[node.inputs[0]]
        if src.grid is None:
            return QParams(1.0, 0)
        self.missing.pop()  # bounds replace the statistics
        self.optional.append(node.keras_name)
        sigma, lo_c, hi_c = src.grid
        w = node.params["weights"].values.astype(np.float64) * node.params["scale"]
        x_lo, x_hi = sigma * lo_c, sigma * hi_c
        top = np.maximum(w * x_hi, w * x_lo).sum(0) + node.params["shift"]
        bottom = np.minimum(w * x_hi, w * x_lo).sum(0) + node.params["shift"]
        self.notes.append(
            f"{node.keras_name}: no representative data, int8 logit range taken from "
            "weight bounds (coarse; agreement may suffer)")
        return _from_range(bottom.min(), top.max())

    def _merge_pair(self, add):
        """(main, projection) convs of a projection block that can become one conv.

        ``y + s`` of two conv branches has no exact int8 form as two tensors (each
        would be rounded); one CONV_2D over ``concat(y_input, s_input[::stride])``
        with the projection's weights at the centre tap accumulates both branches
        before rounding. Its only approximation: the projection's weights are
        rounded to integers on the main branch's weight scale (``t`` is chosen per
        channel to make that error small).
        """
        convs = [self.graph[i] for i in add.inputs]
        if len(convs) != 2 or any(
                c.kind != "conv" or c.act is not None
                or len(self.graph.consumers(c.name)) != 1 or np.any(c.params["scale"] == 0)
                or c.params["dilation"] != (1, 1) for c in convs):
            return None
        for main, proj in (convs, convs[::-1]):
            kh, kw = main.params["weights"].values.shape[:2]
            if (main.params["strides"] != (1, 1) or kh != kw or kh % 2 == 0
                    or (kh > 1 and main.params["padding"] != "SAME")):
                continue
            if proj.params["weights"].values.shape[:2] != (1, 1):
                continue
            q_main, q_proj = self.q[main.inputs[0]], self.q[proj.inputs[0]]
            if (q_main.grid is None or q_proj.grid is None or q_main.scale != q_proj.scale
                    or q_main.zp != q_proj.zp or q_main.rep != q_proj.rep
                    or q_main.grid != q_proj.grid):
                continue
            stride = proj.params["strides"]
            src = self.graph[proj.inputs[0]].shape
            if stride[0] != stride[1] or -(-src[1] // stride[0]) != main.shape[1] or \
                    -(-src[2] // stride[1]) != main.shape[2]:
                continue
            return main.name, proj.name
        return None

    def _add_rep(self, node):
        """An Add's inputs use the representation of its output (6 under a RELU6)."""
        users = self.graph.consumers(node.name)
        if len(users) == 1 and users[0].kind == "add":
            p = _act_params(users[0].act) if users[0].act is not None else None
            return p.rep if p is not None else 1.0
        return 1.0

    def _window_params(self, node):
        """Storage of a conv branch that feeds a residual Add with a k-bit output.

        When the other Add input is a k-bit activation on the same grid (an identity
        shortcut), the branch is stored on that grid (codes ``round(n y)``, zero point
        0), which keeps the Add exact for n <= 127. Otherwise (8-bit) it is stored on
        [-1, 1]: beyond that the clipped sum no longer depends on it.
        """
        if node.kind != "conv":
            return None
        users = self.graph.consumers(node.name)
        if len(users) != 1 or users[0].kind != "add":
            return None
        add = users[0]
        act = add.act
        if act is None or not act.quantized:
            return None
        other = [i for i in add.inputs if i != node.name]
        if len(other) != 1 or other[0] not in self.q:
            return None
        o = self.q[other[0]]
        n = act.levels
        if o.grid is None or o.rep != ACT_REP or abs(o.grid[0] * n - 1) > 1e-9:
            return None
        if n <= 127:
            return QParams(float(np.float32(ACT_REP / n)), 0, ACT_REP, (1.0 / n, -128, 127))
        self.clamped.add(node.name)
        return QParams(float(np.float32(2 * ACT_REP / 255)), 0, ACT_REP)

    def _gap(self, node):
        src = self.q[node.inputs[0]]
        h, w = self.graph[node.inputs[0]].shape[1:3]
        count = h * w
        if src.grid is not None and src.grid[1] == 0:
            sigma, _, hi = src.grid
            if hi * count <= 255:
                return QParams(float(np.float32(src.scale / count)), -128, src.rep,
                               (sigma / count, 0, hi * count))
            return QParams(float(np.float32(src.rep * sigma * hi / 255.0)), -128, src.rep)
        return self._calibrated(node, rep=src.rep)


# ------------------------------------------------------------------------ TF graph


def _fq(x, p):
    lo, hi = p.range
    return tf.quantization.fake_quant_with_min_max_args(x, min=lo, max=hi, num_bits=8)


def _tf_weights(node, q_in, q_out):
    """Float kernel / bias of a conv or dense in the TF graph's representation."""
    w = node.params["weights"]
    g = node.params["scale"]
    kernel = (w.values.astype(np.float64) * g * (q_out.rep / q_in.rep)).astype(np.float32)
    bias = (node.params["shift"] * q_out.rep).astype(np.float32)
    return kernel, bias


def _fq_weights(kernel, per_channel, whole=None):
    """Fake-quant weights (the range only has to make the converter emit int8; ``patch``
    writes the real values). ``whole``: the full kernel a per-tensor piece belongs to."""
    axes = tuple(range(kernel.ndim - 1))
    if per_channel:
        mx = np.maximum(np.abs(kernel).max(axis=axes), 1e-8).astype(np.float32)
        return tf.quantization.fake_quant_with_min_max_vars_per_channel(
            kernel, -mx, mx, num_bits=8, narrow_range=True)
    mx = float(max(np.abs(kernel if whole is None else whole).max(), 1e-8))
    return tf.quantization.fake_quant_with_min_max_vars(
        kernel, -mx, mx, num_bits=8, narrow_range=True)


def _has_fused(act):
    return act is not None and (act.quantized or act.fp != "linear")


def _fused(x, act):
    if not _has_fused(act):
        return x
    if act.quantized or act.fp == "clip":
        return tf.nn.relu6(x)
    return tf.nn.relu(x)


# The converter cannot fold the fake quant of a constant above ~2^25 elements
# (AlexNet's fc6 as a conv has 37.7M); larger kernels are split by output channel.
MAX_KERNEL_ELEMENTS = 2**24


def kernel_spans(shape):
    """Output-channel ranges [(start, end)] of the pieces a kernel is converted in."""
    cout = shape[-1]
    parts = max(1, -(-int(np.prod(shape)) // MAX_KERNEL_ELEMENTS))
    step = -(-cout // parts)
    return [(a, min(a + step, cout)) for a in range(0, cout, step)]


def part_tag(tag_, j):
    """Tag of piece ``j`` of a split kernel's op."""
    return tag_.replace("_out", f"p{j}_out")


def _weighted_op(x, kernel, bias, act, p, tag_, conv=None):
    """conv2d / matmul + bias + fused activation (+ concat of the pieces of a split kernel).

    Args:
      conv: (strides, padding, dilations) for a convolution, None for a matmul.
    """
    spans = kernel_spans(kernel.shape)
    outs = []
    for j, (a, b) in enumerate(spans):
        name = tag_ if len(spans) == 1 else part_tag(tag_, j)
        if conv is None:
            y = tf.matmul(x, _fq_weights(kernel[..., a:b], False, kernel), name=name)
        else:
            y = tf.nn.conv2d(x, _fq_weights(kernel[..., a:b], True), conv[0], conv[1],
                             dilations=conv[2], name=name)
        outs.append(_fq(_fused(tf.nn.bias_add(y, bias[a:b]), act), p))
    if len(outs) == 1:
        return outs[0]
    return _fq(tf.concat(outs, axis=-1, name=tag_), p)


def merged_kernel_shape(graph, planner, add):
    main, proj = (graph[n] for n in planner.merged[add.name])
    kh, kw, c1, cout = main.params["weights"].values.shape
    c0 = proj.params["weights"].values.shape[2]
    return kh, kw, c1 + c0, cout


def merged_float_kernel(graph, planner, add):
    """Float kernel / bias of a merged projection block (TF graph representation)."""
    main, proj = (graph[n] for n in planner.merged[add.name])
    p = planner.q[add.name]
    k_main, b_main = _tf_weights(main, planner.q[main.inputs[0]], p)
    k_proj, b_proj = _tf_weights(proj, planner.q[proj.inputs[0]], p)
    kh, kw = k_main.shape[:2]
    kernel = np.zeros(merged_kernel_shape(graph, planner, add), np.float32)
    kernel[:, :, :k_main.shape[2], :] = k_main
    kernel[kh // 2, kw // 2, k_main.shape[2]:, :] = k_proj[0, 0]
    return kernel, b_main + b_proj


def _emit_merged(graph, planner, add, t, tag_):
    main, proj = (graph[n] for n in planner.merged[add.name])
    p = planner.q[add.name]
    x_main = t[main.inputs[0]]
    x_proj = t[proj.inputs[0]]
    stride = proj.params["strides"][0]
    if stride > 1:
        # A 1x1 max pool with the projection's stride picks x[::s, ::s] (what a 1x1
        # 'same' / 'valid' conv reads); the Edge TPU maps it, unlike a strided slice.
        x_proj = tf.nn.max_pool2d(x_proj, 1, stride, "VALID")
        x_proj = _fq(x_proj, planner.q[proj.inputs[0]])
    x = _fq(tf.concat([x_main, x_proj], axis=3), planner.q[main.inputs[0]])
    kernel, bias = merged_float_kernel(graph, planner, add)
    return _weighted_op(x, kernel, bias, add.act, p, tag_, conv=(1, main.params["padding"], 1))


def tag(i):
    """Name of the TF op that computes node ``i`` (found again by ``find_ops``)."""
    return f"n{i}_out"


def dense_as_conv(graph, node):
    """True when a dense node becomes a CONV_2D (per-channel scale or an activation)."""
    return node.kind == "dense" and (node.params.get("bn") or node.act is not None or
                                     not np.allclose(node.params["scale"],
                                                     node.params["scale"][0]))


def build_function(graph, planner):
    """The TF function (batch 1) with fake-quant ranges on every tensor.

    Returns:
      (tf.function, {node name: tag}) where the tag names the node's last TF op.
    """
    q = planner.q
    names = list(graph.nodes)
    tags = {name: tag(i) for i, name in enumerate(names)}
    in_shape = graph[graph.input].shape

    def emit(node, t):
        if planner.skipped(node.name):
            return None
        tag_ = tags[node.name]
        p = q[node.name]
        ins = [t[i] for i in node.inputs]
        kind = node.kind
        if kind == "input":
            image = ins_input[0]
            users = graph.consumers(node.name)
            if all(u.kind == "input_quant" for u in users):
                return image  # the InputQuantizer's range is the input's quantization
            return _fq(image, p)
        if kind == "input_quant":
            return _fq(ins[0], p)
        if kind == "conv":
            kernel, bias = _tf_weights(node, q[node.inputs[0]], p)
            # The tag goes on the conv itself: a zero bias add is folded away, but the
            # fused op's output keeps the names of everything fused into it.
            return _weighted_op(ins[0], kernel, bias, node.act, p, tag_, conv=(
                node.params["strides"], node.params["padding"], node.params["dilation"]))
        if kind == "dense":
            src = graph[node.inputs[0]]
            q_in = q[node.inputs[0]]
            kernel, bias = _tf_weights(node, q_in, p)
            if dense_as_conv(graph, node):
                x = ins[0]
                if src.kind == "flatten" and len(graph[src.inputs[0]].shape) == 4:
                    x = t[src.inputs[0]]
                    k4 = kernel.reshape(graph[src.inputs[0]].shape[1:] + (kernel.shape[-1],))
                else:
                    x = tf.reshape(x, [1, 1, 1, -1]) if x.shape.rank != 4 else x
                    k4 = kernel.reshape((1, 1) + kernel.shape)
                return _weighted_op(x, k4, bias, node.act, p, tag_, conv=(1, "VALID", 1))
            x = ins[0]
            if x.shape.rank != 2:
                x = _fq(tf.reshape(x, [1, -1]), q_in)
            return _weighted_op(x, kernel, bias, None, p, tag_)
        if kind == "add" and node.name in planner.merged:
            return _emit_merged(graph, planner, node, t, tag_)
        if kind == "add":
            a, b = (x if q[i].rep == p.rep else x * np.float32(p.rep / q[i].rep)
                    for x, i in zip(ins, node.inputs))
            y = tf.add(a, b, name=tag_)
            return _fq(_fused(y, node.act), p)
        if kind == "maxpool":
            return _fq(tf.nn.max_pool2d(ins[0], node.params["pool"], node.params["strides"],
                                        node.params["padding"], name=tag_), p)
        if kind == "avgpool":
            return _fq(tf.nn.avg_pool2d(ins[0], node.params["pool"], node.params["strides"],
                                        node.params["padding"], name=tag_), p)
        if kind == "gap":
            return _fq(tf.reduce_mean(ins[0], axis=[1, 2], keepdims=node.params["keepdims"],
                                      name=tag_), p)
        if kind == "flatten":
            x = ins[0]
            return _fq(tf.reshape(x, [1, -1], name=tag_), p)
        if kind == "softmax":
            x = ins[0]
            if x.shape.rank != 2:
                x = tf.reshape(x, [1, -1])
            return _fq(tf.nn.softmax(x, name=tag_), p)
        if kind == "activation":
            import keras  # local: keras activations by name

            fn = keras.activations.get(node.params["fn"])
            return _fq(tf.identity(fn(ins[0]), name=tag_), p)
        raise UnsupportedModelError(f"int8 export: cannot emit {kind!r}")

    ins_input = []

    @tf.function(input_signature=[tf.TensorSpec(in_shape, tf.float32, name="image")],
                 autograph=False)
    def fn(image):
        ins_input[:] = [image]
        t = {}
        for node in graph:
            t[node.name] = emit(node, t)
        out = t[graph.output]
        if out.shape.rank != len(graph[graph.output].shape):
            out = tf.reshape(out, graph[graph.output].shape)
        return out

    return fn, tags




# ------------------------------------------------------------------------ patching


@dataclasses.dataclass
class LayerResult:
    """What ``patch`` did to one conv / FC layer."""

    name: str
    op: str
    exact: bool            # every channel gives exact k-bit levels (XNNPACK at least)
    channels: int
    exact_channels: int    # exact with every TFLite requantization variant
    exact_channels_xnnpack: int  # exact with XNNPACK / single-rounding requantization
    weights: str           # how the int8 weights were made


def _ensure_bias(model, op, channels):
    """Adds an int32 bias tensor to a CONV_2D / FULLY_CONNECTED the converter left without
    one (it drops all-zero biases); the exact construction always needs one."""
    if len(op.inputs) > 2 and op.inputs[2] >= 0:
        return
    sg = model.subgraphs[0]
    model.buffers.append(schema.BufferT())
    t = schema.TensorT()
    t.shape = np.array([channels], np.int32)
    t.type = schema.TensorType.INT32
    t.buffer = len(model.buffers) - 1
    t.name = b"tfq_bias"
    t.quantization = schema.QuantizationParametersT()
    sg.tensors.append(t)
    inputs = list(op.inputs) + [-1] * (3 - len(op.inputs))
    inputs[2] = len(sg.tensors) - 1
    op.inputs = np.array(inputs, np.int32)


def _set_buffer(model, tensor, array, owners):
    data = np.ascontiguousarray(array).tobytes()
    if owners.get(tensor.buffer, 0) > 1:  # shared constant: give this tensor its own buffer
        owners[tensor.buffer] -= 1
        buf = schema.BufferT()
        model.buffers.append(buf)
        tensor.buffer = len(model.buffers) - 1
        owners[tensor.buffer] = 1
    model.buffers[tensor.buffer].data = np.frombuffer(data, np.uint8)


def _write_weights(model, owners, w_t, b_t, w_arr, s_w, bias, s_in, name):
    if tuple(w_arr.shape) != tuple(int(d) for d in w_t.shape):
        raise RuntimeError(f"int8 export: weight shape mismatch for {name}: "
                           f"{w_arr.shape} vs {tuple(w_t.shape)}")
    if np.abs(w_arr).max(initial=0) > 127:
        raise RuntimeError(f"int8 export: weights of {name} out of int8 range")
    _set_buffer(model, w_t, w_arr.astype(np.int8), owners)
    w_t.quantization.scale = np.asarray(s_w, np.float32).reshape(-1)
    w_t.quantization.zeroPoint = np.zeros(w_t.quantization.scale.shape, np.int64)
    _set_buffer(model, b_t, np.asarray(bias, np.int64).astype(np.int32), owners)
    b_t.quantization.scale = (np.float32(s_in) * np.asarray(s_w, np.float32)).reshape(-1)
    b_t.quantization.zeroPoint = np.zeros(b_t.quantization.scale.shape, np.int64)


def _patch_input(model, graph, planner):
    """Gives the model input exactly the InputQuantizer's grid (the converter may pick
    a zero point one off, which would clip the lowest code)."""
    users = graph.consumers(graph.input)
    if len(users) != 1 or users[0].kind != "input_quant":
        return
    p = planner.q[users[0].name]
    sg = model.subgraphs[0]
    tensor = sg.tensors[sg.inputs[0]]
    targets = [(tensor, 0)]
    if tensor.type == schema.TensorType.UINT8:
        targets[0] = (tensor, 128)
        for op in sg.operators:
            if op.inputs[0] == sg.inputs[0] and _op_name(model, op) == "QUANTIZE":
                targets.append((sg.tensors[op.outputs[0]], 0))
    elif tensor.type != schema.TensorType.INT8:
        raise RuntimeError(f"int8 export: the model input has type {tensor.type}")
    for t, shift in targets:
        t.quantization.scale = np.array([p.scale], np.float32)
        t.quantization.zeroPoint = np.array([p.zp + shift], np.int64)


def _kernel_shape(graph, planner, node):
    """Keras-layout (HWIO / IO) shape of the kernel a conv-like node is emitted with."""
    if node.name in planner.merged:
        return merged_kernel_shape(graph, planner, node)
    shape = node.params["weights"].values.shape
    if node.kind == "conv" or not dense_as_conv(graph, node):
        return shape
    src = graph[node.inputs[0]]
    if src.kind == "flatten" and len(graph[src.inputs[0]].shape) == 4:
        return graph[src.inputs[0]].shape[1:] + (shape[-1],)
    return (1, 1) + shape


def _insert_requantize(model, op, p, cache):
    """Puts a QUANTIZE (int8 -> int8, scale ``p.scale``) in front of ``op``'s input 0.

    ``cache`` maps (source tensor, scale) to a QUANTIZE output already made, which is
    reused (the pieces of a split kernel read the same input)."""
    sg = model.subgraphs[0]
    key = (int(op.inputs[0]), p.scale)
    if key in cache:
        op.inputs[0] = cache[key]
        return
    src = sg.tensors[op.inputs[0]]
    if src.type != schema.TensorType.INT8:
        raise RuntimeError(f"int8 export: input of {src.name!r} is not int8")
    code = next((i for i, c in enumerate(model.operatorCodes)
                 if max(c.builtinCode, c.deprecatedBuiltinCode) == schema.BuiltinOperator.QUANTIZE),
                None)
    if code is None:
        oc = schema.OperatorCodeT()
        oc.builtinCode = schema.BuiltinOperator.QUANTIZE
        oc.deprecatedBuiltinCode = schema.BuiltinOperator.QUANTIZE
        oc.version = 1  # int8 -> int8 requantization
        model.operatorCodes.append(oc)
        code = len(model.operatorCodes) - 1
    model.buffers.append(schema.BufferT())
    t = schema.TensorT()
    t.shape = np.array(src.shape, np.int32)
    t.type = schema.TensorType.INT8
    t.buffer = len(model.buffers) - 1
    name = src.name.decode() if isinstance(src.name, bytes) else str(src.name)
    t.name = (name + "/tfq_prescaled").encode()
    t.quantization = schema.QuantizationParametersT()
    t.quantization.scale = np.array([p.scale], np.float32)
    t.quantization.zeroPoint = np.array([p.zp], np.int64)
    sg.tensors.append(t)
    new = schema.OperatorT()
    new.opcodeIndex = code
    new.inputs = np.array([op.inputs[0]], np.int32)
    new.outputs = np.array([len(sg.tensors) - 1], np.int32)
    new.builtinOptionsType = schema.BuiltinOptions.QuantizeOptions
    new.builtinOptions = schema.QuantizeOptionsT()
    sg.operators.insert(sg.operators.index(op), new)
    op.inputs[0] = len(sg.tensors) - 1
    cache[key] = op.inputs[0]


def _op_name(model, op):
    code = model.operatorCodes[op.opcodeIndex]
    return _OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")


def find_ops(model, tags):
    """{tag: op index} of the ops whose output tensor carries a node tag."""
    sg = model.subgraphs[0]
    found = {}
    pattern = re.compile(r"^(n\d+(?:p\d+)?_out)\d*$")
    for i, op in enumerate(sg.operators):
        for t in op.outputs:
            name = sg.tensors[t].name.decode() if isinstance(sg.tensors[t].name, bytes) \
                else str(sg.tensors[t].name)
            for token in name.split(";"):
                m = pattern.match(token.split("/")[0])
                if m and m.group(1) in tags:
                    found.setdefault(m.group(1), i)
    return found


def _reach(codes_signed, grid):
    """Reachable range of A = sum(m' * i) per output channel (m' in kernel layout)."""
    _, lo, hi = grid
    axes = tuple(range(codes_signed.ndim - 1))
    a_lo = np.minimum(codes_signed * lo, codes_signed * hi).sum(axis=axes)
    a_hi = np.maximum(codes_signed * lo, codes_signed * hi).sum(axis=axes)
    return a_lo, a_hi


def _layer_int_params(node, kernel_shape, q_in, q_out, s_in, s_out, window, per_tensor, u=1):
    """Integer weights (kernel layout), float32 scales, int32 bias and exact mask.

    Args:
      node: a conv / dense node.
      kernel_shape: the kernel shape in Keras layout (HWIO or IO).
      q_in, q_out: planned params of the input / output tensors.
      s_in, s_out: the input / output scales in the converted model.
      window: names of conv nodes stored on a grid for an exact Add.
      per_tensor: one weight scale for the whole kernel (FULLY_CONNECTED).
      u: the input codes are ``u`` times the k-bit codes (``Planner._plan_prescale``).
    """
    w = node.params["weights"]
    g = node.params["scale"].astype(np.float64)
    b = node.params["shift"].astype(np.float64)
    ratio = q_out.rep / q_in.rep
    cout = kernel_shape[-1]
    zero = g == 0
    if w.exact_int8:
        max_code = np.abs(w.codes).reshape(-1, cout).max(axis=0)
        if per_tensor:
            max_code = np.full(cout, max_code.max())
        t = np.maximum(127 // np.maximum(max_code, 1), 1).astype(np.int64)
        sign = np.where(g < 0, -1, 1)
        m_signed = w.codes.reshape(-1, cout).astype(np.int64) * sign
        ints = m_signed * t
        s_w = np.abs(g) * ratio / (w.levels * t)  # real weight per integer step
        how = "k-bit codes"
    else:
        real = (w.values.astype(np.float64) * g * ratio).reshape(-1, cout)
        amax = np.abs(real).max(axis=0)
        if per_tensor:
            amax = np.full(cout, amax.max())
        s_w = np.maximum(amax, 1e-12) / 127.0
        ints = np.clip(np.round(real / s_w), -127, 127).astype(np.int64)
        how = "max-abs int8"
    s_w = np.where(zero & ~np.bool_(per_tensor), 1.0, s_w)
    if per_tensor:
        s_w = np.full(cout, s_w.max())
    bias = np.round(b * q_out.rep / (np.float64(np.float32(s_in)) * s_w.astype(np.float32)))
    exact = np.zeros(cout, np.int64)
    can_fit = (w.exact_int8 and not per_tensor and q_in.grid is not None
               and q_out.grid is not None)
    if can_fit:
        n_out = round(1.0 / q_out.grid[0])
        levels = (-n_out + 1, n_out) if node.name in window else (1, n_out)
        c = np.where(zero, 1.0, n_out * np.abs(g) * q_in.grid[0] / w.levels)
        beta = n_out * b
        a_lo, a_hi = _reach(m_signed, q_in.grid)
        s_w_fit, B, tier = requant.solve(c, beta, t * u, a_lo, a_hi, levels, s_in, s_out)
        # Inexact channels still take the search's best effort (fewest wrong boundaries).
        s_w = np.where(zero, s_w, s_w_fit)
        bias = np.where(zero, bias, B)
        exact = np.where(zero, 2, tier)
        if zero.any():  # constant channels: weights 0, the bias alone gives the level
            level = np.clip(np.floor(beta + 0.5), levels[0] - 1, levels[1])
            unit = np.float64(np.float32(s_in)) / np.float64(np.float32(s_out))
            bias = np.where(zero, np.round(level / unit), bias)
            ints[:, zero] = 0
    bias = np.clip(bias, -requant.INT32_MAX, requant.INT32_MAX)
    return ints.reshape(kernel_shape), s_w.astype(np.float32), bias.astype(np.int64), exact, how


def _merged_int_params(graph, planner, add, s_in):
    """Integer params of a merged projection block (see ``Planner._merge_pair``)."""
    main, proj = (graph[n] for n in planner.merged[add.name])
    q_in, q_out = planner.input_q(add), planner.q[add.name]
    w1, w2 = main.params["weights"], proj.params["weights"]
    if not (w1.exact_int8 and w2.exact_int8):
        # Ordinary per-channel max-abs int8 of the combined kernel.
        kernel, shift = merged_float_kernel(graph, planner, add)
        flat = kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
        s_w = np.maximum(np.abs(flat).max(axis=0), 1e-12) / 127.0
        ints = np.clip(np.round(kernel / s_w), -127, 127).astype(np.int64)
        bias = np.round(shift / (np.float64(np.float32(s_in)) * s_w.astype(np.float32)))
        return ints, s_w.astype(np.float32), bias.astype(np.int64)
    g1, g2 = main.params["scale"], proj.params["scale"]
    cout = g1.size
    sign = np.where(g1 < 0, -1, 1)
    m1 = w1.codes.reshape(-1, cout).astype(np.int64) * sign
    m2 = w2.codes.reshape(-1, cout).astype(np.int64)
    r = (g2 / w2.levels) / (np.abs(g1) / w1.levels)  # projection step per main step
    q_max = np.maximum(127 // np.maximum(np.abs(m1).max(axis=0), 1), 1)
    q = np.arange(1, 128)[:, None, None]                        # (Q, 1, 1)
    vals = np.arange(1, w2.levels + 1, 2)[None, :, None]         # odd codes
    prod = q * r[None, None, :] * vals                           # (Q, V, C)
    err = np.abs(prod - np.round(prod)).max(axis=1) / q[:, 0]    # (Q, C)
    fits = (q[:, 0] <= q_max[None, :]) & (np.abs(prod).max(axis=1) <= 127.49)
    err = np.where(fits, err, np.inf)
    best = np.where(np.isfinite(err).any(axis=0), np.argmin(err, axis=0) + 1, 1)
    ints_main = m1 * best
    ints_proj = np.clip(np.round(m2 * best * r), -127, 127).astype(np.int64)
    kh, kw, _, _ = merged_kernel_shape(graph, planner, add)
    c1 = w1.values.shape[2]
    ints = np.zeros(merged_kernel_shape(graph, planner, add), np.int64)
    ints[:, :, :c1, :] = ints_main.reshape(kh, kw, c1, cout)
    ints[kh // 2, kw // 2, c1:, :] = ints_proj
    s_w = (q_out.rep / q_in.rep) * np.abs(g1) / (w1.levels * best)
    shift = main.params["shift"] + proj.params["shift"]
    bias = np.round(shift * q_out.rep / (np.float64(np.float32(s_in)) * s_w.astype(np.float32)))
    bias = np.clip(bias, -requant.INT32_MAX, requant.INT32_MAX)
    return ints, s_w.astype(np.float32), bias.astype(np.int64)


def patch(tflite_bytes, graph, planner, tags):
    """Writes the exact integer weights, scales and biases into the converted model.

    Every node output tensor gets the planned scale / zero point (the converter's
    differ by float rounding at most; anything else means the structure is not the
    expected one and raises). Each conv / FC layer then gets its integer weights,
    per-channel (CONV_2D) or per-tensor (FULLY_CONNECTED) scales and int32 bias.

    Returns:
      (patched bytes, [LayerResult]).
    """
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    sg = model.subgraphs[0]
    owners = {}
    for tensor in sg.tensors:
        owners[tensor.buffer] = owners.get(tensor.buffer, 0) + 1
    wanted = set(tags.values()) | {part_tag(t, j) for t in tags.values() for j in range(64)}
    # Op objects, not indices: inserted QUANTIZE ops shift the indices.
    found = {t: sg.operators[i] for t, i in find_ops(model, wanted).items()}
    results = []

    def set_q(tensor, p):
        quant = tensor.quantization
        if quant is None or quant.scale is None or len(quant.scale) != 1:
            raise RuntimeError(f"int8 export: tensor {tensor.name!r} is not per-tensor int8")
        old = float(quant.scale[0])
        if abs(old - p.scale) > 1e-5 * p.scale or int(quant.zeroPoint[0]) != p.zp:
            raise RuntimeError(
                f"int8 export: converter chose scale {old}, zero point {quant.zeroPoint[0]} "
                f"for {tensor.name!r}; planned {p.scale}, {p.zp}")
        quant.scale = np.array([p.scale], np.float32)

    # Tensor params first: the weight scales depend on the final input/output scales.
    op_of = {}
    for node in graph:
        tag = tags[node.name]
        if tag not in found:
            continue
        op = found[tag]
        op_of[node.name] = op
        out = sg.tensors[op.outputs[0]]
        if out.type == schema.TensorType.INT8:
            set_q(out, planner.q[node.name])
    _patch_input(model, graph, planner)
    requantized = {}
    for node in graph:
        merged = node.name in planner.merged
        if planner.skipped(node.name) or (node.kind not in ("conv", "dense") and not merged):
            continue
        k_shape = _kernel_shape(graph, planner, node)
        spans = kernel_spans(k_shape)
        op_tags = [tags[node.name]] if len(spans) == 1 else [
            part_tag(tags[node.name], j) for j in range(len(spans))]
        missing = [t for t in op_tags if t not in found]
        if missing:
            raise RuntimeError(f"int8 export: no TFLite op found for layer {node.keras_name}")
        ops = [found[t] for t in op_tags]
        opname = _op_name(model, ops[0])
        if opname not in ("CONV_2D", "FULLY_CONNECTED") or \
                any(_op_name(model, op) != opname for op in ops) or \
                (merged and opname != "CONV_2D"):
            raise RuntimeError(f"int8 export: {node.keras_name} became {opname}")
        for op in ops:
            if node.name in planner.prescaled:
                _insert_requantize(model, op, planner.prescaled[node.name][0], requantized)
            _ensure_bias(model, op, int(sg.tensors[op.inputs[1]].shape[0]))
            if len(ops) > 1:
                set_q(sg.tensors[op.outputs[0]], planner.q[node.name])
        s_in = float(sg.tensors[ops[0].inputs[0]].quantization.scale[0])
        s_out = float(sg.tensors[ops[0].outputs[0]].quantization.scale[0])
        per_tensor = opname == "FULLY_CONNECTED"  # the Edge TPU's FC: one weight scale
        if merged:
            ints, s_w, bias = _merged_int_params(graph, planner, node, s_in)
            exact, how = np.zeros(s_w.size, np.int64), "k-bit codes, projection shortcut merged"
        else:
            u = planner.prescaled.get(node.name, (None, 1))[1]
            ints, s_w, bias, exact, how = _layer_int_params(
                node, k_shape, planner.input_q(node), planner.q[node.name], s_in, s_out,
                planner.window, per_tensor, u)
        for (a, b), op in zip(spans, ops):
            w_t, b_t = sg.tensors[op.inputs[1]], sg.tensors[op.inputs[2]]
            piece = ints[..., a:b]
            w_arr = piece.T if per_tensor else np.transpose(piece, (3, 0, 1, 2))
            _write_weights(model, owners, w_t, b_t, w_arr, s_w[:1] if per_tensor else s_w[a:b],
                           bias[a:b], s_in, node.keras_name)
        results.append(LayerResult(node.keras_name, opname, bool((exact > 0).all()),
                                   int(exact.size), int((exact == 2).sum()),
                                   int((exact > 0).sum()), how))
    _check_integer_only(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), results


def _check_integer_only(model):
    """Raises if the converter left an op in float (it then wraps it in (de)quantize ops)."""
    sg = model.subgraphs[0]
    for op in sg.operators:
        name = _op_name(model, op)
        for i in list(op.inputs) + list(op.outputs):
            if i >= 0 and sg.tensors[i].type == schema.TensorType.FLOAT32:
                raise RuntimeError(f"int8 export: {name} op on tensor {sg.tensors[i].name!r} "
                                   "stayed float32 (no int8 kernel for it)")
