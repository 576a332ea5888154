"""A restricted unpickler for CIFAR's python pickles (issue 7).

``pickle.load`` runs whatever a pickle names: a CIFAR file from the internet could
execute code. ``load`` below accepts only what the real CIFAR files contain:

- dicts, lists, tuples, str, bytes, int, float, bool, None (plain pickle opcodes);
- NumPy arrays, reconstructed through ``numpy.core.multiarray._reconstruct`` (or
  NumPy 2's ``numpy._core.multiarray._reconstruct``) with ``numpy.ndarray`` and a
  ``numpy.dtype`` of a plain numeric type (or, in protocol 5, ``_frombuffer``);
- ``_codecs.encode(str, "latin1")``, which Python 3 writes for bytes in protocol 2.

Any other global is refused before it is looked up, so a ``__reduce__`` payload never
runs. Array states are checked (shape x item size == data length) before NumPy sees
them, and the pure-Python unpickler reads from an in-memory copy of the file, so a
length field can never allocate more than the file holds.
"""

from __future__ import annotations

import io
import math
import os
import pickle

import numpy as np

from tfq.data.errors import DataError

MAX_BYTES = 1 << 30  # the largest CIFAR pickle (cifar-100 train) is 155 MB

_DTYPES = frozenset(
    ["u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1",
     "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4", "<f8",
     ">u2", ">i2", ">u4", ">i4", ">u8", ">i8", ">f4", ">f8", "|u1", "|i1", "|b1"]
)


class _NdarrayType:
    """Stands for ``numpy.ndarray``: usable only as _reconstruct's first argument."""


_NDARRAY = _NdarrayType()


def _text(value):
    return value.decode("latin1") if isinstance(value, bytes) else value


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY or tuple(shape) != (0,) or _text(typecode) != "b":
        raise pickle.UnpicklingError(
            f"unexpected numpy _reconstruct arguments {shape!r}, {typecode!r}"
        )
    return np.ndarray((0,), "b")


def _dtype(spec, align=False, copy=True):
    if _text(spec) not in _DTYPES:
        raise pickle.UnpicklingError(f"numpy dtype {spec!r} is not a plain numeric type")
    return np.dtype(_text(spec))


def _frombuffer(buffer, dtype, shape, order):
    # NumPy's protocol-5 form of an array (in-band buffer).
    data = bytes(buffer) if isinstance(buffer, (bytes, bytearray)) else None
    if not isinstance(dtype, np.dtype) or _text(order) not in ("C", "F"):
        raise pickle.UnpicklingError("unexpected numpy _frombuffer arguments")
    _check_array_state((1, tuple(shape), dtype, False, data))
    return np.frombuffer(data, dtype).reshape(shape, order=_text(order)).copy()


def _latin1(text, encoding="latin1"):
    if not isinstance(text, str) or _text(encoding) not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is accepted only for latin1 text")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


def _check_dtype_state(state):
    ok = (
        isinstance(state, tuple) and len(state) == 8 and state[0] == 3
        and _text(state[1]) in ("<", ">", "|", "=")
        and state[2:5] == (None, None, None) and state[5:] == (-1, -1, 0)
    )
    if not ok:
        raise pickle.UnpicklingError(f"unexpected numpy dtype state {state!r}")


def _check_array_state(state):
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise pickle.UnpicklingError("unexpected numpy array state")
    _, shape, dtype, _, data = state
    if not (isinstance(shape, tuple) and len(shape) <= 8
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n for n in shape)):
        raise pickle.UnpicklingError(f"bad numpy array shape {shape!r}")
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy array of objects or without raw data")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise pickle.UnpicklingError(
            f"numpy array shape {shape} x {dtype.itemsize} bytes does not match its "
            f"{len(data)} data bytes"
        )


class _RestrictedUnpickler(pickle._Unpickler):  # pure Python: bounded reads
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name} (a CIFAR pickle holds only dicts, lists, "
                "strings, bytes, ints and numpy arrays)"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not accepted")

    def load_build(self):
        state = self.stack[-1]
        inst = self.stack[-2]
        if isinstance(inst, np.dtype):
            _check_dtype_state(state)
        elif isinstance(inst, np.ndarray):
            _check_array_state(state)
        else:
            raise pickle.UnpicklingError(f"BUILD on a {type(inst).__name__} is not accepted")
        self.stack.pop()
        inst.__setstate__(state)

    dispatch[pickle.BUILD[0]] = load_build


def load(path, max_bytes=MAX_BYTES):
    """Unpickles ``path`` with the restricted unpickler (``encoding="bytes"``, as CIFAR needs).

    Raises:
      DataError: the file is missing, too large, truncated, or holds anything but
        plain containers, scalars and numeric numpy arrays.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if size > max_bytes:
        raise DataError(f"{path}: {size} bytes is larger than a CIFAR pickle can be ({max_bytes})")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # any malformed input: never a crash with an unclear type
        raise DataError(f"{path}: not an acceptable CIFAR pickle: {e}") from None
