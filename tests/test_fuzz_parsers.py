"""Issue 7: property-based fuzzing of every parser that reads an untrusted file.

Each parser gets valid files (seeds) mutated by truncation, flipped and inserted bytes,
boundary integers written over length fields, and random bytes; CRC-protected formats
(TFRecord, packed weights) are also fuzzed with their checksums recomputed, so that
mutations reach the fields behind the checksum. Every input must either parse or
raise the parser's documented error (``DataError``; ``PackedFormatError`` for packed
files) with the file's path in the message, within a bounded traced-memory peak.

Hypothesis runs derandomized (the same inputs on every CI run) with no example
database. ``TFQ_FUZZ_EXAMPLES`` scales the number of inputs per parser (default 1.0:
CI's budget; e.g. 20 for a long local campaign). The counts of inputs tried are
printed in pytest's terminal summary (see conftest.py).
"""

from __future__ import annotations

import collections
import gzip
import io
import os
import pickle
import struct
import tracemalloc
import zlib

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tfq
from tfq.data import DataError, cifar, idx, imagenet, tfrecord
from tfq.export import packed

from test_data_helpers import WNIDS, cifar_batch, png_bytes, rgb, tf_example

SCALE = float(os.environ.get("TFQ_FUZZ_EXAMPLES", "1"))
MAX_PEAK = 64 << 20  # traced bytes one input may make a parser allocate
# Inputs tried and how they ended, per parser: {parser: Counter(outcome)}.
TRIED = collections.defaultdict(collections.Counter)

BOUNDARY = [0, 1, 2, 7, 8, 127, 128, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000,
            0xFFFFFFFF, 1 << 40, (1 << 63) - 1, (1 << 64) - 1]
_INT_FORMATS = ["<B", "<H", ">H", "<I", ">I", "<Q", ">Q"]


def fuzz_settings(examples):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None,
                    derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@st.composite
def mutated(draw, seeds):
    """A seed with 1-4 mutations, or (rarely) random bytes."""
    data = bytearray(draw(st.sampled_from(seeds)))
    if draw(st.integers(0, 19)) == 0:
        return draw(st.binary(max_size=512))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "integer", "integer", "insert",
                                   "delete", "duplicate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "truncate":
            del data[at:]
        elif op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "integer":
            fmt = draw(st.sampled_from(_INT_FORMATS))
            value = draw(st.sampled_from(BOUNDARY)) & ((1 << (8 * struct.calcsize(fmt))) - 1)
            data[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif op == "duplicate":
            data[at:at] = data[at:at + draw(st.integers(1, 64))]
    return bytes(data)


def check(parser, path, run, errors):
    """Runs ``run()``; fails unless it returns or raises one of ``errors`` naming ``path``."""
    tracemalloc.start()
    try:
        try:
            run()
            outcome = "parsed"
        except errors as e:
            assert os.path.basename(path) in str(e), f"{parser}: error without the file: {e}"
            outcome = "refused"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    TRIED[parser][outcome] += 1
    assert peak < MAX_PEAK, f"{parser}: {peak >> 20} MB traced for a small file"


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ---------------------------------------------------------------- CIFAR pickles

def _pickle_seeds():
    batch, _, _ = cifar_batch(3, 10, 0)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    return [pickle.dumps(obj, protocol=p) for obj in (batch, meta) for p in (0, 2, 4, 5)]


@fuzz_settings(600)
@given(data=mutated(_pickle_seeds()))
def test_fuzz_cifar_pickles(tmp_path_factory, data):
    path = write(tmp_path_factory.getbasetemp() / "data_batch_1", data)
    check("CIFAR pickle", path, lambda: cifar._batch(path, "labels", 10), DataError)


# ---------------------------------------------------------------- MNIST idx files

def _idx_seeds():
    images = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4)
    labels = np.array([3, 7], np.uint8)
    raw = [struct.pack(">HBB", 0, 8, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
           + a.tobytes() for a in (images, labels)]
    return raw + [gzip.compress(r) for r in raw]


@fuzz_settings(500)
@given(data=mutated(_idx_seeds()), ndim=st.sampled_from([1, 3]), gz=st.booleans())
def test_fuzz_idx_files(tmp_path_factory, data, ndim, gz):
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = write(tmp_path_factory.getbasetemp() / name, data)
    check("MNIST idx", path, lambda: idx.read_idx(path, ndim), DataError)


# ---------------------------------------------------------------- ILSVRC label files

_VAL_NAMES = [f"ILSVRC2012_val_{i:08d}" for i in range(1, 5)]


def _label_seeds():
    csv = "ImageId,PredictionString\n" + "".join(
        f"{n},{WNIDS[i % 3]} 1 2 3 4\n" for i, n in enumerate(_VAL_NAMES))
    simple = "".join(f"{n}.JPEG,{WNIDS[i % 3]}\n" for i, n in enumerate(_VAL_NAMES))
    ids = "".join(f"{i % 3 + 1}\n" for i in range(4))
    wnids = "".join(f"{WNIDS[i % 3]}\n" for i in range(4))
    return [t.encode() for t in (csv, simple, ids, wnids)]


@fuzz_settings(600)
@given(data=mutated(_label_seeds()))
def test_fuzz_ilsvrc_label_files(tmp_path_factory, data):
    root = tmp_path_factory.getbasetemp()
    synsets = write(root / "synsets.txt", "\n".join(WNIDS[:3]).encode())
    path = write(root / "LOC_val_solution.csv", data)
    check("ILSVRC labels / ground truth", path,
          lambda: imagenet.parse_val_labels(path, WNIDS[:3], synsets), DataError)


def _meta_mat_seeds():
    import scipy.io

    synsets = np.zeros((4,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"),
                                    ("num_children", "O"), ("words", "O")])
    for i in range(4):
        leaf = i < 3
        synsets[i] = (i + 1, WNIDS[i] if leaf else "n99999999", 0 if leaf else 3, f"w{i}")
    out = []
    for compress in (False, True):
        f = io.BytesIO()
        scipy.io.savemat(f, {"synsets": synsets}, do_compression=compress)
        out.append(f.getvalue())
    return out


@fuzz_settings(300)
@given(data=mutated(_meta_mat_seeds()))
def test_fuzz_devkit_meta_mat(tmp_path_factory, data):
    path = write(tmp_path_factory.getbasetemp() / "meta.mat", data)
    check("devkit meta.mat", path, lambda: imagenet.read_synsets(path), DataError)


# ---------------------------------------------------------------- TFRecords

def _frame(payload, length=None):
    length = len(payload) if length is None else length
    head = struct.pack("<Q", length)
    return (head + struct.pack("<I", tfrecord.masked_crc32c(head)) + payload
            + struct.pack("<I", tfrecord.masked_crc32c(payload)))


def _example_seeds():
    return [tf_example(png_bytes(rgb(i, (4, 4, 3))), i + 1, WNIDS[i]) for i in range(2)]


@st.composite
def tfrecord_files(draw):
    """Plain mutations of a valid shard, or records framed with valid CRCs around
    mutated Examples and boundary lengths (what a checksum alone cannot catch)."""
    examples = _example_seeds()
    if draw(st.booleans()):
        return draw(mutated([b"".join(_frame(e) for e in examples)]))
    records = []
    for _ in range(draw(st.integers(1, 3))):
        payload = draw(mutated(examples))
        length = draw(st.one_of(st.none(), st.sampled_from(BOUNDARY)))
        records.append(_frame(payload, length))
    return b"".join(records)


@fuzz_settings(400)
@given(data=tfrecord_files())
def test_fuzz_tfrecord_shards(tmp_path_factory, data):
    path = write(tmp_path_factory.getbasetemp() / "train-00000-of-00001", data)

    def run():
        tfrecord._walk(path)
        tfrecord.check_first_example(path)

    check("TFRecord shard", path, run, DataError)


# ---------------------------------------------------------------- packed weights

def _packed_seed():
    inp = keras.Input((6, 6, 3), name="image")
    x = tfq.InputQuantizer(name="input_quant")(inp)
    x = tfq.QConv2D(2, 3, w_bits=2, name="conv")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = tfq.QActivation(2, name="act")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = tfq.QDense(3, w_bits=4, name="fc")(x)
    return packed.encode(keras.Model(inp, x, name="tiny"))


@st.composite
def packed_files(draw, seed):
    """Mutations of a packed file, half of them with the trailing CRC-32 recomputed;
    some rewrite the (compressed) config with boundary numbers in place of its own."""
    data = draw(mutated([seed]))
    if draw(st.integers(0, 3)) == 0:
        head = packed._HEADER
        fields = list(head.unpack_from(seed))
        config = zlib.decompress(seed[head.size:head.size + fields[4]]).decode()
        numbers = [m for m in __import__("re").finditer(r"\b\d+\b", config)]
        m = draw(st.sampled_from(numbers))
        config = (config[:m.start()] + str(draw(st.sampled_from(BOUNDARY[1:])))
                  + config[m.end():]).encode()
        blob = zlib.compress(config)
        fields[4], fields[5] = len(blob), len(config)
        data = (head.pack(*fields) + blob + seed[head.size + head.unpack_from(seed)[4]:-4])
        data += b"\0\0\0\0"
    if draw(st.booleans()) and len(data) > 4:
        data = data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))
    return data


_PACKED = None


def _packed():
    global _PACKED
    if _PACKED is None:
        _PACKED = _packed_seed()
    return _PACKED


@fuzz_settings(250)
@given(data=st.data())
def test_fuzz_packed_weight_files(tmp_path_factory, data):
    blob = data.draw(packed_files(_packed()))
    path = write(tmp_path_factory.getbasetemp() / "model.tfqpack", blob)
    check("packed weights", path, lambda: packed.load(path), packed.PackedFormatError)
    # clear_session is a full gc pass (~0.3 s): after every input it made this the
    # suite's slowest test, and the few-KB models that parsed (or were refused after
    # building) can wait for the next 25th input.
    if sum(TRIED["packed weights"].values()) % 25 == 0:
        keras.backend.clear_session()


def test_seeds_parse(tmp_path):
    """The unmutated seeds are valid files: mutations start from the real formats."""
    batch = write(tmp_path / "data_batch_1", _pickle_seeds()[1])
    assert len(cifar._batch(batch, "labels", 10)[1]) == 3
    assert idx.read_idx(write(tmp_path / "i", _idx_seeds()[0]), 3).shape == (2, 5, 4)
    synsets = write(tmp_path / "synsets.txt", "\n".join(WNIDS[:3]).encode())
    for seed in _label_seeds():
        labels = imagenet.parse_val_labels(write(tmp_path / "l.csv", seed), WNIDS[:3], synsets)
        assert len(labels) == 4
    for seed in _meta_mat_seeds():
        assert imagenet.read_synsets(write(tmp_path / "meta.mat", seed)) == WNIDS[:3]
    shard = write(tmp_path / "s", b"".join(_frame(e) for e in _example_seeds()))
    assert tfrecord._walk(shard) == 2
    tfrecord.check_first_example(shard)
    model = packed.load(write(tmp_path / "m.tfqpack", _packed()))
    assert [w.shape for w in model.weights][0] == (3, 3, 3, 2)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TFQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
