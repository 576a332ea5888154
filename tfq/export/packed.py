"""Packed k-bit weights: a compact file that restores a tfq Keras model exactly.

A k-bit DoReFa kernel holds only ``2^k`` values, ``w_q = -1 + j * 2 / (2^k - 1)``
with ``j`` in 0..2^k-1. The packed file stores ``j`` in k bits per weight, plus
per-tensor ``scale`` / ``offset`` (``w_q = offset + scale * j``); everything else
(BatchNorm parameters, biases, the ``Scalar``, full-precision or pinned layers)
is stored as float32. The model's Keras config is stored with it.

Loading rebuilds the model from its config and gives every k-bit layer the kernel
``atanh(w_q / 2)``: the layer's own weight quantizer maps it back to the same
level ``j`` (far from any rounding boundary), and the quantized weights the
layer computes depend only on ``j``, so the restored model's predictions are
identical to the original's. The loader checks this for every layer.

File format, version 1 (all integers little-endian; offsets in bytes)::

    offset  size  field
    0       8     magic b"TFQPACK\\0"
    8       2     u16 format version (1)
    10      2     u16 flags (0)
    12      4     u32 n_tensors (1..65536)
    16      4     u32 config_len: bytes of the zlib-compressed config
    20      4     u32 config_raw_len: its decompressed length (<= 64 MiB)
    24      8     u64 data_len: bytes of the data section
    32      ...   config: zlib(UTF-8 JSON {"format": "tfq-packed", "version": 1,
                  "keras_version": str, "model": <model.to_json() object>})
    ...     ...   tensor table, n_tensors records:
                    u16 name_len (1..1024), name: UTF-8 variable path ("conv1/kernel")
                    u8  encoding: 0 = float32, 1 = k-bit levels
                    u8  bits: 32 for float32, 1..8 for levels
                    u8  ndim (0..8), u8 reserved (0)
                    ndim x u32 dims (the element count is at most 2^31 - 1)
                    f32 scale, f32 offset (levels: value = offset + scale * j;
                        float32: 1, 0)
                    u64 data offset (from the start of the data section), u64 nbytes
    ...     data_len  data section: the tensors' payloads, each 8-byte aligned.
                  float32: little-endian IEEE values, C order. levels: element e
                  (C order) occupies bits e*k .. e*k+k-1 of the payload, least
                  significant bit first (bit b of the payload is bit b % 8 of byte
                  b // 8); nbytes = ceil(count * k / 8).
    end-4   4     u32 CRC-32 (zlib.crc32) of every preceding byte

Every length, count, shape and bit-width read from a file is checked against the
file size and these limits before anything is allocated; a bad file raises
``PackedFormatError`` naming the file and the field.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib

import keras
import numpy as np

from tfq import layers as qlayers
from tfq import quantizers as qz
from tfq.precision import iter_layers

MAGIC = b"TFQPACK\0"
VERSION = 1
_HEADER = struct.Struct("<8sHHIIIQ")
_RECORD_HEAD = struct.Struct("<BBBB")
_RECORD_TAIL = struct.Struct("<ffQQ")
MAX_TENSORS = 65536
MAX_CONFIG_BYTES = 64 * 1024 * 1024
MAX_NAME = 1024
MAX_NDIM = 8
MAX_ELEMENTS = 2**31 - 1
FLOAT32, LEVELS = 0, 1


class PackedFormatError(ValueError):
    """A packed file is malformed, truncated, or does not match its model."""


def _fail(path, field, problem):
    raise PackedFormatError(f"{path}: {field}: {problem}")


# ------------------------------------------------------------------------ writing


def _level_kernels(model):
    """{variable path: bits} of the kernels stored as k-bit levels."""
    out = {}
    for layer in iter_layers(model):
        if isinstance(layer, (qlayers.QConv2D, qlayers.QDense)) and \
                layer.w_bits != qz.FULL_PRECISION:
            out[layer.kernel.path] = layer
    return out


def _pack_bits(values, bits):
    """Packs non-negative ints < 2^bits, LSB first."""
    values = np.asarray(values, np.uint8).reshape(-1)
    bit_matrix = np.unpackbits(values[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data, count, bits):
    flat = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[:count * bits]
    weights = (1 << np.arange(bits, dtype=np.uint16))
    return (flat.reshape(count, bits).astype(np.uint16) * weights).sum(axis=1).astype(np.int64)


def _levels_of(layer):
    """Level indices j of a k-bit kernel and (scale, offset)."""
    bits = layer.w_bits
    n = 2**bits - 1
    w_q = np.asarray(keras.ops.convert_to_numpy(layer.kernel_quantizer(layer.kernel)),
                     np.float64)
    j = np.round((w_q + 1.0) * n / 2.0)
    if np.max(np.abs(j - (w_q + 1.0) * n / 2.0), initial=0.0) > 1e-3:
        raise ValueError(f"layer {layer.name!r}: quantized kernel is not on the {bits}-bit grid")
    return j.astype(np.int64), bits, 2.0 / n, -1.0


def encode(model):
    """The packed bytes of ``model`` (see the module docstring)."""
    level_kernels = _level_kernels(model)
    records, payloads = [], []
    offset = 0
    for var in model.weights:
        value = np.asarray(keras.ops.convert_to_numpy(var), np.float32)
        if var.path in level_kernels:
            j, bits, scale, shift = _levels_of(level_kernels[var.path])
            payload = _pack_bits(j, bits)
            encoding = LEVELS
        else:
            payload = value.astype("<f4").tobytes()
            bits, scale, shift, encoding = 32, 1.0, 0.0, FLOAT32
        name = var.path.encode("utf-8")
        if not 0 < len(name) <= MAX_NAME:
            raise ValueError(f"weight path {var.path!r} is empty or too long to pack")
        records.append(struct.pack("<H", len(name)) + name
                       + _RECORD_HEAD.pack(encoding, bits, value.ndim, 0)
                       + struct.pack(f"<{value.ndim}I", *value.shape)
                       + _RECORD_TAIL.pack(scale, shift, offset, len(payload)))
        pad = (-len(payload)) % 8
        payloads.append(payload + b"\0" * pad)
        offset += len(payload) + pad
    config = json.dumps({"format": "tfq-packed", "version": VERSION,
                         "keras_version": keras.__version__,
                         "model": json.loads(model.to_json())}).encode("utf-8")
    packed_config = zlib.compress(config, 9)
    data = b"".join(payloads)
    header = _HEADER.pack(MAGIC, VERSION, 0, len(records), len(packed_config), len(config),
                          len(data))
    body = header + packed_config + b"".join(records) + data
    return body + struct.pack("<I", zlib.crc32(body))


def save(model, path):
    """Writes ``model`` packed to ``path`` (atomically: temp file, then rename).

    Returns:
      The number of bytes written.
    """
    data = encode(model)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".tfqpack", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return len(data)


def config_bytes(data):
    """Bytes of the (compressed) architecture config inside packed ``data``."""
    return _HEADER.unpack_from(data)[4]


def float_weight_bytes(model):
    """Bytes of all of ``model``'s weights as float32 (the packed size reference)."""
    return int(sum(4 * int(np.prod(v.shape)) for v in model.weights))


# ------------------------------------------------------------------------ reading


class _Reader:
    """Bounds-checked reads from a byte string, with errors naming the file."""

    def __init__(self, data, path, end):
        self.data, self.path, self.pos, self.end = data, path, 0, end

    def take(self, n, field):
        if n < 0 or self.pos + n > self.end:
            _fail(self.path, field, f"needs {n} bytes at offset {self.pos}, but only "
                                    f"{self.end - self.pos} remain (truncated or corrupt)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt, field):
        return fmt.unpack(self.take(fmt.size, field))


def _parse(data, path):
    """(config dict, {name: (encoding, bits, shape, scale, offset, payload)})."""
    if len(data) < _HEADER.size + 4:
        _fail(path, "header", f"file has {len(data)} bytes; a packed file has at least "
                              f"{_HEADER.size + 4} (not a tfq packed file, or truncated)")
    if data[:8] != MAGIC:
        _fail(path, "magic", f"expected {MAGIC!r}, found {data[:8]!r} (not a tfq packed file)")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        _fail(path, "crc32", "checksum mismatch (file truncated or corrupted)")
    r = _Reader(data, path, len(data) - 4)
    _, version, flags, n_tensors, config_len, raw_len, data_len = r.unpack(_HEADER, "header")
    if version != VERSION:
        _fail(path, "version", f"{version} is not supported (this reader knows {VERSION})")
    if flags != 0:
        _fail(path, "flags", f"{flags} (expected 0)")
    if not 1 <= n_tensors <= MAX_TENSORS:
        _fail(path, "n_tensors", f"{n_tensors} (accepted: 1..{MAX_TENSORS})")
    if raw_len > MAX_CONFIG_BYTES:
        _fail(path, "config_raw_len", f"{raw_len} bytes (limit {MAX_CONFIG_BYTES})")
    if data_len > r.end - r.pos:
        _fail(path, "data_len", f"{data_len} bytes, more than the {r.end - r.pos} left in "
                                "the file")
    table_end = r.end - data_len
    if config_len > table_end - r.pos:
        _fail(path, "config_len", f"{config_len} bytes, more than the file holds")
    packed_config = r.take(config_len, "config")
    try:
        d = zlib.decompressobj()
        raw = d.decompress(packed_config, raw_len + 1)
        if len(raw) != raw_len or d.unconsumed_tail or not d.eof:
            raise ValueError(f"decompressed to {len(raw)} bytes, header says {raw_len}")
        config = json.loads(raw.decode("utf-8"))
    except (zlib.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        # RecursionError: JSON nested deeper than the interpreter's stack
        _fail(path, "config", f"unreadable ({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(config, dict) or config.get("format") != "tfq-packed" or \
            not isinstance(config.get("model"), dict):
        _fail(path, "config", "not a tfq-packed model config")
    min_record = 2 + 1 + _RECORD_HEAD.size + _RECORD_TAIL.size
    if n_tensors * min_record > table_end - r.pos:
        _fail(path, "n_tensors", f"{n_tensors} records cannot fit in the "
                                 f"{table_end - r.pos}-byte tensor table")
    r.end = table_end
    tensors = {}
    spans = []
    data_start = table_end
    for i in range(n_tensors):
        field = f"tensor[{i}]"
        (name_len,) = struct.unpack("<H", r.take(2, f"{field}.name_len"))
        if not 1 <= name_len <= MAX_NAME:
            _fail(path, f"{field}.name_len", f"{name_len} (accepted: 1..{MAX_NAME})")
        try:
            name = r.take(name_len, f"{field}.name").decode("utf-8")
        except UnicodeDecodeError:
            _fail(path, f"{field}.name", "not UTF-8")
        field = f"tensor {name!r}"
        encoding, bits, ndim, reserved = r.unpack(_RECORD_HEAD, f"{field}.encoding")
        if encoding not in (FLOAT32, LEVELS):
            _fail(path, f"{field}.encoding", f"{encoding} (accepted: 0 float32, 1 levels)")
        if (encoding == FLOAT32 and bits != 32) or (encoding == LEVELS and not 1 <= bits <= 8):
            _fail(path, f"{field}.bits", f"{bits} (float32: 32; levels: 1..8)")
        if ndim > MAX_NDIM or reserved != 0:
            _fail(path, f"{field}.ndim", f"{ndim} (accepted: 0..{MAX_NDIM}), reserved "
                                         f"{reserved}")
        shape = struct.unpack(f"<{ndim}I", r.take(4 * ndim, f"{field}.dims"))
        count = 1
        for dim in shape:
            count *= dim
            if count > MAX_ELEMENTS:
                _fail(path, f"{field}.dims", f"{shape}: more than {MAX_ELEMENTS} elements")
        scale, offset_value, offset, nbytes = r.unpack(_RECORD_TAIL, f"{field}.offset")
        expected = 4 * count if encoding == FLOAT32 else (count * bits + 7) // 8
        if nbytes != expected:
            _fail(path, f"{field}.nbytes", f"{nbytes}; shape {shape} at {bits} bits needs "
                                           f"{expected}")
        if offset % 8 or offset > data_len or nbytes > data_len - offset:
            _fail(path, f"{field}.offset", f"{offset} (+{nbytes} bytes) is outside the "
                                           f"{data_len}-byte data section or misaligned")
        if name in tensors:
            _fail(path, f"{field}.name", "appears twice")
        if not (np.isfinite(scale) and np.isfinite(offset_value)):
            _fail(path, f"{field}.scale", "not finite")
        spans.append((offset, offset + nbytes, name))
        tensors[name] = (encoding, bits, shape, scale, offset_value,
                         data[data_start + offset:data_start + offset + nbytes])
    if r.pos != table_end:
        _fail(path, "tensor table", f"ends at {r.pos}, data section starts at {table_end}")
    spans.sort()
    for (a0, a1, na), (b0, _, nb) in zip(spans, spans[1:]):
        if b0 < a1:
            _fail(path, f"tensor {nb!r}.offset", f"overlaps tensor {na!r}")
    return config, tensors


def _kernel_from_levels(path, name, layer, bits, scale, offset_value, j, shape):
    n = 2**bits - 1
    if layer.w_bits != bits:
        _fail(path, f"tensor {name!r}.bits", f"{bits}, but layer {layer.name!r} has "
                                             f"w_bits={layer.w_bits}")
    if not np.isclose(scale, 2.0 / n, rtol=1e-6) or not np.isclose(offset_value, -1.0):
        _fail(path, f"tensor {name!r}.scale", f"scale {scale} / offset {offset_value} are not "
                                              f"the {bits}-bit DoReFa grid (2/{n}, -1)")
    if j.max(initial=0) > n:
        _fail(path, f"tensor {name!r}", f"level {j.max()} exceeds {n}")
    w_q = -1.0 + j * (2.0 / n)
    if j.size and np.max(np.abs(w_q)) < 1.0 - 1e-9:
        # Only an all-zero kernel quantizes without reaching +-1; its levels are
        # then all the level just above zero.
        if np.all(j == (n + 1) // 2):
            return np.zeros(shape, np.float32)
        _fail(path, f"tensor {name!r}", "no weight reaches the +-1 level: not a DoReFa kernel")
    return np.arctanh(0.5 * w_q).astype(np.float32).reshape(shape)


def _rebuild(path, model_json):
    try:
        return keras.models.model_from_json(model_json)
    except Exception as e:  # Keras raises many types for a bad config
        _fail(path, "config.model", f"cannot be rebuilt ({type(e).__name__}: {str(e)[:300]})")


def _weight_shapes(path, model_json):
    """{weight path: shape} the config declares, found without allocating the weights.

    Built in a ``StatelessScope``, where Keras defers creating variables: a config is
    only text, and a few hundred bytes of it can declare gigabytes of kernels.
    """
    from keras.src.backend.common import global_state

    pending = global_state.get_global_attribute("uninitialized_variables", [])
    before = len(pending)
    try:
        with keras.StatelessScope(initialize_variables=False):
            probe = _rebuild(path, model_json)
            return {v.path: tuple(v.shape) for v in probe.weights}
    finally:
        # Forget the probe's deferred variables; they would otherwise be created
        # (allocated) when the next stateless scope ends.
        pending = global_state.get_global_attribute("uninitialized_variables", [])
        global_state.set_global_attribute("uninitialized_variables", pending[:before])


def _check_weights(path, shapes, tensors):
    """Fails unless ``shapes`` (weight path -> shape) and the tensor table agree."""
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        _fail(path, "tensor table", f"tensors not in the model: {extra[:5]}")
    for name, want in shapes.items():
        if name not in tensors:
            _fail(path, "tensor table", f"missing weight {name!r}")
        got = tuple(tensors[name][2])
        if got != tuple(want):
            _fail(path, f"tensor {name!r}.dims", f"{got}, the model expects {tuple(want)}")


def load(path):
    """Restores the Keras model of a packed file.

    Raises:
      PackedFormatError: the file is not a valid packed file, or its content does
        not match the model it describes (the message names file and field).
      FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    config, tensors = _parse(data, path)
    model_json = json.dumps(config["model"])
    _check_weights(path, _weight_shapes(path, model_json), tensors)
    # Every weight the config declares now matches a tensor the file holds, so
    # building allocates no more than the file's size.
    model = _rebuild(path, model_json)
    level_kernels = _level_kernels(model)
    _check_weights(path, {v.path: tuple(v.shape) for v in model.weights}, tensors)
    values = []
    for var in model.weights:
        encoding, bits, shape, scale, offset_value, payload = tensors[var.path]
        count = int(np.prod(shape, dtype=np.int64))
        if encoding == FLOAT32:
            if var.path in level_kernels:
                _fail(path, f"tensor {var.path!r}.encoding", "float32 for a k-bit kernel")
            values.append(np.frombuffer(payload, "<f4").astype(np.float32).reshape(shape))
        else:
            if var.path not in level_kernels:
                _fail(path, f"tensor {var.path!r}.encoding", "levels for a float weight")
            j = _unpack_bits(payload, count, bits)
            values.append(_kernel_from_levels(path, var.path, level_kernels[var.path], bits,
                                              scale, offset_value, j, shape))
    for var, value in zip(model.weights, values):
        var.assign(value)
    for name, layer in level_kernels.items():
        _, bits, shape, _, _, payload = tensors[name]
        j, *_ = _levels_of(layer)
        if not np.array_equal(j.reshape(-1), _unpack_bits(payload, j.size, bits)):
            _fail(path, f"tensor {name!r}", "restored kernel does not quantize back to the "
                                            "stored levels")
    return model
