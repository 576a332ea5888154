"""Edge TPU readiness of a TFLite model, judged from the flatbuffer alone.

`edgetpu_compiler` cannot be installed everywhere (it is x86-64 Debian only and
not on PyPI), so :func:`check` reads the ``.tflite`` flatbuffer and applies the
rules of Edge TPU compiler 16 (16.0.384591198, July 2021, Edge TPU runtime 14):

* Coral's list of supported operations and their known limitations
  (https://coral.ai/docs/edgetpu/models-intro/#supported-operations, "Table 1";
  cross-checked against the transcription in github.com/Nishan052/AgentLake
  ``.claude/skills/npu-op-compat/references/edgetpu-ops.json`` and, for the
  runtime-13 additions, google-coral/edgetpu ``CHANGES.md``);
* Coral's model requirements (same page, "Model requirements"): 8-bit quantized
  tensors, static shapes, constant parameters, "If a tensor has more than 3
  dimensions, then only the 3 innermost dimensions may have a size greater
  than 1";
* the partitioning rule (same page, "Compiling"): "At the first point in the
  model graph where an unsupported operation occurs, the compiler partitions
  the graph into two parts ... Currently, the Edge TPU compiler cannot
  partition the model more than once, so as soon as an unsupported operation
  occurs, that operation and everything after it executes on the CPU".
  "After" is taken in the flatbuffer's execution order;
* float input/output (same page, "Float input and output tensors"): "the
  compiler leaves a quantize op at the beginning of your graph (which runs on
  the CPU). Likewise, the output is dequantized at the end." Such boundary ops
  run on the CPU without ending the Edge TPU segment;
* op versions: compiler 16 embeds a TFLite of the TF 2.5 era. Its op resolver
  rejects newer op versions and then refuses the whole model ("Didn't find op
  for builtin opcode 'CONV_2D' version '6' ... Model could not be parsed":
  google-coral/edgetpu#631 for CONV_2D v6, #879 for QUANTIZE v3, both with
  16.0.384591198; #384 shows compiler 15 rejecting RSQRT v2, a 2.5.0 version).
  The highest accepted version of each op is therefore the highest one whose
  minimum runtime in TensorFlow's
  ``tensorflow/lite/tools/versioning/runtime_version.cc`` is at most 2.5.0
  (this matches both reported rejections: CONV_2D v6 needs 2.9.0, QUANTIZE v3
  2.7.0; the meaning of each version is in ``op_version.cc`` next to it);
* dynamic shapes also make compiler 16 refuse the whole model ("Attempting to
  use a delegate that only supports static-sized tensors with a graph that has
  dynamic-sized tensors. Compilation failed": google-coral/edgetpu#831);
* per-channel FULLY_CONNECTED weights: TF 2.21 quantizes Dense layers
  per-channel by default, and the TF 2.5-era int8 FULLY_CONNECTED kernel of
  compiler 16 only knows per-tensor weights (tensorflow/tflite-micro#2602
  describes the same mismatch in TFLite Micro and the converter flag below).

What cannot be judged from the file (e.g. "Depending on input/output size, this
operation may not be mapped to the Edge TPU to avoid loss in precision", or
"Certain reshapes might not be mapped for large tensor sizes") is left to the
compiler: when `edgetpu_compiler` is on PATH, :func:`run_compiler` runs it and
parses its log, and :func:`check` attaches that result to the report.

Example::

    from tfq.export import edgetpu
    rep = edgetpu.check("model_int8.tflite")
    print(rep.format_table())
    edgetpu.ensure_compatible("model_int8.tflite")   # raises EdgeTpuIncompatible
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np

TfliteSource = Union[str, os.PathLike, bytes, bytearray, memoryview]

COMPILER_VERSION = "16.0"
"""The edgetpu_compiler release whose rules the static check applies."""

ON_CHIP_BYTES = 8 * 1024 * 1024
"""The Edge TPU's on-chip memory (~8 MB, coral.ai/docs/edgetpu/compiler,
"Parameter data caching"). The compiler also keeps other data there, so the
space it reports for parameters is somewhat smaller; its log is authoritative."""

# Coral's Table 1 (compiler 16 / runtime 14) in TFLite builtin names. UNIDIRECTIONAL_SEQUENCE_LSTM
# stands for the table's "LSTM: Unidirectional LSTM only".
_EDGETPU_OPS = frozenset({
    "ADD", "AVERAGE_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D", "EXPAND_DIMS",
    "FULLY_CONNECTED", "L2_NORMALIZATION", "LOGISTIC", "UNIDIRECTIONAL_SEQUENCE_LSTM", "MAXIMUM",
    "MAX_POOL_2D", "MEAN", "MINIMUM", "MUL", "PACK", "PAD", "PRELU", "QUANTIZE", "REDUCE_MAX",
    "REDUCE_MIN", "RELU", "RELU6", "RELU_N1_TO_1", "RESHAPE", "RESIZE_BILINEAR",
    "RESIZE_NEAREST_NEIGHBOR", "RSQRT", "SLICE", "SOFTMAX", "SPACE_TO_DEPTH", "SPLIT", "SQUEEZE",
    "STRIDED_SLICE", "SUB", "SUM", "SQUARED_DIFFERENCE", "TANH", "TRANSPOSE", "TRANSPOSE_CONV",
})

# Highest version of each builtin op whose minimum runtime in runtime_version.cc is <= 2.5.0,
# i.e. what compiler 16's TFLite can load (see the module docstring for the evidence).
_MAX_VERSION = {
    "ABS": 3, "ADD": 3, "ADD_N": 1, "ARG_MAX": 2, "ARG_MIN": 2, "AVERAGE_POOL_2D": 3,
    "BATCH_MATMUL": 4, "BATCH_TO_SPACE_ND": 3, "BIDIRECTIONAL_SEQUENCE_LSTM": 3,
    "BIDIRECTIONAL_SEQUENCE_RNN": 3, "BROADCAST_TO": 3, "CALL_ONCE": 1, "CAST": 1, "CEIL": 1,
    "COMPLEX_ABS": 1, "CONCATENATION": 3, "CONV_2D": 5, "CONV_3D": 1, "COS": 1, "CUMSUM": 1,
    "DENSIFY": 1, "DEPTH_TO_SPACE": 2, "DEPTHWISE_CONV_2D": 6, "DEQUANTIZE": 4, "DIV": 2,
    "ELU": 1, "EMBEDDING_LOOKUP": 3, "EMBEDDING_LOOKUP_SPARSE": 1, "EQUAL": 3, "EXP": 1,
    "EXPAND_DIMS": 1, "FAKE_QUANT": 2, "FILL": 3, "FLOOR": 1, "FLOOR_DIV": 2, "FLOOR_MOD": 1,
    "FULLY_CONNECTED": 9, "GATHER": 5, "GATHER_ND": 3, "GREATER": 2, "GREATER_EQUAL": 2,
    "HARD_SWISH": 1, "HASHTABLE": 1, "HASHTABLE_FIND": 1, "HASHTABLE_IMPORT": 1,
    "HASHTABLE_LOOKUP": 1, "HASHTABLE_SIZE": 1, "IF": 1, "IMAG": 1, "L2_NORMALIZATION": 2,
    "L2_POOL_2D": 1, "LEAKY_RELU": 2, "LESS": 2, "LESS_EQUAL": 2,
    "LOCAL_RESPONSE_NORMALIZATION": 1, "LOG": 1, "LOGICAL_AND": 1, "LOGICAL_NOT": 1,
    "LOGICAL_OR": 1, "LOGISTIC": 3, "LOG_SOFTMAX": 2, "LSH_PROJECTION": 1, "LSTM": 4,
    "MATRIX_DIAG": 1, "MATRIX_SET_DIAG": 1, "MAXIMUM": 4, "MAX_POOL_2D": 3, "MEAN": 3,
    "MINIMUM": 4, "MIRROR_PAD": 2, "MUL": 4, "NEG": 1, "NON_MAX_SUPPRESSION_V4": 1,
    "NON_MAX_SUPPRESSION_V5": 1, "NOT_EQUAL": 3, "ONE_HOT": 1, "PACK": 3, "PAD": 3, "PADV2": 3,
    "POW": 1, "PRELU": 1, "QUANTIZE": 2, "RANGE": 1, "RANK": 1, "REAL": 1, "REDUCE_ANY": 1,
    "REDUCE_MAX": 3, "REDUCE_MIN": 3, "REDUCE_PROD": 1, "RELU": 3, "RELU6": 3, "RELU_N1_TO_1": 1,
    "RESHAPE": 1, "RESIZE_BILINEAR": 4, "RESIZE_NEAREST_NEIGHBOR": 4, "REVERSE_SEQUENCE": 1,
    "REVERSE_V2": 3, "RFFT2D": 1, "RNN": 3, "ROUND": 1, "RSQRT": 2, "SCATTER_ND": 1,
    "SEGMENT_SUM": 1, "SELECT": 2, "SELECT_V2": 1, "SHAPE": 1, "SIN": 1, "SKIP_GRAM": 1,
    "SLICE": 5, "SOFTMAX": 3, "SPACE_TO_BATCH_ND": 3, "SPACE_TO_DEPTH": 2, "SPARSE_TO_DENSE": 3,
    "SPLIT": 4, "SPLIT_V": 2, "SQRT": 1, "SQUARE": 1, "SQUARED_DIFFERENCE": 2, "SQUEEZE": 2,
    "STRIDED_SLICE": 5, "SUB": 5, "SUM": 2, "SVDF": 4, "TANH": 3, "TILE": 2, "TOPK_V2": 2,
    "TRANSPOSE": 5, "TRANSPOSE_CONV": 3, "UNIDIRECTIONAL_SEQUENCE_LSTM": 3,
    "UNIDIRECTIONAL_SEQUENCE_RNN": 3, "UNIQUE": 1, "UNPACK": 4, "WHERE": 1, "WHILE": 1,
    "ZEROS_LIKE": 1,
}
# Builtin codes above HASHTABLE_SIZE (139, the last op of TF 2.5's schema): unknown to compiler 16.
_LAST_TF25_BUILTIN_CODE = 139

_EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
_INT8_TYPES = ("INT8", "UINT8")
_PARAM_TYPES = ("INT32", "INT64")  # shapes, axes, paddings, begin/end/strides: compile-time params
_SOFTMAX_MAX_ELEMENTS = 16_000
# (filter, bias) input positions of the ops that carry weights.
_WEIGHT_INPUTS = {
    "CONV_2D": (1, 2), "DEPTHWISE_CONV_2D": (1, 2), "FULLY_CONNECTED": (1, 2),
    "TRANSPOSE_CONV": (1, 3),
}
_NUMPY_TYPES = {
    "INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FLOAT32": np.float32,
}
_PER_CHANNEL_FC_FIX = (
    "convert with converter._experimental_disable_per_channel_quantization_for_dense_layers = True"
)


class EdgeTpuIncompatible(ValueError):
    """The model would not run entirely on the Edge TPU. ``report`` holds the details."""

    def __init__(self, report: "EdgeTpuReport"):
        self.report = report
        lines = "\n".join(f"  - {p}" for p in report.problems)
        super().__init__(
            f"{report.source} is not Edge TPU compatible (edgetpu_compiler {COMPILER_VERSION} "
            f"rules): {len(report.problems)} problem(s):\n{lines}")


@dataclasses.dataclass(frozen=True)
class OpReport:
    """What the Edge TPU compiler would do with one operator.

    Attributes:
      index: position in the subgraph's execution order.
      name: TFLite builtin name (``CUSTOM(<code>)`` for custom ops).
      version: the op version in the flatbuffer.
      maps: whether the op itself can be mapped to the Edge TPU.
      reason: why it cannot (``None`` when it maps).
      macs: multiply-accumulates of one inference (conv, depthwise, fully connected,
        transpose conv, batch matmul; 0 for the other ops).
      runs_on: ``"tpu"`` or ``"cpu"``.
      output: name of the op's first output tensor, to find it in the graph.
      note: why a mappable op still runs on the CPU, or a remark on a CPU boundary op.
    """

    index: int
    name: str
    version: int
    maps: bool
    reason: str | None
    macs: int
    runs_on: str
    output: str
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class EdgeTpuReport:
    """Edge TPU compatibility of one TFLite model.

    Attributes:
      source: the file checked, or ``"<bytes>"``.
      ops: one :class:`OpReport` per operator of the main subgraph.
      problems: human-readable reasons the model does not run entirely on the TPU.
      warnings: remarks that do not break compatibility (float I/O, off-chip weights, ...).
      param_bytes: bytes of constant tensor data (weights, biases, shape params).
      on_chip_bytes: on-chip memory the parameters are compared with.
      compiler: the parsed `edgetpu_compiler` result (see :func:`run_compiler`), or ``None``
        when the compiler was not run or is not installed.
    """

    source: str
    ops: list[OpReport]
    problems: list[str]
    warnings: list[str]
    param_bytes: int
    on_chip_bytes: int = ON_CHIP_BYTES
    compiler: dict[str, Any] | None = None

    @property
    def compatible(self) -> bool:
        """True when the whole model (apart from float I/O conversions) runs on the TPU."""
        return not self.problems

    @property
    def total_macs(self) -> int:
        return sum(op.macs for op in self.ops)

    @property
    def tpu_macs(self) -> int:
        return sum(op.macs for op in self.ops if op.runs_on == "tpu")

    @property
    def tpu_op_share(self) -> float:
        """Share of the operators that would run on the Edge TPU."""
        if not self.ops:
            return 0.0
        return sum(op.runs_on == "tpu" for op in self.ops) / len(self.ops)

    @property
    def tpu_mac_share(self) -> float:
        """Share of the MACs that would run on the Edge TPU (the op share if there are none)."""
        total = self.total_macs
        return self.tpu_macs / total if total else self.tpu_op_share

    @property
    def fits_on_chip(self) -> bool:
        """Whether the parameters fit the on-chip memory (else they stream from off-chip)."""
        return self.param_bytes <= self.on_chip_bytes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary, including every op."""
        return {
            "source": self.source,
            "compiler_rules": COMPILER_VERSION,
            "compatible": self.compatible,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "num_ops": len(self.ops),
            "num_tpu_ops": sum(op.runs_on == "tpu" for op in self.ops),
            "tpu_op_share": self.tpu_op_share,
            "total_macs": self.total_macs,
            "tpu_macs": self.tpu_macs,
            "tpu_mac_share": self.tpu_mac_share,
            "param_bytes": self.param_bytes,
            "on_chip_bytes": self.on_chip_bytes,
            "fits_on_chip": self.fits_on_chip,
            "ops": [op.to_dict() for op in self.ops],
            "compiler": self.compiler,
        }

    def format_table(self) -> str:
        """A printable per-op table followed by the summary, problems and warnings."""
        lines = [f"Edge TPU check ({self.source}; edgetpu_compiler {COMPILER_VERSION} rules, "
                 "static, from the flatbuffer)"]
        header = (f"{'#':>4}  {'op':<28} {'ver':>3}  {'maps':<4}  {'runs':<4} {'MACs':>14}  "
                  "reason / note")
        lines += [header, "-" * len(header)]
        for op in self.ops:
            text = op.reason or op.note or ""
            lines.append(f"{op.index:>4}  {op.name:<28} {op.version:>3}  "
                         f"{'yes' if op.maps else 'no':<4}  {op.runs_on.upper():<4} "
                         f"{op.macs:>14,}  {text}")
        n_tpu = sum(op.runs_on == "tpu" for op in self.ops)
        lines += [
            "",
            f"compatible: {'yes' if self.compatible else 'NO'}",
            f"ops on the TPU: {n_tpu}/{len(self.ops)} ({self.tpu_op_share:.2%})",
            f"MACs on the TPU: {self.tpu_macs:,}/{self.total_macs:,} ({self.tpu_mac_share:.2%})",
            f"parameters: {_format_bytes(self.param_bytes)} vs {_format_bytes(self.on_chip_bytes)} "
            "on-chip: " + ("fits" if self.fits_on_chip
                           else "does not fit (streamed from off-chip memory)"),
        ]
        for title, items in (("problems", self.problems), ("warnings", self.warnings)):
            if items:
                lines.append(f"{title}:")
                lines += [f"  - {item}" for item in items]
        lines.append(_format_compiler(self.compiler))
        return "\n".join(lines)


def check(tflite: TfliteSource, *, compiler_out_dir: str | os.PathLike | None = None,
          on_chip_bytes: int = ON_CHIP_BYTES, compiler_timeout: float = 300.0) -> EdgeTpuReport:
    """Checks whether a TFLite model would run on the Edge TPU.

    Args:
      tflite: path of a ``.tflite`` file, or the model's bytes.
      compiler_out_dir: when given and `edgetpu_compiler` is on PATH, the compiler is also
        run with this output folder and its parsed log is attached as ``report.compiler``.
      on_chip_bytes: on-chip memory to compare the parameter bytes with.
      compiler_timeout: seconds before the compiler run is abandoned.

    Returns:
      The :class:`EdgeTpuReport`.

    Raises:
      FileNotFoundError: the path does not exist.
      TypeError: ``tflite`` is neither a path nor bytes.
      ValueError: the data is not a readable TFLite flatbuffer.
    """
    data, source = _read_source(tflite)
    graph = _Graph(_parse_flatbuffer(data, source))
    fatal = _model_problems(graph)
    analyses = [_analyse_op(graph, i) for i in range(len(graph.subgraph.operators))]
    ops = _place_ops(graph, analyses, fatal)
    problems = fatal + [f"op {a.index} {a.name} (output '{graph.op_output_name(a.index)}'): {r}"
                        for a in analyses for r in a.reasons]
    param_bytes = graph.param_bytes()
    warnings = _warnings(graph, ops, param_bytes, on_chip_bytes)
    compiler = None
    if compiler_out_dir is not None:
        compiler = _run_compiler_on(data, tflite, compiler_out_dir, compiler_timeout)
        warnings += _compiler_disagreement(compiler, ops)
    return EdgeTpuReport(source=source, ops=ops, problems=problems, warnings=warnings,
                         param_bytes=param_bytes, on_chip_bytes=on_chip_bytes, compiler=compiler)


def ensure_compatible(tflite: TfliteSource, **kwargs: Any) -> EdgeTpuReport:
    """Like :func:`check`, but raises :class:`EdgeTpuIncompatible` listing every problem."""
    report = check(tflite, **kwargs)
    if not report.compatible:
        raise EdgeTpuIncompatible(report)
    return report


# ----------------------------------------------------------------------------- reading


def _read_source(tflite: TfliteSource) -> tuple[bytes, str]:
    if isinstance(tflite, (bytes, bytearray, memoryview)):
        return bytes(tflite), "<bytes>"
    if isinstance(tflite, (str, os.PathLike)):
        path = Path(tflite)
        if not path.is_file():
            raise FileNotFoundError(f"TFLite model not found: '{path}' (expected a .tflite file)")
        return path.read_bytes(), str(path)
    raise TypeError(f"expected a .tflite path or the model's bytes, got {type(tflite).__name__}")


def _parse_flatbuffer(data: bytes, source: str):
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError(f"{source} is not a TFLite flatbuffer: no 'TFL3' identifier at bytes 4..8 "
                         "(expected a .tflite file written by tf.lite.TFLiteConverter)")
    # Imported here: tensorflow is only needed to read flatbuffers, not to parse compiler logs.
    from tensorflow.lite.tools import flatbuffer_utils
    try:
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    except Exception as err:  # flatbuffers raises assorted errors on truncated or corrupt data
        raise ValueError(f"{source}: cannot read the TFLite flatbuffer (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from err
    if not model.subgraphs or model.subgraphs[0].operators is None:
        raise ValueError(f"{source}: the TFLite model has no operators in its main subgraph")
    _check_buffers(model, source)
    return model


def _check_buffers(model, source: str) -> None:
    """Truncation can leave short constant buffers that flatbuffers reads without complaint."""
    subgraph = model.subgraphs[0]
    for index, tensor in enumerate(subgraph.tensors or []):
        data = _buffer_data(model, tensor)
        if data is None or tensor.shape is None:
            continue
        expected = _num_elements(tensor.shape) * _itemsize(_type_name(tensor.type))
        if expected and len(data) < expected:
            raise ValueError(f"{source}: tensor {index} '{_tensor_name(tensor)}' holds {len(data)} "
                             f"bytes, its shape needs {expected}: truncated or corrupt file")


class _Graph:
    """Convenient access to the main subgraph of a parsed ``ModelT``."""

    def __init__(self, model):
        from tensorflow.lite.python import schema_py_generated as schema
        from tensorflow.lite.python import schema_util

        self.model = model
        self.subgraph = model.subgraphs[0]
        self._builtin_names = _enum_names(schema.BuiltinOperator)
        self._code_of = schema_util.get_builtin_code_from_operator_code
        self.inputs = {int(i) for i in _as_list(self.subgraph.inputs)}
        self.outputs = {int(i) for i in _as_list(self.subgraph.outputs)}

    @property
    def tensors(self):
        return self.subgraph.tensors or []

    def op(self, index: int):
        return self.subgraph.operators[index]

    def op_code(self, index: int) -> tuple[int, str, int]:
        """(builtin code, name, version) of an operator."""
        op = self.op(index)
        if not 0 <= op.opcodeIndex < len(self.model.operatorCodes or []):
            raise ValueError(f"op {index} refers to operator code {op.opcodeIndex}, which does not "
                             "exist: corrupt TFLite file")
        code_obj = self.model.operatorCodes[op.opcodeIndex]
        code = int(self._code_of(code_obj))
        name = self._builtin_names.get(code, f"BUILTIN_{code}")
        if name == "CUSTOM":
            name = f"CUSTOM({_decode(code_obj.customCode)})"
        return code, name, int(code_obj.version or 1)

    def op_inputs(self, index: int) -> list[int]:
        return [int(i) for i in _as_list(self.op(index).inputs)]

    def op_outputs(self, index: int) -> list[int]:
        return [int(i) for i in _as_list(self.op(index).outputs)]

    def op_output_name(self, index: int) -> str:
        outputs = self.op_outputs(index)
        return _tensor_name(self.tensors[outputs[0]]) if outputs else ""

    def tensor(self, index: int):
        return self.tensors[index]

    def type_name(self, index: int) -> str:
        return _type_name(self.tensor(index).type)

    def shape(self, index: int) -> list[int]:
        return [int(d) for d in _as_list(self.tensor(index).shape)]

    def is_dynamic(self, index: int) -> bool:
        signature = self.tensor(index).shapeSignature
        return signature is not None and any(int(d) < 0 for d in signature)

    def is_constant(self, index: int) -> bool:
        tensor = self.tensor(index)
        return not tensor.isVariable and _buffer_data(self.model, tensor) is not None

    def values(self, index: int) -> np.ndarray:
        """The constant data of a tensor, as a NumPy array of its shape."""
        dtype = _NUMPY_TYPES[self.type_name(index)]
        data = _buffer_data(self.model, self.tensor(index))
        return np.frombuffer(bytes(data), dtype=np.dtype(dtype).newbyteorder("<")).reshape(
            self.shape(index))

    def scales(self, index: int) -> list[float]:
        quant = self.tensor(index).quantization
        return [] if quant is None or quant.scale is None else [float(s) for s in quant.scale]

    def zero_points(self, index: int) -> list[int]:
        quant = self.tensor(index).quantization
        return [] if quant is None or quant.zeroPoint is None else [int(z) for z in quant.zeroPoint]

    def describe(self, index: int) -> str:
        name = _tensor_name(self.tensor(index))
        return f"tensor {index} '{name}' {self.type_name(index)} {self.shape(index)}"

    def param_bytes(self) -> int:
        buffers = {self.tensor(i).buffer for i in range(len(self.tensors)) if self.is_constant(i)}
        return sum(len(self.model.buffers[b].data) for b in buffers)


# ----------------------------------------------------------------------------- per-op analysis


@dataclasses.dataclass
class _Analysis:
    index: int
    name: str
    version: int
    reasons: list[str]
    macs: int
    boundary: str | None = None   # why a CPU-side float I/O conversion does not end the TPU segment
    remark: str | None = None      # e.g. an already compiled Edge TPU op


def _model_problems(graph: _Graph) -> list[str]:
    """Problems that make compiler 16 refuse the whole model."""
    problems = []
    dynamic = [i for i in range(len(graph.tensors)) if graph.is_dynamic(i)]
    if dynamic:
        first = dynamic[0]
        signature = [int(d) for d in graph.tensor(first).shapeSignature]
        problems.append(
            f"dynamic shapes: {len(dynamic)} tensor(s) have -1 in their shape_signature (first: "
            f"tensor {first} '{_tensor_name(graph.tensor(first))}' {signature}); the Edge TPU "
            "needs static shapes and edgetpu_compiler refuses the whole model: convert from a "
            "concrete function with a fixed input_signature (batch 1)")
    if not any(graph.type_name(i) in _INT8_TYPES for i in range(len(graph.tensors))):
        problems.append("the model is not quantized (no int8/uint8 tensor): the Edge TPU needs "
                        "full-integer quantization and edgetpu_compiler rejects the model "
                        "('Model not quantized')")
    for index in range(len(graph.subgraph.operators)):
        code, name, version = graph.op_code(index)
        where = f"op {index} {name} (output '{graph.op_output_name(index)}')"
        if code > _LAST_TF25_BUILTIN_CODE:
            problems.append(f"{where}: the op was added to TFLite after TF 2.5, so "
                            f"edgetpu_compiler {COMPILER_VERSION} cannot load the model at all")
        elif version > _MAX_VERSION.get(name, version):
            problems.append(
                f"{where}: op version {version} is newer than version {_MAX_VERSION[name]}, the "
                f"highest that edgetpu_compiler {COMPILER_VERSION} knows (TFLite 2.5 era); the "
                f"compiler cannot load the model at all (\"Didn't find op for builtin opcode "
                f"'{name}' version '{version}'\")")
    return problems


def _analyse_op(graph: _Graph, index: int) -> _Analysis:
    code, name, version = graph.op_code(index)
    analysis = _Analysis(index, name, version, [], _macs(graph, index, name))
    if name == f"CUSTOM({_EDGETPU_CUSTOM_OP})":
        analysis.remark = "already compiled for the Edge TPU"
        return analysis
    analysis.boundary = _boundary_conversion(graph, index, name)
    if analysis.boundary:
        return analysis
    if name not in _EDGETPU_OPS:
        analysis.reasons.append(_unsupported_reason(name))
    analysis.reasons += _tensor_reasons(graph, index, name)
    if name in _EDGETPU_OPS:
        restriction = _RESTRICTIONS.get(name)
        if restriction is not None:
            analysis.reasons += restriction(graph, index)
    return analysis


def _unsupported_reason(name: str) -> str:
    if name.startswith("CUSTOM(Flex"):
        return f"{name} is a TensorFlow (Flex) op: CPU only, not an Edge TPU operation"
    return f"{name} is not in the Edge TPU's supported operations"


def _boundary_conversion(graph: _Graph, index: int, name: str) -> str | None:
    """Float input QUANTIZE / output DEQUANTIZE that Coral's compiler leaves on the CPU."""
    inputs, outputs = graph.op_inputs(index), graph.op_outputs(index)
    if len(inputs) != 1 or len(outputs) != 1:
        return None
    src, dst = inputs[0], outputs[0]
    if (name == "QUANTIZE" and src in graph.inputs and graph.type_name(src) == "FLOAT32"
            and graph.type_name(dst) in _INT8_TYPES):
        return "float model input quantized on the CPU before the Edge TPU segment"
    if (name == "DEQUANTIZE" and dst in graph.outputs and graph.type_name(dst) == "FLOAT32"
            and graph.type_name(src) in _INT8_TYPES):
        return "model output dequantized to float on the CPU after the Edge TPU segment"
    return None


def _tensor_reasons(graph: _Graph, index: int, name: str) -> list[str]:
    """Data types, quantization, constness and rank of the op's tensors."""
    reasons = []
    weight_slots = _WEIGHT_INPUTS.get(name, ())
    for slot, t in enumerate(graph.op_inputs(index)):
        if t < 0:
            continue  # optional input left out (e.g. no bias)
        if slot in weight_slots:
            reasons += _weight_reasons(graph, t, is_bias=slot == weight_slots[1])
        elif graph.is_constant(t):
            reasons += _constant_reasons(graph, t)
        else:
            reasons += _activation_reasons(graph, t)
    for t in graph.op_outputs(index):
        reasons += _activation_reasons(graph, t)
    return reasons


def _activation_reasons(graph: _Graph, t: int) -> list[str]:
    reasons = []
    dtype = graph.type_name(t)
    if dtype not in _INT8_TYPES:
        reasons.append(f"{graph.describe(t)}: the Edge TPU runs int8/uint8 tensors only "
                       "('Operation is working on an unsupported data type')")
    elif not graph.scales(t):
        reasons.append(f"{graph.describe(t)}: 8-bit tensor without quantization parameters")
    shape = graph.shape(t)
    if any(d > 1 for d in shape[:-3]):
        reasons.append(f"{graph.describe(t)}: more than 3 dimensions and an outer one is > 1 "
                       "(Coral: 'only the 3 innermost dimensions may have a size greater than 1')")
    return reasons


def _constant_reasons(graph: _Graph, t: int) -> list[str]:
    dtype = graph.type_name(t)
    if dtype in _INT8_TYPES or dtype in _PARAM_TYPES:
        return []
    return [f"{graph.describe(t)}: constant of type {dtype}; the Edge TPU needs 8-bit quantized "
            "constants (int32/int64 only for biases and shape parameters)"]


def _weight_reasons(graph: _Graph, t: int, *, is_bias: bool) -> list[str]:
    role = "bias" if is_bias else "filter"
    if not graph.is_constant(t):
        return [f"{graph.describe(t)}: {role} is not constant at compile time "
                "('Filter, bias, or other param is not constant at compile-time')"]
    dtype = graph.type_name(t)
    expected = ("INT32",) if is_bias else _INT8_TYPES
    if dtype not in expected:
        return [f"{graph.describe(t)}: {role} of type {dtype}; the Edge TPU needs "
                f"{' or '.join(e.lower() for e in expected)}"]
    if not is_bias and not graph.scales(t):
        return [f"{graph.describe(t)}: 8-bit filter without quantization parameters"]
    return []


# Op restrictions from Coral's "Known limitations" column (runtime 14), each returning reasons.


def _no_fused_activation(graph: _Graph, index: int) -> list[str]:
    options = graph.op(index).builtinOptions
    fused = getattr(options, "fusedActivationFunction", 0)
    if fused:
        return [f"fused activation ({_activation_name(fused)}) is not supported on this op "
                "(Coral: 'No fused activation function')"]
    return []


def _same_dilation(graph: _Graph, index: int) -> list[str]:
    options = graph.op(index).builtinOptions
    h = getattr(options, "dilationHFactor", 1) or 1
    w = getattr(options, "dilationWFactor", 1) or 1
    if h != w:
        return [f"dilation {h}x{w} differs in y and x (Coral: 'Must use the same dilation in x "
                "and y dimensions')"]
    return []


def _concatenation(graph: _Graph, index: int) -> list[str]:
    reasons = _no_fused_activation(graph, index)
    inputs = [t for t in graph.op_inputs(index) if t >= 0]
    constants = [t for t in inputs if graph.is_constant(t)]
    if constants and (len(inputs) != 2 or not _is_all_zero(graph, constants[0])):
        reasons.append("a constant input is only allowed as the second of exactly 2 inputs and "
                       "must be all zeros (Coral: 'effectively, a zero-padding op')")
    return reasons


def _fully_connected(graph: _Graph, index: int) -> list[str]:
    reasons = []
    options = graph.op(index).builtinOptions
    if getattr(options, "weightsFormat", 0):
        reasons.append("weights_format is not DEFAULT (Coral: 'Only the default format is "
                       "supported for fully-connected weights')")
    inputs = graph.op_inputs(index)
    if len(inputs) > 1 and inputs[1] >= 0:
        scales = graph.scales(inputs[1])
        if len(scales) > 1:
            reasons.append(f"per-channel quantized weights ({len(scales)} scales in "
                           f"{graph.describe(inputs[1])}); edgetpu_compiler {COMPILER_VERSION} "
                           f"needs per-tensor FULLY_CONNECTED weights: {_PER_CHANNEL_FC_FIX}")
    output = graph.op_outputs(index)[0]
    if _non_unit_dims(graph.shape(output)) > 1:
        reasons.append(f"output {graph.shape(output)} is not one-dimensional (Coral: 'Output "
                       "tensor is one-dimensional')")
    return reasons


def _softmax(graph: _Graph, index: int) -> list[str]:
    source = graph.op_inputs(index)[0]
    shape = graph.shape(source)
    if _non_unit_dims(shape) > 1 or _num_elements(shape) > _SOFTMAX_MAX_ELEMENTS:
        return [f"input {shape}: Coral supports only a 1-D input with at most "
                f"{_SOFTMAX_MAX_ELEMENTS:,} elements"]
    return []


def _reduction(graph: _Graph, index: int, *, z_multiple_of_4: bool = False) -> list[str]:
    source, axes_tensor = graph.op_inputs(index)[:2]
    rank = len(graph.shape(source))
    if not graph.is_constant(axes_tensor):
        return ["reduction axes are not constant at compile time"]
    axes = {int(a) % rank for a in np.ravel(graph.values(axes_tensor))} if rank else set()
    reasons = []
    if rank == 4 and 0 in axes:
        reasons.append(f"reduces the batch dimension (axes {sorted(axes)}); Coral: 'No reduction "
                       "in batch dimension'")
    if z_multiple_of_4 and rank >= 3 and rank - 1 in axes and graph.shape(source)[-1] % 4:
        reasons.append(f"z-reduction over {graph.shape(source)[-1]} channels, not a multiple of 4")
    return reasons


def _pad(graph: _Graph, index: int) -> list[str]:
    inputs = graph.op_inputs(index)
    if not graph.is_constant(inputs[1]):
        return ["paddings are not constant at compile time"]
    paddings = graph.values(inputs[1])
    if paddings.shape[0] == 4 and np.any(paddings[0] != 0):
        return ["pads the batch dimension (Coral: 'No padding in batch dimension')"]
    return []


def _pack(graph: _Graph, index: int) -> list[str]:
    axis = getattr(graph.op(index).builtinOptions, "axis", 0)
    rank = len(graph.shape(graph.op_outputs(index)[0]))
    if rank == 4 and axis % rank == 0:
        return ["packs along the batch dimension (Coral: 'No packing in batch dimension')"]
    return []


def _split(graph: _Graph, index: int) -> list[str]:
    axis_tensor, source = graph.op_inputs(index)[:2]
    rank = len(graph.shape(source))
    if not graph.is_constant(axis_tensor):
        return ["split axis is not constant at compile time"]
    if rank == 4 and int(np.ravel(graph.values(axis_tensor))[0]) % rank == 0:
        return ["splits the batch dimension (Coral: 'No splitting in batch dimension')"]
    return []


def _strided_slice(graph: _Graph, index: int) -> list[str]:
    strides = graph.op_inputs(index)[3]
    if not graph.is_constant(strides) or np.any(graph.values(strides) != 1):
        return ["strides other than 1 (Coral: 'Supported only when all strides are equal to 1')"]
    return []


def _prelu(graph: _Graph, index: int) -> list[str]:
    alpha = graph.op_inputs(index)[1]
    if any(d > 1 for d in graph.shape(alpha)[:-1]):
        return [f"alpha {graph.shape(alpha)} is not 1-dimensional (Coral: 'only the innermost "
                "dimension can be >1 size')"]
    return []


_RESTRICTIONS: dict[str, Callable[[_Graph, int], list[str]]] = {
    "AVERAGE_POOL_2D": _no_fused_activation,
    "MAX_POOL_2D": _no_fused_activation,
    "CONCATENATION": _concatenation,
    "CONV_2D": _same_dilation,
    "DEPTHWISE_CONV_2D": _same_dilation,
    "FULLY_CONNECTED": _fully_connected,
    "SOFTMAX": _softmax,
    "MEAN": lambda g, i: _reduction(g, i, z_multiple_of_4=True),
    "SUM": _reduction,
    "REDUCE_MAX": _reduction,
    "REDUCE_MIN": _reduction,
    "PAD": _pad,
    "PACK": _pack,
    "SPLIT": _split,
    "STRIDED_SLICE": _strided_slice,
    "PRELU": _prelu,
}


def _macs(graph: _Graph, index: int, name: str) -> int:
    """Multiply-accumulates of one inference of the op (0 for ops without a MAC array)."""
    inputs, outputs = graph.op_inputs(index), graph.op_outputs(index)
    if not outputs or len(inputs) < 2 or min(inputs[:2]) < 0:
        return 0
    out = _num_elements(graph.shape(outputs[0]))
    weights = graph.shape(inputs[1])
    if name == "CONV_2D" and len(weights) == 4:        # filter [out_ch, kh, kw, in_ch / groups]
        return out * _num_elements(weights[1:])
    if name == "DEPTHWISE_CONV_2D" and len(weights) == 4:  # filter [1, kh, kw, out_ch]
        return out * weights[1] * weights[2]
    if name == "FULLY_CONNECTED" and len(weights) == 2:  # weights [units, in_features]
        return out * weights[1]
    if name == "TRANSPOSE_CONV" and len(weights) == 4 and len(inputs) > 2:
        return _num_elements(graph.shape(inputs[2])) * _num_elements(weights[:3])
    if name == "BATCH_MATMUL":
        lhs = graph.shape(inputs[0])
        adj_x = getattr(graph.op(index).builtinOptions, "adjX", False)
        return out * (lhs[-2] if adj_x else lhs[-1]) if lhs else 0
    return 0


def _place_ops(graph: _Graph, analyses: list[_Analysis], fatal: list[str]) -> list[OpReport]:
    """Applies Coral's single-partition rule: the first unmappable op ends the TPU segment."""
    cut = None
    reports = []
    for a in analyses:
        maps = not a.reasons and a.boundary is None
        if a.boundary is not None:
            runs_on, note = "cpu", a.boundary
        elif fatal:
            runs_on, note = "cpu", "the compiler rejects the whole model (see the problems)"
        elif cut is None and maps:
            runs_on, note = "tpu", a.remark
        else:
            if cut is None:
                cut = a
            runs_on = "cpu"
            note = None if cut is a else (f"after op {cut.index} {cut.name}: the compiler cannot "
                                          "partition the model more than once")
        reports.append(OpReport(
            index=a.index, name=a.name, version=a.version, maps=maps,
            reason="; ".join(a.reasons) or None, macs=a.macs, runs_on=runs_on,
            output=graph.op_output_name(a.index), note=note))
    return reports


def _warnings(graph: _Graph, ops: list[OpReport], param_bytes: int,
              on_chip_bytes: int) -> list[str]:
    warnings = []
    if len(graph.model.subgraphs) > 1:
        warnings.append(f"the model has {len(graph.model.subgraphs)} subgraphs; only the main one "
                        "was checked (the Edge TPU maps a single subgraph)")
    for op in ops:
        if op.note and op.runs_on == "cpu" and not op.maps and op.reason is None:
            warnings.append(f"op {op.index} {op.name}: {op.note} (allowed; int8/uint8 model input "
                            "and output avoid it)")
    if param_bytes > on_chip_bytes:
        warnings.append(
            f"parameters take {_format_bytes(param_bytes)}, more than the "
            f"{_format_bytes(on_chip_bytes)} of on-chip memory: the compiler caches what fits and "
            "streams the rest from off-chip memory at every inference (slower, but still a valid "
            "Edge TPU model)")
    return warnings


# ----------------------------------------------------------------------------- compiler


def run_compiler(tflite_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 timeout: float = 300.0, extra_args: Sequence[str] = ()) -> dict[str, Any] | None:
    """Runs `edgetpu_compiler` on a model and parses what it reports.

    Args:
      tflite_path: the ``.tflite`` file to compile.
      out_dir: folder for the compiled ``*_edgetpu.tflite`` and its ``.log`` (created if missing).
      timeout: seconds before the compiler process is killed.
      extra_args: more command-line options, e.g. ``("-m", "13")`` for an older runtime.

    Returns:
      ``None`` when `edgetpu_compiler` is not on PATH; otherwise the dict of
      :func:`parse_compiler_output` plus ``command``, ``returncode``, ``succeeded``,
      ``compiled_model`` (path of the compiled file, or ``None``) and ``stdout``.

    Raises:
      FileNotFoundError: ``tflite_path`` does not exist.
    """
    executable = shutil.which("edgetpu_compiler")
    if executable is None:
        return None
    model = Path(tflite_path)
    if not model.is_file():
        raise FileNotFoundError(f"TFLite model not found: '{model}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    command = [executable, "-s", "-o", str(out), *extra_args, str(model)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        result = parse_compiler_output(_decode(err.stdout) + _decode(err.stderr))
        result["errors"].append(f"edgetpu_compiler did not finish within {timeout:g} s")
        return {**result, "command": command, "returncode": None, "succeeded": False,
                "compiled_model": None, "stdout": _decode(err.stdout)}
    text = proc.stdout + proc.stderr
    result = parse_compiler_output(text)
    log_file = _resolve(result.get("log_file"), out)
    if log_file is not None and log_file.is_file() and not result["operators"]:
        result["operators"] = _parse_operator_table(log_file.read_text(errors="replace"))
    result["log_file"] = str(log_file) if log_file is not None else None
    compiled = _resolve(result.get("output_model"), out) or out / f"{model.stem}_edgetpu.tflite"
    succeeded = proc.returncode == 0 and compiled.is_file() and not result["errors"]
    result.update(_op_counts(result))
    return {**result, "command": command, "returncode": proc.returncode, "succeeded": succeeded,
            "compiled_model": str(compiled) if compiled.is_file() else None, "stdout": text}


_SUMMARY_FIELDS = {
    "input_model": (r"^Input model:\s*(.+)$", str),
    "input_size_bytes": (r"^Input size:\s*(.+)$", "bytes"),
    "output_model": (r"^Output model:\s*(.+)$", str),
    "output_size_bytes": (r"^Output size:\s*(.+)$", "bytes"),
    "on_chip_memory_used_bytes": (
        r"^On-chip memory used for caching model parameters:\s*(.+)$", "bytes"),
    "on_chip_memory_remaining_bytes": (
        r"^On-chip memory remaining for caching model parameters:\s*(.+)$", "bytes"),
    "off_chip_memory_used_bytes": (
        r"^Off-chip memory used for streaming uncached model parameters:\s*(.+)$", "bytes"),
    "num_edgetpu_subgraphs": (r"^Number of Edge TPU subgraphs:\s*(\d+)", int),
    "total_ops": (r"^Total number of operations:\s*(\d+)", int),
    "ops_on_tpu": (r"^Number of operations that will run on Edge TPU:\s*(\d+)", int),
    "ops_on_cpu": (r"^Number of operations that will run on CPU:\s*(\d+)", int),
    "log_file": (r"^Operation log:\s*(.+)$", str),
    "compile_time_ms": (r"^Model compiled successfully in\s*(\d+)\s*ms", int),
}
_ERROR_PATTERN = re.compile(
    r"^(ERROR:.*|Compilation failed.*|Invalid model.*|Model could not be parsed.*|"
    r"Internal compiler error.*)$", re.MULTILINE)


def parse_compiler_output(text: str) -> dict[str, Any]:
    """Parses `edgetpu_compiler` console output (or its ``.log`` file).

    The format follows the compiler's own output (coral.ai/docs/edgetpu/compiler and the logs
    quoted in google-coral/edgetpu issues): ``Edge TPU Compiler version X``, the ``Input model`` /
    ``On-chip memory used ...`` summary lines and the ``Operator  Count  Status`` table.

    Returns:
      A dict with ``version``, the summary fields (sizes in bytes, ``None`` when absent),
      ``operators`` (a list of ``{"operator", "count", "status", "mapped"}``) and ``errors``.
    """
    version = re.search(r"Edge TPU Compiler version\s+(\S+)", text)
    result: dict[str, Any] = {"version": version.group(1) if version else None}
    for key, (pattern, kind) in _SUMMARY_FIELDS.items():
        match = re.search(pattern, text, re.MULTILINE)
        value = match.group(1).strip() if match else None
        if value is not None and kind == "bytes":
            value = _parse_size(value)
        elif value is not None and kind is int:
            value = int(value)
        result[key] = value
    result["operators"] = _parse_operator_table(text)
    result["errors"] = [m.group(1).strip() for m in _ERROR_PATTERN.finditer(text)]
    result.update(_op_counts(result))
    return result


def _parse_operator_table(text: str) -> list[dict[str, Any]]:
    rows = []
    in_table = False
    for line in text.splitlines():
        if re.match(r"^\s*Operator\s+Count\s+Status\s*$", line):
            in_table = True
            continue
        if not in_table or not line.strip():
            continue
        match = re.match(r"^\s*([A-Z][A-Z0-9_]*(?:\([^)]*\))?)\s+(\d+)\s+(\S.*?)\s*$", line)
        if match is None:
            in_table = False  # a non-row line ends the table
            continue
        status = match.group(3)
        rows.append({"operator": match.group(1), "count": int(match.group(2)), "status": status,
                     "mapped": status.startswith("Mapped to Edge TPU")})
    return rows


def _op_counts(result: dict[str, Any]) -> dict[str, Any]:
    """Fills ops_on_tpu / ops_on_cpu from the operator table when the summary lines are absent."""
    rows = result.get("operators") or []
    counts = {}
    if result.get("ops_on_tpu") is None and rows:
        counts["ops_on_tpu"] = sum(r["count"] for r in rows if r["mapped"])
    if result.get("ops_on_cpu") is None and rows:
        counts["ops_on_cpu"] = sum(r["count"] for r in rows if not r["mapped"])
    return counts


def _parse_size(text: str) -> int | None:
    match = re.match(r"^([\d.]+)\s*(B|KiB|MiB|GiB)\b", text)
    if match is None:
        return None
    factor = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}[match.group(2)]
    return int(round(float(match.group(1)) * factor))


def _resolve(path: str | None, out_dir: Path) -> Path | None:
    if not path:
        return None
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate
    return out_dir / candidate.name


def _run_compiler_on(data: bytes, tflite: TfliteSource, out_dir, timeout: float) -> dict | None:
    if isinstance(tflite, (str, os.PathLike)):
        return run_compiler(tflite, out_dir, timeout=timeout)
    if shutil.which("edgetpu_compiler") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        path.write_bytes(data)
        return run_compiler(path, out_dir, timeout=timeout)


def _compiler_disagreement(compiler: dict | None, ops: list[OpReport]) -> list[str]:
    if not compiler or not compiler.get("succeeded") or compiler.get("ops_on_tpu") is None:
        return []
    predicted = sum(op.runs_on == "tpu" for op in ops)
    if compiler["ops_on_tpu"] == predicted:
        return []
    return [f"edgetpu_compiler {compiler.get('version')} maps {compiler['ops_on_tpu']} ops to the "
            f"Edge TPU where the static check predicted {predicted}; trust the compiler's log"]


def _format_compiler(compiler: dict | None) -> str:
    if compiler is None:
        return "edgetpu_compiler: not run (pass compiler_out_dir=, needs edgetpu_compiler on PATH)"
    status = "compiled" if compiler.get("succeeded") else "FAILED"
    parts = [f"edgetpu_compiler {compiler.get('version')}: {status}"]
    if compiler.get("ops_on_tpu") is not None:
        parts.append(f"{compiler['ops_on_tpu']} ops on the TPU, "
                     f"{compiler.get('ops_on_cpu') or 0} on the CPU")
    for key, label in (("on_chip_memory_used_bytes", "on-chip"),
                       ("off_chip_memory_used_bytes", "off-chip")):
        if compiler.get(key) is not None:
            parts.append(f"{label} parameters {_format_bytes(compiler[key])}")
    parts += compiler.get("errors") or []
    return "; ".join(parts)


# ----------------------------------------------------------------------------- small helpers


@functools.cache
def _enum_names(enum_class) -> dict[int, str]:
    return {v: k for k, v in vars(enum_class).items()
            if not k.startswith("_") and isinstance(v, int)}


def _type_name(code: int) -> str:
    from tensorflow.lite.python import schema_py_generated as schema

    return _enum_names(schema.TensorType).get(int(code), f"TYPE_{code}")


def _activation_name(code: int) -> str:
    from tensorflow.lite.python import schema_py_generated as schema

    return _enum_names(schema.ActivationFunctionType).get(int(code), str(code))


def _itemsize(type_name: str) -> int:
    dtype = _NUMPY_TYPES.get(type_name)
    return np.dtype(dtype).itemsize if dtype is not None else 0


def _buffer_data(model, tensor):
    """The tensor's constant bytes; None for a non-constant one (buffer 0 is the empty one)."""
    if not tensor.buffer or tensor.buffer >= len(model.buffers or []):
        return None
    data = model.buffers[tensor.buffer].data
    return data if data is not None and len(data) else None


def _is_all_zero(graph: _Graph, t: int) -> bool:
    values = graph.values(t).astype(np.int64)
    zero_points = graph.zero_points(t) or [0]
    return bool(np.all(values == zero_points[0]))


def _tensor_name(tensor) -> str:
    return _decode(tensor.name)


def _decode(value) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _as_list(value) -> list:
    return [] if value is None else list(value)


def _num_elements(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _non_unit_dims(shape) -> int:
    return sum(int(d) > 1 for d in shape)


def _format_bytes(n: int) -> str:
    for unit, factor in (("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n} B"
