"""Issue 7: untrusted files never run code, exhaust memory, hang or crash tfq.

Targeted cases per parser (the property-based fuzzing is in test_fuzz_parsers.py):
malicious and bomb pickles, header-declared sizes checked before allocation (also in a
subprocess under an address-space limit, where a header-driven allocation fails
loudly), ``.keras`` archives that would run code, and paths taken from files.
"""

from __future__ import annotations

import builtins
import gzip
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile
import zlib

import keras
import numpy as np
import pytest

import tfq
import tfq.data
from tfq.data import DataError, cifar, files, idx, imagenet, matfile, safe_pickle, tfrecord

from test_data_helpers import WNIDS, cifar10_pickles, cifar_batch, png_bytes, rgb, tf_example, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1 << 20


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TFQ_CACHE_DIR", str(tmp_path / "cache"))


def peak_bytes(fn, *args):
    """(result or exception, peak traced bytes) of ``fn(*args)``."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            out = fn(*args)
        except Exception as e:  # returned for the caller's checks
            out = e
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


# A subprocess that imports tfq.data's pure modules without the package __init__
# (no TensorFlow: starts in a fraction of a second), runs cases and prints one JSON line
# per case. A crash (segfault) or hang shows as a return code or a timeout.
_PRELUDE = f"""
import json, os, resource, sys, types
sys.path.insert(0, {ROOT!r})
for _name, _sub in (("tfq", "tfq"), ("tfq.data", os.path.join("tfq", "data"))):
    _m = types.ModuleType(_name)
    _m.__path__ = [os.path.join({ROOT!r}, _sub)]
    sys.modules[_name] = _m


def limit_memory(headroom):
    # Address-space limit a little above what the process maps now: an allocation
    # driven by a header (gigabytes) then fails with MemoryError instead of succeeding.
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, vm + headroom))


def case(name, fn, *args):
    try:
        fn(*args)
        out = {{"case": name, "type": None, "message": ""}}
    except BaseException as e:
        out = {{"case": name, "type": type(e).__name__, "message": str(e)[:300]}}
    print(json.dumps(out), flush=True)
"""


def run_isolated(body, timeout=120):
    """{case: (exception type name or None, message)} of a subprocess's cases."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["case"]] = (r["type"], r["message"])
    assert proc.returncode == 0, (
        f"subprocess died (rc {proc.returncode}) after cases {list(results)}:\n"
        f"{proc.stderr[-2000:]}")
    return results


# ============================================================================ pickles


class Reducer:
    """Pickles as ``fn(*args)``: what a malicious pickle asks the unpickler to call."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def _runstring():
    from numpy.testing._private import utils

    return utils.runstring


def _evil_calls(marker):
    """(what, callable, args): each would create ``marker`` (or worse) when unpickled."""
    m = str(marker)
    code = f"open({m!r}, 'w').close()"
    return [
        ("os.system", os.system, (f"touch {m}",)),
        ("builtins.eval", builtins.eval, (code,)),
        ("builtins.exec", builtins.exec, (code,)),
        ("builtins.open", builtins.open, (m, "w")),
        ("subprocess.call", subprocess.call, (["touch", m],)),
        ("numpy runstring (exec)", _runstring(), (code, {})),
        ("numpy.save", np.save, (m, np.zeros(1))),
        ("numpy.fromfile", np.fromfile, ("/etc/hostname",)),
        ("numpy.frombuffer", np.frombuffer, (b"\0" * 8, np.uint8)),
    ]


def _unsafe_loads_creates_marker(path, marker):
    """Control: plain ``pickle.load`` of ``path`` (in a subprocess) runs the payload."""
    subprocess.run([sys.executable, "-c",
                    "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))", str(path)],
                   capture_output=True, timeout=60)
    made = [p for p in (marker, marker.with_name(marker.name + ".npy")) if p.exists()]
    for p in made:
        p.unlink()
    return bool(made)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_reduce_payload_is_refused_naming_the_file_and_never_runs(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    cifar10_pickles(str(tmp_path))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch, _, _ = cifar_batch(3, 10, 0)
    batch[b"labels"] = Reducer(os.system, (f"touch {marker}",))
    write(str(path), pickle.dumps(batch, protocol=protocol))
    with pytest.raises(DataError, match=r"data_batch_2: not an acceptable CIFAR pickle: "
                                        r"refusing global (posix|os)\.system"):
        tfq.data.info("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()
    assert _unsafe_loads_creates_marker(path, marker)  # the payload is real


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_other_dangerous_globals_are_refused(tmp_path, protocol):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    executed = []
    for what, fn, args in _evil_calls(marker):
        write(str(path), pickle.dumps({b"data": Reducer(fn, args)}, protocol=protocol))
        with pytest.raises(DataError, match=rf"evil.pkl: not an acceptable CIFAR pickle: "
                                            rf"refusing global \S*{re.escape(fn.__name__)}"):
            safe_pickle.load(path)
        assert not marker.exists() and not marker.with_name("PWNED.npy").exists(), what
        if what not in ("numpy.fromfile", "numpy.frombuffer"):  # these only read
            executed.append(_unsafe_loads_creates_marker(path, marker))
    assert all(executed)


@pytest.mark.parametrize("value,match", [
    (np.array([1, "a"], dtype=object), "not a plain numeric type|refusing"),
    (np.zeros(2, dtype=[("a", "i4")]), "not a plain numeric type|refusing|dtype"),
    (np.array(["2020-01-01"], dtype="M8[D]"), "not a plain numeric type"),
    (np.array([1 + 2j]), "not a plain numeric type"),
    (np.float64(1.5), "refusing global numpy.*scalar"),
    (np.ma.array([1, 2]), "refusing global numpy.ma"),
    ({1, 2}, "opcode|refusing"),
    (frozenset([1]), "opcode|refusing"),
    (Reducer(np.dtype, ("f4", False, True), (3, "<", None, ("a",), None, -1, -1, 0)),
     "unexpected numpy dtype state"),
    (Reducer(np.ndarray, ((3,), "u1")), "refusing global numpy.ndarray|not callable"),
])
def test_non_numeric_numpy_objects_and_sets_are_refused(tmp_path, value, match):
    for protocol in (2, 4, 5):
        path = write(str(tmp_path / "x.pkl"), pickle.dumps({b"data": value}, protocol=protocol))
        with pytest.raises(DataError, match=f"x.pkl: not an acceptable CIFAR pickle: .*({match})"):
            safe_pickle.load(path)


def test_numeric_arrays_round_trip_in_every_protocol_with_their_byte_order(tmp_path):
    # The dtype must be a copy that BUILD can set to big-endian (NumPy's own pickles),
    # never the shared built-in one: that silently read '>f4' data as little-endian.
    arrays = [np.array([1.0, 2.5, -3.25], ">f4"), np.arange(6, dtype=">u4").reshape(2, 3),
              np.arange(6, dtype="<i2").reshape(3, 2), np.asfortranarray(np.eye(3, dtype="f8")),
              np.array([True, False]), np.zeros((0, 3), "u1")]
    for protocol in range(6):
        for a in arrays:
            data = pickle.dumps({b"x": a, b"l": [1, 2]}, protocol=protocol)
            got = safe_pickle.load(write(str(tmp_path / "a.pkl"), data))[b"x"]
            np.testing.assert_array_equal(got, a)
            reference = pickle.loads(data)[b"x"]  # NumPy's own unpickling
            assert got.dtype == reference.dtype and got.shape == a.shape
    assert np.dtype("f4").byteorder == "="  # the shared dtype was never touched


def _q(n):
    return struct.pack("<Q", n)


def _array_state_pickle(shape, data):
    state = (1, shape, np.dtype("u1"), False, data)
    return pickle.dumps(Reducer(np._core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), state),
                        protocol=2)


PICKLE_BOMBS = {
    "BINBYTES8 of 2^40 bytes": b"\x80\x04\x8e" + _q(1 << 40) + b"abc.",
    "BINUNICODE8 of 2^40 bytes": b"\x80\x04\x8d" + _q(1 << 40) + b"abc.",
    "FRAME of 2^60 bytes": b"\x80\x04\x95" + _q(1 << 60) + b"N.",
    "LONG4 of 2^31 bytes": b"\x80\x02\x8a\xff\xff\xff\x7f\x01.",
    "array of 10^12 bytes, 16 given": _array_state_pickle((10**6, 10**6), b"\0" * 16),
    "array of 2^64 bytes, 0 given": _array_state_pickle((1 << 32, 1 << 32), b""),
    "frombuffer of 10^12 elements": pickle.dumps(Reducer(
        np._core.numeric._frombuffer, (b"\0" * 16, np.dtype("u1"), (10**12,), "C")), protocol=5),
    "opcode flood (EMPTY_DICT)": b"\x80\x02" + b"}" * (safe_pickle.MAX_OPCODES + 10) + b".",
    "opcode flood (MARK)": b"\x80\x02" + b"(" * (safe_pickle.MAX_OPCODES + 10) + b".",
    "memo flood": b"\x80\x04" + b"}\x94" * (safe_pickle.MAX_OPCODES // 2 + 10) + b".",
}


@pytest.mark.parametrize("name", list(PICKLE_BOMBS))
def test_pickle_bombs_are_refused_without_allocating(tmp_path, name):
    path = write(str(tmp_path / "bomb.pkl"), PICKLE_BOMBS[name])
    out, peak = peak_bytes(safe_pickle.load, path)
    assert isinstance(out, DataError) and "bomb.pkl: not an acceptable CIFAR pickle" in str(out), out
    # a million small objects at most (~75 MB); the declared sizes are 10^12 and more
    assert peak < 160 * MB, f"{name}: {peak / MB:.0f} MB"


def test_hash_bombs_and_deep_nesting_neither_hang_nor_crash():
    # A dict key made of tuples that share their halves hashes in 2^depth steps (a
    # hang); a key nested 200,000 deep overflows the C stack while hashing (SIGSEGV).
    results = run_isolated("""
        import tempfile
        from tfq.data import safe_pickle
        bombs = {
            "hash bomb (2^60 steps)": b"\\x80\\x02Nq\\x000" + b"h\\x00h\\x00\\x86q\\x000" * 60
                                      + b"}h\\x00K\\x01s.",
            "deep key (SETITEM)": b"\\x80\\x02}N" + b"\\x85" * 200000 + b"K\\x01s.",
            "deep key (DICT)": b"\\x80\\x02(N" + b"\\x85" * 200000 + b"K\\x01d.",
            "deep key (SETITEMS)": b"\\x80\\x02}(N" + b"\\x85" * 200000 + b"K\\x01u.",
            "deep dtype spec": b"\\x80\\x02cnumpy\\ndtype\\nN" + b"\\x85" * 200000 + b"\\x85R.",
            "hash bomb dtype spec": b"\\x80\\x02Nq\\x000" + b"h\\x00h\\x00\\x86q\\x000" * 60
                                    + b"cnumpy\\ndtype\\nh\\x00\\x85R.",
        }
        for name, data in bombs.items():
            with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
                f.write(data)
                f.flush()
                case(name, safe_pickle.load, f.name)
    """, timeout=90)
    assert len(results) == 6
    for name, (kind, message) in results.items():
        assert kind == "DataError" and "not an acceptable CIFAR pickle" in message, (name, kind)


def _cifar_with(tmp_path, entries):
    cifar10_pickles(str(tmp_path))
    batch, _, _ = cifar_batch(2, 10, 0)
    batch.update(entries)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    write(str(path), pickle.dumps(batch, protocol=2))
    return str(path)


def test_labels_of_shared_nested_lists_are_refused_before_numpy_expands_them(tmp_path):
    inner = [0] * 200
    middle = [inner] * 200
    path = _cifar_with(tmp_path, {b"labels": [[middle] * 200, [middle] * 200]})
    assert os.path.getsize(path) < 20_000  # 16 million labels if expanded: 128 MB
    out, peak = peak_bytes(cifar._batch, path, "labels", 10)
    assert isinstance(out, DataError) and "'labels' must be a list of ints" in str(out)
    assert peak < 8 * MB


@pytest.mark.parametrize("labels,match", [
    (np.array(1, np.int64), "must be a list of ints or a 1-D integer array"),  # 0-d: TypeError
    (np.array([0.5, 1.7]), "must be a list of ints"),  # floats: silently truncated before
    ([0, 1.0], "must be a list of ints"),
    ([0, True], "must be a list of ints"),
    ([0, 2**70], "holds an integer out of range"),
    (np.array([0, 1], ">i8"), None),  # big-endian integers are fine
])
def test_label_types_are_checked(tmp_path, labels, match):
    path = _cifar_with(tmp_path, {b"labels": labels})
    if match is None:
        assert list(cifar._batch(path, "labels", 10)[1]) == [0, 1]
        return
    with pytest.raises(DataError, match=f"data_batch_1: 'labels' {match}"):
        cifar._batch(path, "labels", 10)


def test_meta_names_must_be_utf8_and_distinct(tmp_path):
    cifar10_pickles(str(tmp_path))
    meta = tmp_path / "cifar-10-batches-py" / "batches.meta"
    names = [f"c{i}".encode() for i in range(10)]
    for bad, match in ((names[:9] + [b"\xff\xfe"], "not UTF-8"),
                       (names[:9] + [b"c0"], "names a class twice")):
        write(str(meta), pickle.dumps({b"label_names": bad}, protocol=2))
        with pytest.raises(DataError, match=f"batches.meta: 'label_names' .*{match}"):
            tfq.data.info("cifar10", data_dir=str(tmp_path))


# ============================================================================ idx files


def _idx(dims, payload=b""):
    return struct.pack(">HBB", 0, 8, len(dims)) + struct.pack(f">{len(dims)}I", *dims) + payload


def test_idx_dimension_product_is_exact(tmp_path):
    # 2^22 * 2^21 * 2^21 = 2^64: an int64 product wraps to 0 and an empty file "matched".
    path = write(str(tmp_path / "x-idx3-ubyte"), _idx((1 << 22, 1 << 21, 1 << 21)))
    with pytest.raises(DataError, match=r"header declares \(4194304, 2097152, 2097152\) = "
                                        r"18446744073709551616 bytes"):
        idx.read_idx(path, 3)


def test_corrupt_gzip_idx_is_a_data_error(tmp_path):
    raw = _idx((4096,), bytes(range(256)) * 16)
    data = bytearray(gzip.compress(raw))
    for i in range(20, len(data) - 8, 7):  # damage the deflate stream
        data[i] ^= 0x5A
    path = write(str(tmp_path / "x-idx1-ubyte.gz"), bytes(data))
    with pytest.raises(DataError, match="x-idx1-ubyte.gz: (cannot read idx file|header|trunc)"):
        idx.read_idx(path, 1)  # was zlib.error


def test_declared_sizes_never_allocate_under_an_address_space_limit(tmp_path):
    """Headers declaring 10^12 items are refused before allocation: under RLIMIT_AS a
    header-driven allocation would fail with MemoryError (or a wrapped message)."""
    results = run_isolated(f"""
        import gzip, io, struct, zlib
        import numpy as np
        from tfq.data import files, idx, matfile, safe_pickle
        tmp = {str(tmp_path)!r}
        def put(name, data):
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            return path
        def idx_file(dims, payload=b""):
            return (struct.pack(">HBB", 0, 8, len(dims))
                    + struct.pack(">%dI" % len(dims), *dims) + payload)
        def npy(shape, payload):
            header = "{{'descr': '<f4', 'fortran_order': False, 'shape': %r, }}" % (shape,)
            header = header.ljust(118) + "\\n"
            return b"\\x93NUMPY\\x01\\x00" + struct.pack("<H", len(header)) + header.encode() + payload
        def mat(cls, dims, body=b""):
            def tag(t, p):
                return struct.pack("<II", t, len(p)) + p + b"\\0" * (-len(p) % 8)
            m = tag(14, tag(6, struct.pack("<II", cls, 0)) + tag(5, struct.pack("<2i", *dims))
                    + tag(1, b"synsets") + body)
            return b"MATLAB 5.0".ljust(116, b" ") + b"\\0" * 8 + b"\\x00\\x01IM" + m
        cases = [
            ("idx 10^12 images", idx.read_idx,
             put("a-idx3-ubyte", idx_file((10**6, 10**3, 10**3), b"\\0" * 64)), 3),
            ("idx gz 2^31 images", idx.read_idx,
             put("b-idx3-ubyte.gz", gzip.compress(idx_file((1 << 31, 28, 28), b"\\0" * 999))), 3),
            ("idx gz declaring 2^31 with 4 MB of zeros", idx.read_idx,
             put("c-idx1-ubyte.gz", gzip.compress(idx_file((1 << 31,), b"\\0" * (4 << 20)))), 1),
            ("npy 10^12 floats", files.load_npy, put("m.npy", npy((10**6, 10**6), b"\\0" * 64))),
            ("mat cell of 2^31 - 1", matfile.uncompressed, mat(1, (2**31 - 1, 1)), "m", 1 << 25),
            ("mat struct of 2^31 - 1", matfile.uncompressed,
             mat(2, (2**31 - 1, 1), struct.pack("<Ii", 0x00040005, 8)
                 + struct.pack("<II", 1, 8) + b"WNID\\0\\0\\0\\0"), "m", 1 << 25),
            ("mat zeros expanding 1000x", matfile.uncompressed,
             (lambda z: b"MATLAB 5.0".ljust(116, b" ") + b"\\0" * 8 + b"\\x00\\x01IM"
              + struct.pack("<II", 15, len(z)) + z)(zlib.compress(b"\\0" * (64 << 20))),
             "m", 1 << 25),
            ("pickle array of 10^12", safe_pickle.load,
             put("p.pkl", b"\\x80\\x04\\x8e" + struct.pack("<Q", 10**12) + b"abc.")),
        ]
        limit_memory(768 << 20)
        for name, fn, *args in cases:
            case(name, fn, *args)
    """)
    assert len(results) == 8, results
    for name, (kind, message) in results.items():
        assert kind == "DataError", (name, kind, message)
        assert "MemoryError" not in message and "allocate" not in message, (name, message)


# ============================================================================ labels files


@pytest.mark.parametrize("lines,match", [
    ("1\n\u00b2\n", "unrecognised labels file"),  # '²'.isdigit(), but int('²') fails
    ("1\n" + "9" * 5000 + "\n", "unrecognised labels file"),  # int() digit limit
    ("1\n\u0661\n", "unrecognised labels file"),  # Arabic-Indic digit
])
def test_ground_truth_ids_are_ascii_digits(tmp_path, lines, match):
    path = write(str(tmp_path / "gt.txt"), lines.encode())
    order = write(str(tmp_path / "order.txt"), "\n".join(WNIDS).encode())
    with pytest.raises(DataError, match=f"gt.txt: {match}"):
        imagenet.parse_val_labels(path, WNIDS, order)


def test_labels_file_line_count_is_bounded_before_splitting(tmp_path):
    path = write(str(tmp_path / "many.txt"), b"x\n" * (imagenet.MAX_TEXT_LINES + 1))
    out, peak = peak_bytes(imagenet.read_lines, path)
    assert isinstance(out, DataError) and "lines is too many for a labels file" in str(out)
    assert peak < 30 * MB  # the decoded text (4 MB) and little else
    lines = imagenet.read_lines(write(str(tmp_path / "ok.txt"), b"a\r\nb\rc\n\nd"))
    assert lines == ["a", "b", "c", "d"]


def _meta_mat(leaves, compress):
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "num_children", "children"]
    synsets = np.zeros((len(leaves) + 1, 1), dtype=[(f, object) for f in fields])
    for k, (ident, wnid) in enumerate(leaves):
        synsets[k, 0] = (np.array([[ident]], np.uint16), wnid, f"thing {k}",
                         np.array([[0]], np.uint8), np.zeros((1, 0)))
    synsets[len(leaves), 0] = (np.array([[len(leaves) + 1]], np.uint16), "n99999999", "root",
                               np.array([[len(leaves)]], np.uint8),
                               np.arange(1, len(leaves) + 1, dtype=np.uint16)[None])
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets}, do_compression=compress)
    return buf.getvalue()


@pytest.mark.parametrize("compress", [False, True])
def test_meta_mat_is_read_after_its_structure_is_checked(tmp_path, compress):
    leaves = [(3, WNIDS[2]), (1, WNIDS[0]), (2, WNIDS[1])]
    path = write(str(tmp_path / "meta.mat"), _meta_mat(leaves, compress))
    assert imagenet.read_synsets(path) == WNIDS  # in ILSVRC2012_ID order
    data = open(path, "rb").read()
    plain = matfile.uncompressed(data, path, 1 << 20)
    assert struct.unpack_from("<I", plain, 128)[0] == matfile.MI_MATRIX  # expanded
    assert (plain == data) != compress


def test_meta_mat_bombs_are_refused_quickly_and_small(tmp_path):
    def tag(t, p):
        return struct.pack("<II", t, len(p)) + p + b"\0" * (-len(p) % 8)

    header = b"MATLAB 5.0".ljust(116, b" ") + b"\0" * 8 + b"\x00\x01IM"

    def matrix(cls, dims, body=b""):
        return tag(14, tag(6, struct.pack("<II", cls, 0)) + tag(5, struct.pack("<2i", *dims))
                   + tag(1, b"synsets") + body)

    zeros = zlib.compress(b"\0" * (200 << 20), 9)
    bombs = {
        "cell": (header + matrix(1, (200_000_000, 1)), "elements, more than its"),
        "struct": (header + matrix(2, (200_000_000, 1), tag(5, struct.pack("<i", 8))
                                   + tag(1, b"WNID\0\0\0\0")), "elements, more than its"),
        "char": (header + matrix(4, (100_000, 100_000), tag(16, b"ab")), "values in 2 data"),
        "zeros": (header + struct.pack("<II", 15, len(zeros)) + zeros, "expands beyond"),
        "sparse": (header + matrix(5, (2, 2)), "class 5 is not accepted"),
        "v4 or v7.3": (b"\0" * 300, "not a MATLAB v5 MAT-file"),
    }
    for name, (data, match) in bombs.items():
        path = write(str(tmp_path / "meta.mat"), data)
        out, peak = peak_bytes(imagenet.read_synsets, path)
        assert isinstance(out, DataError) and re.search(match, str(out)), (name, out)
        assert peak < 64 * MB, (name, peak / MB)


# ============================================================================ TFRecords


def test_tfrecord_lengths_are_checked_against_their_crc(tmp_path):
    path = tmp_path / "train-00000-of-00001"
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as w:
        for i in range(3):
            w.write(tf_example(png_bytes(rgb(i, (8, 8, 3))), 1, WNIDS[0]))
    data = bytearray(path.read_bytes())
    assert tfrecord._walk(str(path)) == 3
    data[0] ^= 0x01  # record 0 one byte shorter: still fits the file, framing now wrong
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="record 0 at byte 0: corrupt length"):
        tfrecord._walk(str(path))
    with pytest.raises(DataError, match="corrupt length"):
        tfrecord.check_first_example(str(path))
    assert tfrecord.masked_crc32c(b"hello") == 0x191C1FBB  # TFRecord's own value


# ============================================================================ .npy (mean)


def test_mean_cache_entries_are_validated_before_use(tmp_path):
    from test_data_helpers import class_tree

    root = tmp_path / "d"
    class_tree(str(root), ["a", "b"], 2, splits=("train",), size=(16, 16))
    good = tfq.data.pixel_mean("folder", data_dir=str(root))
    (entry,) = (tmp_path / "cache" / "means").glob("*.npy")
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000, 3), }"
    header = header.ljust(118) + b"\n"
    poison = {
        "huge header": b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 9,
        "NaN mean": None,
        "object array": None,
        "garbage": b"not a npy file",
    }
    for name, data in poison.items():
        if name == "NaN mean":
            np.save(entry, np.full_like(good, np.nan))
        elif name == "object array":
            np.save(entry, np.array([None] * good.size, object).reshape(good.shape),
                    allow_pickle=True)
        else:
            entry.write_bytes(data)
        again = tfq.data.pixel_mean("folder", data_dir=str(root))
        np.testing.assert_array_equal(again, good, err_msg=name)
        np.testing.assert_array_equal(np.load(entry), good, err_msg=name)  # replaced


@pytest.mark.parametrize("shape,declared,match", [
    ((2, 2), None, None),
    ((2, 2), (3, 2), "shape \\(2, 2\\), expected \\(3, 2\\)"),
])
def test_load_npy_checks_shape_and_size(tmp_path, shape, declared, match):
    path = str(tmp_path / "a.npy")
    np.save(path, np.arange(4, dtype=">f8").reshape(shape))
    if match is None:
        np.testing.assert_array_equal(files.load_npy(path), np.arange(4.0).reshape(shape))
    else:
        with pytest.raises(DataError, match=match):
            files.load_npy(path, shape=declared)
    with open(path, "ab") as f:
        f.write(b"x")
    with pytest.raises(DataError, match="the file holds 33 after its header"):
        files.load_npy(path)


# ============================================================================ output paths


def test_names_from_data_files_never_become_output_paths(tmp_path):
    """Class names from a synsets file ("../..") are only names: the pipeline's only
    writes (mean and record-count caches) go to hashed names in the cache folder."""
    import tensorflow as tf

    data = tmp_path / "data" / "shards"
    names = ["../../../escape", "..", "/abs/olute"]
    data.mkdir(parents=True)
    write(str(data / "synsets.txt"), "\n".join(names).encode())
    with tf.io.TFRecordWriter(str(data / "train-00000-of-00001")) as w:
        for i in range(6):
            w.write(tf_example(png_bytes(rgb(i, (8, 8, 3))), i % 3 + 1, names[i % 3]))
    before = {p for p in tmp_path.rglob("*")}
    info = tfq.data.info("imagenet", data_dir=str(data), image_size=8, augment="pad_crop")
    assert info.class_names == sorted(names)
    ds = tfq.data.build_dataset("imagenet", "train", data_dir=str(data), image_size=8,
                                augment="pad_crop", batch_size=4)
    assert sum(int(x.shape[0]) for x, _ in ds) == 6
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p.is_relative_to(tmp_path / "cache") for p in created), created
    assert all(re.fullmatch(r"[0-9a-f]{32}\.(npy|json)", p.name) for p in created if p.is_file())


def _tiny_tfq_model(name="tiny"):
    inp = keras.Input((4,), name="image")
    x = tfq.InputQuantizer(name="input_quant")(inp)
    x = tfq.QDense(3, w_bits=2, name="fc")(x)
    return keras.Model(inp, x, name=name)


@pytest.fixture
def outside_run(tmp_path):
    """A model_dir whose results.json points at a (valid) model outside of it."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _tiny_tfq_model().save(outside / "m.keras")
    run = tmp_path / "run"
    (run / "stage").mkdir(parents=True)
    _tiny_tfq_model().save(run / "stage" / "final.keras")
    return run, outside / "m.keras"


def _set_final(run, final):
    (run / "results.json").write_text(json.dumps({"final_model": final}))


def test_export_reads_final_model_inside_model_dir(outside_run):
    from tfq.export import source

    run, _ = outside_run
    _set_final(run, "stage/final.keras")
    assert source.load(str(run)).path == os.path.realpath(run / "stage" / "final.keras")


def _run_loaders():
    from tfq import train
    from tfq.export import source

    return {"export": (source.load, source.ExportError),
            "init_from": (train._load_model, train.ConfigError)}


@pytest.mark.parametrize("loader", ["export", "init_from"])
@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_final_model_outside_model_dir_is_refused(outside_run, loader, where):
    load, error = _run_loaders()[loader]
    run, target = outside_run
    _set_final(run, "../elsewhere/m.keras" if where == "relative" else str(target))
    with pytest.raises(error, match="final_model"):
        load(str(run))


@pytest.mark.parametrize("content", ["{not json", '["final_model"]', '{"final_model": 7}'])
def test_init_from_bad_results_json_is_a_config_error(outside_run, content):
    from tfq import train

    run, _ = outside_run
    (run / "results.json").write_text(content)
    with pytest.raises(train.ConfigError):
        train._load_model(str(run))


def test_export_mean_npy_header_is_checked_before_allocation(outside_run):
    from tfq.export import source

    run, _ = outside_run
    _set_final(run, "stage/final.keras")
    # 1.2 PB: more than any address space, so the attempt is always a MemoryError
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (10000000, 10000000, 3), }"
    header = header.ljust(118) + b"\n"
    (run / "mean.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header))
                                   + header + b"\0" * 64)
    with pytest.raises(source.ExportError, match="mean.npy"):
        source.load(str(run))


# ============================================================================ .keras models


def test_every_tfq_model_deserializes_in_safe_mode_without_lambdas():
    from keras.src.saving.serialization_lib import SafeModeScope

    from tfq import models

    def modules(obj):
        if isinstance(obj, dict):
            if "class_name" in obj and "module" in obj:
                yield obj["module"], obj["class_name"], obj.get("registered_name")
            for v in obj.values():
                yield from modules(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from modules(v)

    for name in models.names():
        shape = (64, 64, 3) if name in ("alexnet", "resnet50") else None
        try:
            m = models.build(name, num_classes=10, input_shape=shape, w_bits=2, a_bits=2)
        except ValueError:
            m = models.build(name, num_classes=10, w_bits=2, a_bits=2)
        config = m.to_json()
        assert "Lambda" not in config and "__lambda__" not in config, name
        for module, cls, registered in modules(json.loads(config)):
            assert module == "keras" or module.startswith("keras.") or (
                module.startswith("tfq.") and registered == f"tfq>{cls}"), (name, module, cls)
        with SafeModeScope(True):
            restored = keras.models.model_from_json(config)
        assert [w.shape for w in restored.weights] == [w.shape for w in m.weights]


def test_tfq_models_and_guided_pairs_load_from_files_in_safe_mode(tmp_path):
    from tfq import models, train
    from tfq.export import source

    m = models.build("resnet20", num_classes=10, w_bits=2, a_bits=4)
    m.save(tmp_path / "m.keras")
    for load in (lambda p: keras.models.load_model(p, safe_mode=True), source.load_keras,
                 train._load_model):
        restored = load(str(tmp_path / "m.keras"))
        for a, b in zip(restored.weights, m.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    fp = models.build("resnet20", num_classes=10)
    pair = tfq.GuidedModel.from_model(fp, 2, 2)
    pair.save(tmp_path / "pair.keras", with_fp=True)
    restored = keras.models.load_model(tmp_path / "pair.keras", safe_mode=True)
    assert isinstance(restored, tfq.GuidedModel)
    assert len(restored.weights) == len(pair.weights)


def _lambda_model_file(tmp_path, marker):
    """A tfq model with a Lambda layer whose code creates ``marker`` when it runs."""
    inp = keras.Input((4,), name="image")
    x = tfq.InputQuantizer(name="input_quant")(inp)
    x = keras.layers.Lambda(lambda v, m: (open(m, "w").close(), v)[1],
                            arguments={"m": str(marker)}, name="payload")(x)
    x = tfq.QDense(3, w_bits=2, name="fc")(x)
    path = tmp_path / "evil.keras"
    keras.Model(inp, x).save(path)
    marker.unlink(missing_ok=True)  # it ran while the model was built here
    return path


def _rewrite_config(src, dst, edit):
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    config = json.loads(members["config.json"])
    edit(config)
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(dst, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return dst


def _tfq_loaders(path, run_dir):
    from tfq import train
    from tfq.export import packed, source

    del packed
    yield "export source.load_keras", lambda: source.load_keras(str(path)), source.ExportError
    yield "export model_dir", lambda: source.load(str(run_dir)), source.ExportError
    yield "train --init_from file", lambda: train._load_model(str(path)), train.ConfigError
    yield "train --init_from dir", lambda: train._load_model(str(run_dir)), train.ConfigError


def _as_run(tmp_path, model_path):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    target = run / "final.keras"
    target.write_bytes(model_path.read_bytes())
    _set_final(run, "final.keras")
    return run


def test_keras_archive_with_a_lambda_is_refused_by_every_tfq_loader(tmp_path):
    from tfq.export import source

    marker = tmp_path / "LAMBDA_RAN"
    path = _lambda_model_file(tmp_path, marker)
    run = _as_run(tmp_path, path)
    for what, load, error in _tfq_loaders(path, run):
        with pytest.raises(error, match="(?i)lambda"):
            load()
        assert not marker.exists(), what
    # Control: with safe mode off, loading runs the code (and the model is a tfq model).
    model = keras.models.load_model(path, safe_mode=False)
    assert marker.exists()
    source.check_tfq_model(model, "control")


def test_packed_file_with_a_lambda_in_its_config_is_refused(tmp_path):
    from tfq.export import packed

    marker = tmp_path / "LAMBDA_RAN"
    lam = json.loads(zipfile.ZipFile(_lambda_model_file(tmp_path, marker)).read("config.json"))
    data = packed.encode(_tiny_tfq_model())
    H = packed._HEADER
    fields = list(H.unpack_from(data))
    config = json.loads(zlib.decompress(data[H.size:H.size + fields[4]]))
    config["model"] = lam
    raw = json.dumps(config).encode()
    blob = zlib.compress(raw)
    old = fields[4]
    fields[4], fields[5] = len(blob), len(raw)
    body = H.pack(*fields) + blob + data[H.size + old:-4]
    path = write(str(tmp_path / "evil.tfqpack"), body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(packed.PackedFormatError, match="(?is)config.model.*lambda"):
        packed.load(path)
    assert not marker.exists()


def _layer(config, name):
    return next(layer for layer in config["config"]["layers"] if layer["name"] == name)


def test_configs_naming_unregistered_modules_are_refused_and_never_imported(tmp_path,
                                                                             monkeypatch):
    marker = tmp_path / "IMPORTED"
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    (module_dir / "tfq_issue7_payload.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Payload:\n    pass\n")
    monkeypatch.syspath_prepend(str(module_dir))
    good = tmp_path / "good.keras"
    _tiny_tfq_model().save(good)
    lam = json.loads(zipfile.ZipFile(_lambda_model_file(tmp_path, tmp_path / "L")).read(
        "config.json"))
    function = _layer(lam, "payload")["config"]["function"]

    def unregistered(module, cls):
        def edit(config):
            _layer(config, "fc").update(module=module, class_name=cls, registered_name=None)
        return edit

    def lambda_activation(config):
        _layer(config, "fc")["config"]["activation"] = function

    edits = {
        "module on sys.path": unregistered("tfq_issue7_payload", "Payload"),
        "os.system": unregistered("os", "system"),
        "builtins.eval": unregistered("builtins", "eval"),
        "keras non-modeling API": unregistered("keras.utils", "get_file"),
        "lambda as an activation": lambda_activation,
    }
    for name, edit in edits.items():
        path = _rewrite_config(good, tmp_path / "crafted.keras", edit)
        run = _as_run(tmp_path, path)
        for what, load, error in _tfq_loaders(path, run):
            with pytest.raises(error):
                load()
            assert not marker.exists() and "tfq_issue7_payload" not in sys.modules, (name, what)
    assert not (tmp_path / "L").exists()


def test_no_tfq_code_turns_safe_mode_off_or_unpickles_untrusted_data():
    allowed_pickle = {os.path.join("tfq", "export", "tflite.py")}  # its own child's files
    problems = []
    for top in ("tfq", "benchmarks"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for n in names:
                if not n.endswith(".py"):
                    continue
                path = os.path.join(dirpath, n)
                rel = os.path.relpath(path, ROOT)
                text = open(path, encoding="utf-8").read()
                for pattern in (r"safe_mode\s*=\s*False", r"enable_unsafe_deserialization",
                                r"allow_pickle\s*=\s*True", r"layers\.Lambda\(",
                                r"\bLambda\(", r"marshal\.loads"):
                    if re.search(pattern, text):
                        problems.append((rel, pattern))
                if re.search(r"\bpickle\.loads?\(|\bUnpickler\(", text) and rel not in allowed_pickle \
                        and rel != os.path.join("tfq", "data", "safe_pickle.py"):
                    problems.append((rel, "pickle.load"))
    assert not problems, problems


# ============================================================================ packed files


def _packed_with_config(config_bytes):
    from tfq.export import packed

    data = packed.encode(_tiny_tfq_model())
    H = packed._HEADER
    fields = list(H.unpack_from(data))
    old = fields[4]
    blob = zlib.compress(config_bytes)
    fields[4], fields[5] = len(blob), len(config_bytes)
    body = H.pack(*fields) + blob + data[H.size + old:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_packed_config_nesting_bomb_is_a_format_error(tmp_path):
    from tfq.export import packed

    nested = b"[" * 100_000 + b"]" * 100_000
    config = b'{"format": "tfq-packed", "version": 1, "model": {}, "x": ' + nested + b"}"
    path = write(str(tmp_path / "deep.tfqpack"), _packed_with_config(config))
    with pytest.raises(packed.PackedFormatError, match="config"):
        packed.load(path)


def test_packed_config_declaring_huge_layers_is_refused_before_building(tmp_path):
    from tfq.export import packed

    data = packed.encode(_tiny_tfq_model())
    H = packed._HEADER
    config = json.loads(zlib.decompress(data[H.size:H.size + H.unpack_from(data)[4]]))
    layers = config["model"]["config"]["layers"]
    layers[0]["config"]["batch_shape"] = [None, 100_000]
    for layer in layers[1:]:
        layer.setdefault("build_config", {})["input_shape"] = [None, 100_000]
    _layer(config["model"], "fc")["config"]["units"] = 100_000  # 4e10 bytes of kernel
    path = write(str(tmp_path / "huge.tfqpack"), _packed_with_config(json.dumps(config).encode()))
    code = f"""
import json, resource, sys
sys.path.insert(0, {ROOT!r})
import keras, tfq
from tfq.export import packed
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30),) * 2)
try:
    packed.load({path!r})
    print(json.dumps(["loaded", ""]))
except BaseException as e:
    print(json.dumps([type(e).__name__, str(e)[:400]]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=180)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no result (rc {proc.returncode}): {proc.stderr[-1000:]}"
    kind, message = json.loads(lines[-1])
    assert kind == "PackedFormatError", (kind, message)
    # Refused by comparing shapes, not by an allocation that failed under the limit.
    assert "OOM" not in message and "cannot be rebuilt" not in message, message


@pytest.mark.parametrize("name", ["../../escape", "/abs/olute", "..", "a b/c"])
def test_export_names_outputs_inside_out_dir_whatever_the_model_name(tmp_path, name):
    from tfq.export import source

    model = _tiny_tfq_model()
    model.name = name
    stem = source.load(model).stem
    out = tmp_path / "out"
    target = os.path.realpath(os.path.join(out, f"{stem}_float.tflite"))
    assert os.path.dirname(target) == os.path.realpath(out), stem


@pytest.mark.parametrize("content", [b"not a npy file", None])
def test_train_recomputes_a_damaged_run_mean(tmp_path, content):
    from types import SimpleNamespace

    from tfq import train

    path = tmp_path / "mean.npy"
    if content is None:  # a valid .npy holding values no pixel mean can have
        np.save(path, np.full((8, 8, 3), np.nan, np.float32))
    else:
        path.write_bytes(content)
    cfg = SimpleNamespace(mean="pixel", dataset="digits", data_dir=None, image_size=None)
    run = SimpleNamespace(dir=str(tmp_path), writable=False)
    info = tfq.data.info("digits")
    said = []
    mean = train._mean(cfg, run, info, {}, said.append)
    assert mean.shape == tuple(info.image_shape[:2]) + (3,) and np.all(np.isfinite(mean))
    assert said and "recomputing" in said[0]
