"""A structural check of MATLAB v5 files before SciPy reads them (ILSVRC's ``meta.mat``).

``scipy.io.loadmat`` trusts what a file declares: a 200-byte file whose cell or
struct array declares 2^31 elements makes it allocate 16 GB before reading any of
them, and a compressed element expands without limit. ``uncompressed`` walks every
element first and returns an equivalent uncompressed file in which each declared
count fits the bytes that follow it, so SciPy then allocates no more than a small
multiple of that size. Only what the devkit's ``meta.mat`` holds is accepted: struct,
cell, char and numeric arrays (no objects, sparse matrices, functions; no v4 or v7.3
files).

Format (MATLAB's "MAT-File Format", level 5): a 128-byte header ending with the
endian mark ``IM`` (little-endian) or ``MI``, then data elements: an 8-byte tag
(u32 type, u32 byte count; or the "small element" form with the count in the upper
16 bits of the type word and up to 4 data bytes), the data, and padding to 8 bytes
(none after a compressed element).
"""

from __future__ import annotations

import math
import struct
import zlib

from tfq.data.errors import DataError

MI_INT8, MI_INT32, MI_UINT32, MI_MATRIX, MI_COMPRESSED = 1, 5, 6, 14, 15
CELL, STRUCT, CHAR = 1, 2, 4
NUMERIC = frozenset(range(6, 16))  # double, single, int8 .. uint64
COMPLEX = 0x0800  # array flags bit
MAX_DEPTH = 8
HEADER = 128


class _Walker:
    def __init__(self, data, path, endian):
        self.data, self.path, self.e = data, path, endian

    def fail(self, offset, problem):
        raise DataError(f"{self.path}: MAT element at byte {offset}: {problem}")

    def tag(self, pos, end):
        """(type, nbytes, data start, next element) of the element at ``pos``."""
        if pos + 8 > end:
            self.fail(pos, f"truncated tag ({end - pos} bytes left)")
        (word,) = struct.unpack_from(self.e + "I", self.data, pos)
        if word >> 16:  # small data element: count in the upper half, data inline
            kind, nbytes = word & 0xFFFF, word >> 16
            if nbytes > 4:
                self.fail(pos, f"small element of {nbytes} bytes (at most 4)")
            return kind, nbytes, pos + 4, pos + 8
        (nbytes,) = struct.unpack_from(self.e + "I", self.data, pos + 4)
        start = pos + 8
        if nbytes > end - start:
            self.fail(pos, f"declares {nbytes} bytes, more than the {end - start} left")
        padded = nbytes if word == MI_COMPRESSED else nbytes + (-nbytes) % 8
        return word, nbytes, start, min(start + padded, end)

    def sub(self, pos, end, kind, what):
        got, nbytes, start, nxt = self.tag(pos, end)
        if got != kind:
            self.fail(pos, f"{what}: element type {got}, expected {kind}")
        return start, nbytes, nxt

    def matrix(self, pos, end, depth):
        """Checks the miMATRIX element at ``pos``; returns where SciPy reads on from.

        Inside a matrix SciPy reads the sub-elements one after the other, whatever the
        matrix's byte count says, so the walk follows the sub-elements too (and checks
        that they stay within the byte count).
        """
        kind, nbytes, start, _ = self.tag(pos, end)
        if kind != MI_MATRIX:
            self.fail(pos, f"type {kind}, expected a matrix ({MI_MATRIX})")
        if depth > MAX_DEPTH:
            self.fail(pos, f"arrays nested more than {MAX_DEPTH} deep")
        if nbytes == 0:  # an empty array
            return start
        stop = start + nbytes
        at, n, p = self.sub(start, stop, MI_UINT32, "array flags")
        if n != 8:
            self.fail(start, f"array flags of {n} bytes (expected 8)")
        flags = struct.unpack_from(self.e + "I", self.data, at)[0]
        cls = flags & 0xFF
        at, n, p = self.sub(p, stop, MI_INT32, "dimensions")
        if n < 8 or n % 4:
            self.fail(at, f"dimensions of {n} bytes (at least 2 int32)")
        dims = struct.unpack_from(f"{self.e}{n // 4}i", self.data, at)
        if min(dims) < 0:
            self.fail(at, f"negative dimension in {dims}")
        count = math.prod(dims)
        _, _, p = self.sub(p, stop, MI_INT8, "array name")
        if cls in (CELL, STRUCT):
            fields = 1
            if cls == STRUCT:
                at, n, p = self.sub(p, stop, MI_INT32, "field name length")
                if n != 4:
                    self.fail(at, "field name length must be one int32")
                (length,) = struct.unpack_from(self.e + "i", self.data, at)
                at, n, p = self.sub(p, stop, MI_INT8, "field names")
                if not 0 < length <= 64 or n % length:
                    self.fail(at, f"{n} bytes of field names of length {length}")
                fields = n // length
            # Every element takes at least an 8-byte tag: the count must fit the bytes.
            if count * fields * 8 > stop - p:
                self.fail(pos, f"declares {dims} x {fields} elements, more than its "
                               f"{stop - p} bytes can hold")
            for _ in range(count * fields):
                p = self.matrix(p, stop, depth + 1)
            return p
        if cls == CHAR or cls in NUMERIC:
            parts = 2 if flags & COMPLEX else 1
            for _ in range(parts):
                _, n, _, p = self.tag(p, stop)
                if count > n:  # every value takes at least one byte
                    self.fail(pos, f"declares {dims} = {count} values in {n} data bytes")
            return p
        self.fail(pos, f"array class {cls} is not accepted (struct, cell, char and numeric "
                       "arrays only)")


def _inflate(data, start, nbytes, limit, chunk=1 << 20):
    """(bytes, reached the end) of the zlib stream ``data[start:start + nbytes]``, at most
    ``limit`` bytes of it, or None when corrupt.

    In chunks into one buffer: ``decompress(..., max_length)`` grows its output by
    doubling, so a single call can peak at twice ``limit``.
    """
    d = zlib.decompressobj()
    out = bytearray()
    pending = memoryview(data)[start:start + nbytes]
    try:
        while len(out) < limit and not d.eof:
            part = d.decompress(pending, min(chunk, limit - len(out)))
            pending = d.unconsumed_tail
            if not part and not pending:
                break
            out += part
    except zlib.error:
        return None
    return out, d.eof  # a bytearray: bytes(out) would be a second copy


def uncompressed(data, path, max_bytes):
    """The file ``data`` with compressed elements expanded, after checking every element.

    Args:
      data: the file's bytes.
      path: for messages.
      max_bytes: the most the uncompressed file may hold.

    Raises:
      DataError: not a MAT v5 file, or an element that declares more than it holds.
    """
    if len(data) < HEADER or data[126:128] not in (b"IM", b"MI"):
        raise DataError(f"{path}: not a MATLAB v5 MAT-file (no 128-byte header with the "
                        "IM/MI endian mark)")
    endian = "<" if data[126:128] == b"IM" else ">"
    walker = _Walker(data, path, endian)
    out, total, pos = [data[:HEADER]], HEADER, HEADER
    while pos < len(data):
        # Top level: SciPy seeks to each variable's start + byte count (no padding).
        kind, nbytes, start, _ = walker.tag(pos, len(data))
        if nbytes == 0 or start != pos + 8:
            walker.fail(pos, "empty or small element at the top level")
        if kind == MI_COMPRESSED:
            element = _inflate(data, start, nbytes, max_bytes - total + 1)
            if element is None:
                walker.fail(pos, "corrupt compressed element")
            element, complete = element
            if len(element) > max_bytes - total or not complete:
                walker.fail(pos, f"compressed element expands beyond {max_bytes} bytes, "
                                 "or is truncated")
            inner = _Walker(element, path, endian)
            _, inner_bytes, _, _ = inner.tag(0, len(element))
            inner.matrix(0, len(element), 0)
            element = element[:8 + inner_bytes]
        else:
            element = data[pos:start + nbytes]
            if total + len(element) > max_bytes:
                walker.fail(pos, f"file larger than {max_bytes} bytes")
            walker.matrix(pos, start + nbytes, 0)
        out.append(element)
        total += len(element)
        pos = start + nbytes
    return b"".join(out)
