"""Packed k-bit weights: exact round trip, size, and untrusted-file validation."""

import json
import struct
import zlib

import keras
import numpy as np
import pytest

import tfq
from tfq.export import packed

SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(11)
    m = tfq.models.build("resnet20", num_classes=10, input_shape=SHAPE, w_bits=2, a_bits=2)
    x = np.random.default_rng(0).uniform(-1, 1, (32,) + SHAPE).astype(np.float32)
    for _ in range(3):  # non-trivial BatchNorm statistics
        m(x, training=True)
    return m


@pytest.fixture(scope="module")
def data(model):
    return packed.encode(model)


def _images(n=16):
    return np.random.default_rng(1).uniform(-1, 1, (n,) + SHAPE).astype(np.float32)


def _reseal(body_without_crc):
    return body_without_crc + struct.pack("<I", zlib.crc32(body_without_crc))


def _write(tmp_path, data, name="m.tfqpack"):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_round_trip_identical_predictions_and_levels(model, data, tmp_path):
    path = tmp_path / "m.tfqpack"
    assert packed.save(model, path) == len(data)
    restored = packed.load(path)
    x = _images()
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))
    for layer in tfq.precision.iter_layers(model):
        if isinstance(layer, tfq.QConv2D):
            twin = restored.get_layer(layer.name)
            np.testing.assert_array_equal(layer.kernel_quantizer(layer.kernel).numpy(),
                                          twin.kernel_quantizer(twin.kernel).numpy())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_size_bound_and_bit_packing(bits, tmp_path):
    keras.utils.set_random_seed(bits)
    m = tfq.models.build("resnet20", num_classes=10, input_shape=SHAPE, w_bits=bits,
                         a_bits=bits)
    data = packed.encode(m)
    weights = len(data) - packed.config_bytes(data)
    assert weights <= (bits / 32 + 0.02) * packed.float_weight_bytes(m)
    # k bits per kernel weight: the payloads alone are ceil(count * k / 8) bytes.
    kernels = sum(int(np.prod(layer.kernel.shape)) for layer in tfq.precision.iter_layers(m)
                  if isinstance(layer, (tfq.QConv2D, tfq.QDense)))
    assert weights >= kernels * bits / 8
    restored = packed.load(_write(tmp_path, data))
    x = _images(4)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), m.predict(x, verbose=0))


def test_bit_packing_matches_numpy_reference():
    rng = np.random.default_rng(3)
    for bits in range(1, 9):
        values = rng.integers(0, 2**bits, 1001)
        blob = packed._pack_bits(values, bits)
        assert len(blob) == (1001 * bits + 7) // 8
        # Reference: bit b of element e is bit e*k+b of the stream, LSB first per byte.
        stream = np.zeros(len(blob) * 8, np.uint8)
        for e, v in enumerate(values):
            for b in range(bits):
                stream[e * bits + b] = (v >> b) & 1
        assert blob == np.packbits(stream, bitorder="little").tobytes()
        np.testing.assert_array_equal(packed._unpack_bits(blob, 1001, bits), values)


def test_full_precision_and_pinned_layers_stay_float(tmp_path):
    keras.utils.set_random_seed(5)
    m = tfq.models.build("resnet20", num_classes=10, input_shape=SHAPE, w_bits=4, a_bits=4,
                         fp_first_last=True)
    restored = packed.load(_write(tmp_path, packed.encode(m)))
    np.testing.assert_array_equal(restored.get_layer("stem").kernel.numpy(),
                                  m.get_layer("stem").kernel.numpy())
    np.testing.assert_array_equal(restored.get_layer("fc").kernel.numpy(),
                                  m.get_layer("fc").kernel.numpy())


# ----------------------------------------------------------------------------- bad files


def _header(data):
    return list(packed._HEADER.unpack_from(data))


def _with_header(data, **changes):
    fields = _header(data)
    names = ["magic", "version", "flags", "n_tensors", "config_len", "config_raw_len",
             "data_len"]
    for k, v in changes.items():
        fields[names.index(k)] = v
    return _reseal(packed._HEADER.pack(*fields) + data[packed._HEADER.size:-4])


def _first_record_offset(data):
    return packed._HEADER.size + _header(data)[4]


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d[:10], "header"),
    (lambda d: d[: len(d) // 2], "crc32"),
    (lambda d: b"NOTPACK\0" + d[8:], "magic"),
    (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "crc32"),
    (lambda d: _with_header(d, version=7), "version"),
    (lambda d: _with_header(d, n_tensors=2**31), "n_tensors"),
    (lambda d: _with_header(d, n_tensors=60000), "n_tensors"),
    (lambda d: _with_header(d, config_raw_len=2**31), "config_raw_len"),
    (lambda d: _with_header(d, data_len=2**62), "data_len"),
    (lambda d: _with_header(d, config_len=2**31), "config_len"),
    (lambda d: _with_header(d, config_raw_len=_header(d)[5] - 1), "config"),
])
def test_corrupt_headers_are_rejected_by_field(data, tmp_path, mutate, field):
    path = _write(tmp_path, mutate(data))
    with pytest.raises(packed.PackedFormatError) as err:
        packed.load(path)
    assert path in str(err.value) and field in str(err.value)


def _patch_first_record(data, fmt, offset_in_record, value):
    """Rewrites one field of the first tensor record and reseals the checksum."""
    at = _first_record_offset(data) + offset_in_record
    body = bytearray(data[:-4])
    struct.pack_into(fmt, body, at, value)
    return _reseal(bytes(body))


def test_corrupt_tensor_records_are_rejected_by_field(data, tmp_path):
    name_len = struct.unpack_from("<H", data, _first_record_offset(data))[0]
    head = 2 + name_len
    cases = {
        "name_len": _patch_first_record(data, "<H", 0, 0),
        "encoding": _patch_first_record(data, "<B", head, 9),
        "bits": _patch_first_record(data, "<B", head + 1, 12),
        "ndim": _patch_first_record(data, "<B", head + 2, 200),
        "dims": _patch_first_record(data, "<I", head + 4, 2**31 - 1),
    }
    ndim = data[_first_record_offset(data) + head + 2]
    tail = head + 4 + 4 * ndim
    cases["offset"] = _patch_first_record(data, "<Q", tail + 8, 2**40)
    cases["nbytes"] = _patch_first_record(data, "<Q", tail + 16, 3)
    for field, bad in cases.items():
        path = _write(tmp_path, bad, f"{field}.tfqpack")
        with pytest.raises(packed.PackedFormatError, match=field):
            packed.load(path)


def test_file_that_does_not_match_its_model(model, data, tmp_path):
    # Same tensors, a different architecture in the config: shapes no longer match.
    cfg_start = packed._HEADER.size
    cfg_len = _header(data)[4]
    config = json.loads(zlib.decompress(data[cfg_start:cfg_start + cfg_len]))
    config["model"]["config"]["layers"][2]["config"]["filters"] = 8  # the stem conv
    raw = json.dumps(config).encode()
    blob = zlib.compress(raw)
    fields = _header(data)
    fields[4], fields[5] = len(blob), len(raw)
    bad = _reseal(packed._HEADER.pack(*fields) + blob + data[cfg_start + cfg_len:-4])
    with pytest.raises(packed.PackedFormatError, match="dims|cannot be rebuilt"):
        packed.load(_write(tmp_path, bad))


def test_levels_that_are_not_a_dorefa_kernel(model, tmp_path):
    # A kernel whose levels never reach +-1 cannot come from eq. (2).
    m = tfq.models.build("resnet20", num_classes=10, input_shape=SHAPE, w_bits=2, a_bits=2)
    m.set_weights(model.get_weights())
    data = bytearray(packed.encode(m))
    cfg = packed._HEADER.size + _header(bytes(data))[4]
    name_len = struct.unpack_from("<H", data, cfg)[0]
    name = bytes(data[cfg + 2:cfg + 2 + name_len]).decode()
    ndim = data[cfg + 2 + name_len + 2]
    tail = cfg + 2 + name_len + 4 + 4 * ndim
    offset, nbytes = struct.unpack_from("<QQ", data, tail + 8)
    start = len(data) - 4 - _header(bytes(data))[6] + offset
    assert name.endswith("kernel")
    data[start:start + nbytes] = bytes([0b01010101]) * nbytes  # every level 1 of 0..3
    with pytest.raises(packed.PackedFormatError, match="does not reach|not a DoReFa"):
        packed.load(_write(tmp_path, _reseal(bytes(data[:-4]))))
