"""MNIST-format idx files: "mnist" and "fashion_mnist".

Files in ``data_dir``: ``{train,t10k}-{images,labels}-idx{3,1}-ubyte`` (also with
``.idx`` instead of ``-idx``), each optionally ``.gz``. The default ``data_dir`` of
"fashion_mnist" is ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist``), of "mnist" ``/usr/share/datasets/mnist``.

Labels are the files' own (0..9): Fashion-MNIST's class order is the official one
(T-shirt/top, Trouser, ...), not alphabetical. Training: shifts of up to 2 pixels
(zero padding); Fashion-MNIST is also flipped horizontally (clothes are left-right
symmetric as classes), MNIST never.

Every header is checked before anything is allocated: magic number, element type
(unsigned byte), number of dimensions, and the declared size against the file's real
size (for gzip files, against the most the compressed size can expand to, then
against the bytes actually read).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from tfq.data import core
from tfq.data.errors import DataError
from tfq.data.files import FileMemo, file_size, first_existing

FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
DEFAULT_DIRS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_MAX_DEFLATE_RATIO = 1032  # the most deflate can compress
_MAX_ELEMENTS = 1 << 31
_memo = FileMemo(maxsize=4)


def _open(path):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_exact(f, n, path, what, chunk=1 << 20):
    # In chunks into a growing buffer: a single read(n) would allocate what the header
    # claims up front, and joining chunks would need twice the memory.
    data = bytearray()
    while len(data) < n:
        part = f.read(min(chunk, n - len(data)))
        if not part:
            raise DataError(f"{path}: truncated {what} ({len(data)} of {n} bytes)")
        data += part
    return data


def read_idx(path, ndim):
    """Reads an idx file of unsigned bytes with ``ndim`` dimensions.

    Raises:
      DataError: bad magic, type or rank, a declared size the file cannot hold,
        truncated data, or trailing bytes.
    """
    size = file_size(path)
    limit = size * _MAX_DEFLATE_RATIO if path.endswith(".gz") else size
    try:
        with _open(path) as f:
            header = _read_exact(f, 4, path, "idx header")
            zero, dtype, rank = struct.unpack(">HBB", header)
            if zero != 0 or dtype != 0x08:
                raise DataError(
                    f"{path}: not an idx file of unsigned bytes (magic {header.hex()}, "
                    f"expected 0000080{ndim})"
                )
            if rank != ndim:
                raise DataError(f"{path}: idx file has {rank} dimensions, expected {ndim}")
            dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path, "idx dimensions"))
            count = math.prod(dims)  # exact: NumPy's int64 product could wrap to 0
            if count > min(limit, _MAX_ELEMENTS):
                raise DataError(
                    f"{path}: header declares {dims} = {count} bytes, more than the "
                    f"{size}-byte file can hold"
                )
            data = _read_exact(f, count, path, "idx data")
            if f.read(1):
                raise DataError(f"{path}: trailing bytes after the {dims} idx data")
    except (OSError, EOFError, zlib.error) as e:  # gzip's errors: corrupt or truncated
        raise DataError(f"{path}: cannot read idx file ({e})") from None
    return np.frombuffer(data, np.uint8).reshape(dims)


def _find(data_dir, split, kind):
    prefix = _SPLIT_PREFIX[split]
    rank = 3 if kind == "images" else 1
    names = [f"{prefix}-{kind}{sep}idx{rank}-ubyte{gz}" for sep in ("-", ".") for gz in (".gz", "")]
    path = first_existing([os.path.join(data_dir, n) for n in names])
    if path is None:
        raise DataError(f"{data_dir}: no {split} {kind} idx file (looked for {', '.join(names)})")
    return path


def load_split(data_dir, split):
    """``ArrayRecords`` of one split, with images and labels checked against each other."""
    images_path, labels_path = _find(data_dir, split, "images"), _find(data_dir, split, "labels")

    def compute():
        images = read_idx(images_path, 3)
        labels = read_idx(labels_path, 1)
        if len(labels) != len(images):
            raise DataError(
                f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..9")
        return core.ArrayRecords(images[..., None], labels.astype(np.int32), images_path)

    return _memo.get([images_path, labels_path], compute)


def open_source(name, data_dir, download, options):
    """The "mnist" / "fashion_mnist" sources (local idx files only)."""
    del download
    data_dir = data_dir or DEFAULT_DIRS[name]
    splits = {s: load_split(data_dir, s) for s in _SPLIT_PREFIX}
    h, w = splits["train"].images.shape[1:3]
    return core.Source(
        name=name,
        description=f"idx files at {data_dir}",
        class_names=FASHION_CLASSES if name == "fashion_mnist" else [str(i) for i in range(10)],
        split_sizes={s: len(r) for s, r in splits.items()},
        records=splits.__getitem__,
        augment=core.Augment(core.PAD_CROP, native_size=(h, w), pad=2, flip=name == "fashion_mnist"),
        aliases={"validation": "test"},
    )
