"""Edge TPU compatibility checker: real int8 conversions of small Keras models, edited flatbuffers,
and a fake `edgetpu_compiler` for the log parser.

Calibration uses the real scikit-learn digits (8x8, repeated to RGB, in [-1, 1] like tfq inputs).
"""

import json
import os
import stat
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.python import schema_util
from tensorflow.lite.tools import flatbuffer_utils

from tfq.export import edgetpu

L = keras.layers
SHAPE = (8, 8, 3)


# ----------------------------------------------------------------------------- helpers


def _digits():
    images = load_digits().images[:64].astype(np.float32) / 16.0
    images = images - images.mean(axis=0)  # per-pixel mean, like the tfq input pipeline
    return np.repeat(images[..., None], 3, axis=-1)


def _convert(model, *, batch=1, quantize=True, int8_only=True, dense_per_tensor=True):
    """Full-integer PTQ from a concrete function with a fixed input signature."""
    spec = tf.TensorSpec((batch,) + tuple(model.input_shape[1:]), tf.float32)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    if quantize:
        data = _digits()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([data[i:i + 1]] for i in range(32))
        if int8_only:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        converter._experimental_disable_per_channel_quantization_for_dense_layers = dense_per_tensor
    return converter.convert()


def _cnn():
    """Conv-BN-ReLU, residual Add, pools, depthwise, GAP, Dense, softmax: all Edge TPU ops."""
    inp = keras.Input(SHAPE, name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inp)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    y = L.Conv2D(8, 3, padding="same", name="conv2")(x)
    x = L.Add()([x, y])
    x = L.MaxPooling2D(2)(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.AveragePooling2D(2)(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(10, name="fc")(x)
    return keras.Model(inp, L.Activation("softmax")(x))


CNN_OPS = ["CONV_2D", "CONV_2D", "ADD", "MAX_POOL_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D",
           "MEAN", "FULLY_CONNECTED", "SOFTMAX"]


def _reference_macs(model):
    """MACs per layer type from the Keras layer shapes (independent of the flatbuffer)."""
    macs = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 0, "FULLY_CONNECTED": 0}
    for layer in model.layers:
        out = int(np.prod(layer.output.shape[1:]))
        if isinstance(layer, L.DepthwiseConv2D):
            macs["DEPTHWISE_CONV_2D"] += out * int(np.prod(layer.kernel_size))
        elif isinstance(layer, L.Conv2D):
            macs["CONV_2D"] += out * int(np.prod(layer.kernel.shape[:-1]))
        elif isinstance(layer, L.Dense):
            macs["FULLY_CONNECTED"] += out * int(layer.kernel.shape[0])
    return macs


def _edit(data, change):
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    change(model)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _op_name(model, op):
    code = schema_util.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])
    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}[code]


def _set_version(name, version):
    def change(model):
        for code in model.operatorCodes:
            if schema_util.get_builtin_code_from_operator_code(code) == getattr(
                    schema.BuiltinOperator, name):
                code.version = version
    return change


def _set_option(name, attribute, value):
    def change(model):
        op = next(o for o in model.subgraphs[0].operators if _op_name(model, o) == name)
        setattr(op.builtinOptions, attribute, value)
    return change


@pytest.fixture(scope="module")
def cnn():
    keras.utils.set_random_seed(0)
    return _cnn()


@pytest.fixture(scope="module")
def cnn_int8(cnn):
    return _convert(cnn)


@pytest.fixture(scope="module")
def cumsum_fallback():
    """A float CUMSUM between int8 convs: the converter falls back to float around it."""
    keras.utils.set_random_seed(0)
    inp = keras.Input(SHAPE)
    x = L.Conv2D(4, 3, padding="same")(inp)
    x = L.Lambda(lambda v: tf.math.cumsum(v, axis=1))(x)
    x = L.Conv2D(4, 3)(x)
    return _convert(keras.Model(inp, x), int8_only=False)


# ----------------------------------------------------------------------------- compatible model


def test_compatible_int8_cnn_maps_entirely(cnn, cnn_int8):
    rep = edgetpu.check(cnn_int8)
    assert rep.compatible, rep.problems
    assert rep.problems == []
    assert [op.name for op in rep.ops] == CNN_OPS
    assert all(op.maps and op.runs_on == "tpu" and op.reason is None for op in rep.ops)
    assert rep.tpu_op_share == 1.0 and rep.tpu_mac_share == 1.0
    assert edgetpu.ensure_compatible(cnn_int8).compatible


def test_macs_match_keras_layer_shapes(cnn, cnn_int8):
    rep = edgetpu.check(cnn_int8)
    reference = _reference_macs(cnn)
    for name, expected in reference.items():
        assert sum(op.macs for op in rep.ops if op.name == name) == expected, name
    assert rep.total_macs == sum(reference.values())
    assert all(op.macs == 0 for op in rep.ops if op.name not in reference)


def test_param_bytes_counts_int8_weights_and_int32_biases(cnn, cnn_int8):
    rep = edgetpu.check(cnn_int8)
    kernels = sum(int(np.prod(layer.kernel.shape))
                  for layer in cnn.layers if hasattr(layer, "kernel"))
    channels = 8 + 8 + 8 + 10  # at most one int32 bias per output channel (BN folded into conv1)
    assert kernels <= rep.param_bytes <= kernels + 4 * channels + 64
    assert rep.fits_on_chip and rep.on_chip_bytes == 8 * 1024 * 1024


def test_path_and_bytes_agree_and_report_serialises(cnn_int8, tmp_path):
    path = tmp_path / "cnn_int8.tflite"
    path.write_bytes(cnn_int8)
    from_path, from_bytes = edgetpu.check(path), edgetpu.check(cnn_int8)
    assert from_path.source == str(path) and from_bytes.source == "<bytes>"
    assert from_path.ops == from_bytes.ops
    d = json.loads(json.dumps(from_path.to_dict()))
    assert d["compatible"] is True and d["num_ops"] == len(CNN_OPS) and d["compiler"] is None
    assert [op["name"] for op in d["ops"]] == CNN_OPS
    table = from_path.format_table()
    assert "compatible: yes" in table and all(name in table for name in CNN_OPS)


# ----------------------------------------------------------------------------- incompatible models


def test_dense_per_channel_weights_by_default_are_rejected(cnn):
    data = _convert(cnn, dense_per_tensor=False)  # TF 2.21's default: per-channel Dense weights
    rep = edgetpu.check(data)
    fc = CNN_OPS.index("FULLY_CONNECTED")
    assert not rep.compatible
    assert rep.ops[fc].name == "FULLY_CONNECTED" and not rep.ops[fc].maps
    assert "per-channel" in rep.ops[fc].reason
    assert len(rep.problems) == 1 and rep.problems[0].startswith(f"op {fc} FULLY_CONNECTED")
    # The first unmappable op sends it and everything after it (the softmax) to the CPU.
    assert [op.runs_on for op in rep.ops] == ["tpu"] * fc + ["cpu"] * (len(CNN_OPS) - fc)
    assert rep.ops[-1].maps and "cannot partition" in rep.ops[-1].note
    assert rep.tpu_op_share == pytest.approx(fc / len(CNN_OPS))
    macs = _reference_macs(cnn)
    assert rep.tpu_macs == macs["CONV_2D"] + macs["DEPTHWISE_CONV_2D"]
    with pytest.raises(edgetpu.EdgeTpuIncompatible, match="per-channel") as err:
        edgetpu.ensure_compatible(data)
    assert isinstance(err.value, ValueError) and err.value.report.problems == rep.problems


def _conv_flatten_dense():
    keras.utils.set_random_seed(0)
    inp = keras.Input(SHAPE)
    x = L.Flatten()(L.Conv2D(4, 3, padding="same")(inp))
    return keras.Model(inp, L.Dense(5)(x))


def test_dynamic_batch_is_rejected_as_a_whole():
    rep = edgetpu.check(_convert(_conv_flatten_dense(), batch=None))
    assert not rep.compatible
    assert any("dynamic shapes" in p and "-1" in p for p in rep.problems)
    assert rep.tpu_op_share == 0.0 and all(op.runs_on == "cpu" for op in rep.ops)


def test_float_model_is_rejected():
    rep = edgetpu.check(_convert(_conv_flatten_dense(), quantize=False))
    assert not rep.compatible
    assert any("not quantized" in p for p in rep.problems)
    assert any("FLOAT32" in p for p in rep.problems)
    assert rep.tpu_op_share == 0.0 and not any(op.maps for op in rep.ops)


def test_float_fallback_op_ends_the_tpu_segment(cumsum_fallback):
    rep = edgetpu.check(cumsum_fallback)
    names = [op.name for op in rep.ops]
    assert names == ["QUANTIZE", "CONV_2D", "DEQUANTIZE", "CUMSUM", "QUANTIZE", "CONV_2D",
                     "DEQUANTIZE"]
    assert not rep.compatible
    # Float model input/output: boundary conversions on the CPU that do not break the segment.
    assert rep.ops[0].runs_on == "cpu" and rep.ops[0].reason is None
    assert rep.ops[1].runs_on == "tpu"
    assert [op.runs_on for op in rep.ops[2:]] == ["cpu"] * 5
    assert any("op 0 QUANTIZE" in w for w in rep.warnings)
    assert "not in the Edge TPU's supported operations" in rep.ops[2].reason
    assert "FLOAT32" in rep.ops[3].reason and "CUMSUM" in rep.ops[3].reason
    assert not any(p.startswith("op 0 ") or p.startswith("op 6 ") for p in rep.problems)
    assert rep.tpu_op_share == pytest.approx(1 / 7)


def test_unsupported_int8_op_puts_the_rest_on_the_cpu():
    keras.utils.set_random_seed(0)
    inp = keras.Input(SHAPE)
    x = L.Conv2D(4, 3, padding="same")(inp)
    x = L.LeakyReLU()(x)  # int8 in TFLite, but not in Coral's list
    x = L.GlobalAveragePooling2D()(L.Conv2D(4, 3)(x))
    rep = edgetpu.check(_convert(keras.Model(inp, x)))
    assert [op.name for op in rep.ops] == ["CONV_2D", "LEAKY_RELU", "CONV_2D", "MEAN"]
    assert [(op.maps, op.runs_on) for op in rep.ops] == [
        (True, "tpu"), (False, "cpu"), (True, "cpu"), (True, "cpu")]
    assert len(rep.problems) == 1 and "op 1 LEAKY_RELU" in rep.problems[0]
    first, second = 8 * 8 * 4 * 3 * 3 * 3, 6 * 6 * 4 * 3 * 3 * 4
    assert (rep.tpu_macs, rep.total_macs) == (first, first + second)
    assert rep.tpu_mac_share == pytest.approx(first / (first + second))


@pytest.mark.parametrize("model, op, version, limit", [
    ("cnn_int8", "CONV_2D", 6, 5),          # CONV_2D v6: rejected by compiler 16 (coral#631)
    ("cumsum_fallback", "QUANTIZE", 3, 2),  # per-channel QUANTIZE v3 (coral#879)
])
def test_too_new_op_version_is_rejected(request, model, op, version, limit):
    data = request.getfixturevalue(model)
    rep = edgetpu.check(_edit(data, _set_version(op, version)))
    assert not rep.compatible and rep.tpu_op_share == 0.0
    assert any(op in p and f"version {version}" in p and f"version {limit}" in p
               for p in rep.problems)
    # The highest accepted version alone changes nothing.
    at_limit = edgetpu.check(_edit(data, _set_version(op, limit)))
    assert at_limit.problems == edgetpu.check(data).problems


def test_fused_activation_on_pool_and_uneven_dilation(cnn_int8):
    relu = schema.ActivationFunctionType.RELU
    fused = _set_option("MAX_POOL_2D", "fusedActivationFunction", relu)
    rep = edgetpu.check(_edit(cnn_int8, fused))
    pool = CNN_OPS.index("MAX_POOL_2D")
    assert not rep.ops[pool].maps and "fused activation (RELU)" in rep.ops[pool].reason
    assert [op.runs_on for op in rep.ops[:pool]] == ["tpu"] * pool
    rep = edgetpu.check(_edit(cnn_int8, _set_option("CONV_2D", "dilationWFactor", 2)))
    assert not rep.ops[0].maps and "dilation 1x2" in rep.ops[0].reason
    assert rep.tpu_op_share == 0.0


def test_batch_of_two_breaks_the_innermost_three_dims_rule(cnn):
    rep = edgetpu.check(_convert(cnn, batch=2))
    assert not rep.compatible and not rep.ops[0].maps
    assert "only the 3 innermost dimensions" in rep.ops[0].reason
    fc = rep.ops[CNN_OPS.index("FULLY_CONNECTED")]
    assert "not one-dimensional" in fc.reason


def test_parameters_larger_than_on_chip_memory_stream_but_stay_compatible():
    keras.utils.set_random_seed(0)
    inp = keras.Input((3000,))
    model = keras.Model(inp, L.Dense(3000)(inp))
    spec = tf.TensorSpec((1, 3000), tf.float32)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    converter.representative_dataset = lambda: (
        [rng.uniform(-1, 1, (1, 3000)).astype(np.float32)] for _ in range(4))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    data = converter.convert()
    rep = edgetpu.check(data)
    assert rep.param_bytes >= 3000 * 3000 > edgetpu.ON_CHIP_BYTES
    assert not rep.fits_on_chip and rep.compatible
    assert any("off-chip" in w for w in rep.warnings)
    assert edgetpu.check(data, on_chip_bytes=16 * 2**20).fits_on_chip


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors(cnn_int8, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tflite"):
        edgetpu.check(tmp_path / "missing.tflite")
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"this is not a flatbuffer")
    with pytest.raises(ValueError, match="TFL3"):
        edgetpu.check(junk)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        edgetpu.check(cnn_int8[: len(cnn_int8) // 2])
    with pytest.raises(TypeError, match="path or the model's bytes"):
        edgetpu.check(123)


# ----------------------------------------------------------------------------- compiler


FAKE_COMPILER = '''\
#!{python}
"""Stands in for edgetpu_compiler 16: prints the console log format quoted in coral issues."""
import os, pathlib, sys, time
args = sys.argv[1:]
out = pathlib.Path(args[args.index("-o") + 1])
model = pathlib.Path(args[-1])
compiled, log = out / (model.stem + "_edgetpu.tflite"), out / (model.stem + "_edgetpu.log")
mode = os.environ["FAKE_EDGETPU_MODE"]
print("Edge TPU Compiler version 16.0.384591198")
if mode == "slow":
    time.sleep(30)
if mode == "fail":
    print("ERROR: Didn't find op for builtin opcode 'CONV_2D' version '6'. An older version of "
          "this builtin might be supported. Are you using an old TFLite binary with a newer model?")
    print()
    print("ERROR: Registration failed.")
    print()
    print("Invalid model: " + str(model))
    print("Model could not be parsed")
    sys.exit(1)
table = """Operator                       Count      Status

CONV_2D                        2          Mapped to Edge TPU
ADD                            1          Mapped to Edge TPU
MAX_POOL_2D                    1          Mapped to Edge TPU
DEPTHWISE_CONV_2D              1          Mapped to Edge TPU
AVERAGE_POOL_2D                1          Mapped to Edge TPU
MEAN                           1          Mapped to Edge TPU
FULLY_CONNECTED                1          Operation is otherwise supported, but not mapped due to some unspecified limitation
SOFTMAX                        1          More than one subgraph is not supported
"""
compiled.write_bytes(model.read_bytes())
log.write_text("Edge TPU Compiler version 16.0.384591198\\nInput: %s\\nOutput: %s\\n\\n%s"
               % (model, compiled, table))
print("Started a compilation timeout timer of 180 seconds.")
print()
print("Model compiled successfully in 1379 ms.")
print()
print("Input model: " + str(model))
print("Input size: 4.41MiB")
print("Output model: " + str(compiled))
print("Output size: 5.49MiB")
print("On-chip memory used for caching model parameters: 1.92MiB")
print("On-chip memory remaining for caching model parameters: 1.75KiB")
print("Off-chip memory used for streaming uncached model parameters: 0.00B")
print("Number of Edge TPU subgraphs: 1")
print("Total number of operations: 9")
print("Operation log: " + str(log))
print()
if mode == "partial":
    print("Model successfully compiled but not all operations are supported by the Edge TPU. "
          "A percentage of the model will instead run on the CPU, which is slower.")
    print("Number of operations that will run on Edge TPU: 7")
    print("Number of operations that will run on CPU: 2")
    print()
    print(table)
else:
    print("See the operation log file for individual operation details.")
print("Compilation child process completed within timeout period.")
print("Compilation succeeded!")
'''


@pytest.fixture
def fake_compiler(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "edgetpu_compiler"
    script.write_text(FAKE_COMPILER.replace("{python}", sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return lambda mode: monkeypatch.setenv("FAKE_EDGETPU_MODE", mode)


def test_run_compiler_returns_none_without_the_compiler(cnn_int8, tmp_path, monkeypatch):
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    model = tmp_path / "m.tflite"
    model.write_bytes(cnn_int8)
    assert edgetpu.run_compiler(model, tmp_path / "out") is None
    rep = edgetpu.check(model, compiler_out_dir=tmp_path / "out")
    assert rep.compiler is None and rep.to_dict()["compiler"] is None
    assert "not run" in rep.format_table()


def test_run_compiler_parses_a_partial_mapping(cnn_int8, tmp_path, fake_compiler):
    fake_compiler("partial")
    model = tmp_path / "cnn.tflite"
    model.write_bytes(cnn_int8)
    result = edgetpu.run_compiler(model, tmp_path / "out")
    assert result["succeeded"] and result["returncode"] == 0 and result["errors"] == []
    assert result["version"] == "16.0.384591198"
    assert result["compiled_model"] == str(tmp_path / "out" / "cnn_edgetpu.tflite")
    assert result["log_file"] == str(tmp_path / "out" / "cnn_edgetpu.log")
    assert result["on_chip_memory_used_bytes"] == round(1.92 * 2**20)
    assert result["on_chip_memory_remaining_bytes"] == round(1.75 * 2**10)
    assert result["off_chip_memory_used_bytes"] == 0
    assert result["input_size_bytes"] == round(4.41 * 2**20)
    assert (result["total_ops"], result["ops_on_tpu"], result["ops_on_cpu"]) == (9, 7, 2)
    assert result["num_edgetpu_subgraphs"] == 1 and result["compile_time_ms"] == 1379
    ops = {row["operator"]: row for row in result["operators"]}
    assert ops["CONV_2D"] == {"operator": "CONV_2D", "count": 2, "status": "Mapped to Edge TPU",
                              "mapped": True}
    assert not ops["FULLY_CONNECTED"]["mapped"]
    assert "unspecified limitation" in ops["FULLY_CONNECTED"]["status"]
    assert sum(row["count"] for row in result["operators"]) == 9
    # check() attaches the result and notices that the compiler maps fewer ops than predicted.
    rep = edgetpu.check(model, compiler_out_dir=tmp_path / "out2")
    assert rep.compiler["ops_on_tpu"] == 7 and rep.compatible
    assert any("trust the compiler" in w for w in rep.warnings)
    assert json.loads(json.dumps(rep.to_dict()))["compiler"]["ops_on_cpu"] == 2
    assert "edgetpu_compiler 16.0.384591198: compiled" in rep.format_table()


def test_run_compiler_reads_the_operation_log_when_stdout_has_no_table(cnn_int8, tmp_path,
                                                                        fake_compiler):
    fake_compiler("log_only")
    result = edgetpu.check(cnn_int8, compiler_out_dir=tmp_path / "out").compiler
    assert result["succeeded"] and len(result["operators"]) == 8
    assert (result["ops_on_tpu"], result["ops_on_cpu"]) == (7, 2)
    assert (tmp_path / "out" / "model_edgetpu.tflite").is_file()


def test_run_compiler_reports_failures_and_timeouts(cnn_int8, tmp_path, fake_compiler):
    model = tmp_path / "cnn.tflite"
    model.write_bytes(cnn_int8)
    fake_compiler("fail")
    result = edgetpu.run_compiler(model, tmp_path / "out")
    assert not result["succeeded"] and result["returncode"] == 1
    assert result["compiled_model"] is None
    assert any("version '6'" in e for e in result["errors"])
    assert "Model could not be parsed" in result["errors"]
    fake_compiler("slow")
    result = edgetpu.run_compiler(model, tmp_path / "out", timeout=1)
    assert not result["succeeded"] and result["returncode"] is None
    assert any("did not finish within 1 s" in e for e in result["errors"])


def test_parse_compiler_output_of_a_log_file():
    text = textwrap.dedent("""\
        Edge TPU Compiler version 14.1.317412892
        Input: tiny_yolo.tflite
        Output: tiny_yolo_edgetpu.tflite

        Operator                       Count      Status

        CONCATENATION                  1          More than one subgraph is not supported
        MAX_POOL_2D                    6          Mapped to Edge TPU
        RESIZE_NEAREST_NEIGHBOR        1          Operation version not supported
        CONV_2D                        11         Mapped to Edge TPU
        """)
    result = edgetpu.parse_compiler_output(text)
    assert result["version"] == "14.1.317412892" and result["errors"] == []
    assert [(r["operator"], r["count"], r["mapped"]) for r in result["operators"]] == [
        ("CONCATENATION", 1, False), ("MAX_POOL_2D", 6, True),
        ("RESIZE_NEAREST_NEIGHBOR", 1, False), ("CONV_2D", 11, True)]
    assert (result["ops_on_tpu"], result["ops_on_cpu"]) == (17, 2)
    assert result["on_chip_memory_used_bytes"] is None
