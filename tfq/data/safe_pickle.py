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

Pickle bombs are refused too: only the opcodes above are accepted (no sets, no
``NEWOBJ``/``INST``/``OBJ``/extensions, no out-of-band buffers); at most
``MAX_OPCODES`` opcodes run (each makes at most one small object, so memory stays
within a few hundred bytes per opcode, whatever the file declares); dict keys must be
scalars (a key made of shared nested tuples would take 2^depth steps to hash, or
crash the interpreter when nested deeply); and error messages show bounded reprs.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import reprlib
import struct

import numpy as np

from tfq.data.errors import DataError
from tfq.data.files import read_bounded

MAX_BYTES = 1 << 30  # the largest CIFAR pickle (cifar-100 train) is 155 MB
# cifar-100's train pickle runs about 200,000 opcodes (one or two per label and
# filename); each opcode makes at most one small object.
MAX_OPCODES = 1_000_000

_DTYPES = frozenset(
    ["u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1",
     "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4", "<f8",
     ">u2", ">i2", ">u4", ">i4", ">u8", ">i8", ">f4", ">f8", "|u1", "|i1", "|b1"]
)
_KEY_TYPES = (str, bytes, int, float, bool, type(None))
# The opcodes of plain data, memo, globals (checked by find_class), REDUCE and BUILD.
_OPCODES = (
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE "
    "INT BININT BININT1 BININT2 LONG LONG1 LONG4 FLOAT BINFLOAT "
    "STRING BINSTRING SHORT_BINSTRING BINBYTES SHORT_BINBYTES BINBYTES8 BYTEARRAY8 "
    "UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8 "
    "EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_LIST APPEND APPENDS LIST "
    "EMPTY_DICT DICT SETITEM SETITEMS "
    "GET BINGET LONG_BINGET PUT BINPUT LONG_BINPUT MEMOIZE "
    "GLOBAL STACK_GLOBAL REDUCE BUILD"
).split()

_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother = 3, 60, 60


def _text(value):
    return value.decode("latin1") if isinstance(value, bytes) else value


def _is_name(value):
    return isinstance(value, (str, bytes)) and len(value) <= 16


class _NdarrayType:
    """Stands for ``numpy.ndarray``: usable only as _reconstruct's first argument."""


_NDARRAY = _NdarrayType()


def _reconstruct(subtype, shape, typecode):
    if subtype is not _NDARRAY or not _is_name(typecode) or _text(typecode) != "b" or \
            not isinstance(shape, tuple) or shape != (0,):
        raise pickle.UnpicklingError(
            f"unexpected numpy _reconstruct arguments {_short.repr(shape)}, "
            f"{_short.repr(typecode)}"
        )
    return np.ndarray((0,), "b")


def _dtype(spec, align=False, copy=True):
    if not _is_name(spec) or _text(spec) not in _DTYPES:
        raise pickle.UnpicklingError(
            f"numpy dtype {_short.repr(spec)} is not a plain numeric type")
    # A copy, as NumPy makes when unpickling: BUILD then sets its byte order. The
    # shared built-in dtype would silently keep native order (big-endian data misread).
    return np.dtype(_text(spec), False, True)


def _frombuffer(buffer, dtype, shape, order):
    # NumPy's protocol-5 form of an array (in-band buffer).
    data = bytes(buffer) if isinstance(buffer, (bytes, bytearray)) else None
    if not isinstance(dtype, np.dtype) or not _is_name(order) or \
            _text(order) not in ("C", "F") or not isinstance(shape, tuple):
        raise pickle.UnpicklingError("unexpected numpy _frombuffer arguments")
    _check_array_state((1, shape, dtype, False, data))
    return np.frombuffer(data, dtype).reshape(shape, order=_text(order)).copy()


def _latin1(text, encoding="latin1"):
    if not isinstance(text, str) or not _is_name(encoding) or \
            _text(encoding) not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is accepted only for latin1 text")
    return text.encode("latin1")


def _empty_bytes(*args):
    # Protocols 0-2 write b"" as a call of bytes() with no arguments.
    if args:
        raise pickle.UnpicklingError("bytes() is accepted only without arguments")
    return b""


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


def _check_dtype_state(state):
    ok = (
        isinstance(state, tuple) and len(state) == 8 and state[0] == 3
        and _is_name(state[1]) and _text(state[1]) in ("<", ">", "|", "=")
        and state[2:5] == (None, None, None) and state[5:] == (-1, -1, 0)
    )
    if not ok:
        raise pickle.UnpicklingError(f"unexpected numpy dtype state {_short.repr(state)}")


def _check_array_state(state):
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise pickle.UnpicklingError("unexpected numpy array state")
    _, shape, dtype, _, data = state
    if not (isinstance(shape, tuple) and len(shape) <= 8
            and all(type(n) is int and 0 <= n < 1 << 62 for n in shape)):
        raise pickle.UnpicklingError(f"bad numpy array shape {_short.repr(shape)}")
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy array of objects or without raw data")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise pickle.UnpicklingError(
            f"numpy array shape {shape} x {dtype.itemsize} bytes does not match its "
            f"{len(data)} data bytes"
        )


def _check_key(key):
    if type(key) not in _KEY_TYPES:
        raise pickle.UnpicklingError(
            f"dict key of type {type(key).__name__} (accepted: str, bytes, int, float, bool, "
            "None)")
    return key


def _target(stack, kind):
    if not stack or type(stack[-1]) is not kind:
        raise pickle.UnpicklingError(f"{kind.__name__} operation on a non-{kind.__name__}")
    return stack[-1]


class _RestrictedUnpickler(pickle._Unpickler):  # pure Python: bounded reads
    def __init__(self, file, max_opcodes=MAX_OPCODES):
        super().__init__(file, encoding="bytes")
        self._file = file
        self._budget = max_opcodes
        self._max_opcodes = max_opcodes

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise pickle.UnpicklingError(
                f"refusing global {_short.repr(module)[1:-1]}.{_short.repr(name)[1:-1]} "
                "(a CIFAR pickle holds only dicts, lists, strings, bytes, ints and numpy "
                "arrays)"
            ) from None

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

    def load_frame(self):
        # The stock unpickler accepts a frame that declares more than the file holds.
        (size,) = struct.unpack("<Q", self.read(8))
        left = len(self._file.getbuffer()) - self._file.tell()
        if size > left:
            raise pickle.UnpicklingError(f"frame declares {size} bytes; {left} are left")
        self._unframer.load_frame(size)

    def load_dict(self):
        items = self.pop_mark()
        self.append({_check_key(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)})

    def load_setitem(self):
        value = self.stack.pop()
        key = _check_key(self.stack.pop())
        _target(self.stack, dict)[key] = value

    def load_setitems(self):
        items = self.pop_mark()
        target = _target(self.stack, dict)
        for i in range(0, len(items) - 1, 2):
            target[_check_key(items[i])] = items[i + 1]

    def load_append(self):
        value = self.stack.pop()
        _target(self.stack, list).append(value)

    def load_appends(self):
        items = self.pop_mark()
        _target(self.stack, list).extend(items)


def _counted(handler, name):
    def run(self):
        self._budget -= 1
        if self._budget < 0:
            raise pickle.UnpicklingError(
                f"more than {self._max_opcodes} pickle opcodes (a pickle bomb, or not a "
                "CIFAR pickle)")
        handler(self)

    run.__name__ = f"load_{name.lower()}"
    return run


def _dispatch():
    """Opcode byte -> handler: the accepted opcodes only, each counted."""
    table = {}
    for name in _OPCODES:
        code = getattr(pickle, name)[0]
        handler = pickle._Unpickler.dispatch[code]
        own = getattr(_RestrictedUnpickler, handler.__name__, handler)  # overridden ones
        table[code] = _counted(own, name)
    return table


_RestrictedUnpickler.dispatch = _dispatch()


def load(path, max_bytes=MAX_BYTES, max_opcodes=MAX_OPCODES):
    """Unpickles ``path`` with the restricted unpickler (``encoding="bytes"``, as CIFAR needs).

    Raises:
      DataError: the file is missing, too large, truncated, or holds anything but
        plain containers, scalars and numeric numpy arrays (or more than
        ``max_opcodes`` pickle opcodes).
    """
    path = os.fspath(path)
    data = read_bounded(path, max_bytes, "CIFAR pickle")
    try:
        return _RestrictedUnpickler(io.BytesIO(data), max_opcodes).load()
    except DataError:
        raise
    except KeyError as e:  # the dispatch table: an opcode that is not accepted
        if isinstance(e.args[0], int) and 0 <= e.args[0] < 256:
            problem = f"opcode {bytes([e.args[0]])!r} is not accepted (not plain data)"
        else:
            problem = f"KeyError {_short.repr(e.args[0])}"
        raise DataError(f"{path}: not an acceptable CIFAR pickle: {problem}") from None
    except Exception as e:  # any malformed input: never a crash with an unclear type
        raise DataError(f"{path}: not an acceptable CIFAR pickle: {str(e)[:300]}") from None
