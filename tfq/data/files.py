"""File-system helpers shared by the sources: listings, size checks, small caches."""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import threading

from tfq.data.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Files that tools leave in image folders; never images, never an error.
_JUNK = frozenset(["thumbs.db", "desktop.ini"])


def is_junk(name):
    return name.startswith(".") or name.lower() in _JUNK


def is_image_name(name):
    return name.lower().endswith(IMAGE_EXTENSIONS)


@functools.lru_cache(maxsize=4096)
def _listing(path, mtime_ns, inode):
    del mtime_ns, inode  # cache keys: a folder's mtime changes when entries come or go
    with os.scandir(path) as it:
        entries = [(e.name, e.is_dir()) for e in it if not is_junk(e.name)]
    return tuple(sorted(entries))


def listing(path):
    """Sorted ``(name, is_dir)`` of a folder, hidden and junk files left out.

    Cached per folder until the folder's mtime changes (ImageNet's 1,000 train
    folders are listed once per process, not once per call).

    Raises:
      DataError: ``path`` is missing or not a folder.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        raise DataError(f"{path}: folder not found") from None
    if not os.path.isdir(path):
        raise DataError(f"{path}: not a folder")
    return _listing(path, st.st_mtime_ns, st.st_ino)


def subdirs(path):
    return [n for n, is_dir in listing(path) if is_dir]


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def read_bounded(path, max_bytes, what="file"):
    """All bytes of ``path``, refused if it holds more than ``max_bytes``.

    Reads what the file holds, never ``max_bytes`` up front: ``f.read(n)`` allocates
    ``n`` bytes before reading, so a generous limit would cost that much per call.

    Raises:
      DataError: missing, unreadable, or larger than ``max_bytes``.
    """
    path = os.fspath(path)
    size = file_size(path)
    if size > max_bytes:
        raise DataError(f"{path}: {size} bytes is larger than a {what} can be ({max_bytes})")
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > max_bytes:
        raise DataError(f"{path}: grew past {max_bytes} bytes while being read")
    return data


def load_npy(path, shape=None, max_bytes=1 << 30):
    """A ``.npy`` array of a plain numeric dtype, its header checked before any allocation.

    ``np.load`` allocates what the header declares before reading (a 100-byte file
    can ask for terabytes); here the declared size must equal the bytes the file
    holds after its header.

    Args:
      path: the file.
      shape: the shape the array must have, or None for any.
      max_bytes: the largest accepted file.

    Raises:
      DataError: not a .npy file, an object / structured dtype, another shape, or a
        declared size that does not match the file.
    """
    import numpy as np

    size = file_size(path)
    if size > max_bytes:
        raise DataError(f"{path}: {size} bytes is larger than accepted ({max_bytes})")
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise DataError(f"{path}: .npy format version {version} is not accepted")
            declared, fortran, dtype = readers[version](f)
            start = f.tell()
            if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
                raise DataError(f"{path}: dtype {dtype} is not a plain numeric type")
            if shape is not None and tuple(declared) != tuple(shape):
                raise DataError(f"{path}: shape {tuple(declared)}, expected {tuple(shape)}")
            nbytes = math.prod(declared) * dtype.itemsize
            if nbytes != size - start:
                raise DataError(f"{path}: header declares {tuple(declared)} {dtype} = {nbytes} "
                                f"bytes; the file holds {size - start} after its header")
            data = f.read(nbytes)
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npy file ({str(e)[:200]})") from None
    if len(data) != nbytes:
        raise DataError(f"{path}: changed while being read")
    return np.frombuffer(data, dtype).reshape(declared, order="F" if fortran else "C").copy()


def load_mean(path, shape):
    """A saved per-pixel mean at ``path`` if it is a valid one, else None.

    Valid: a plain ``.npy`` of ``shape``, finite, in [0, 1]. Callers recompute and
    replace anything else (a damaged cache entry, or a crafted file).
    """
    import numpy as np

    if not os.path.exists(path):
        return None
    try:
        mean = load_npy(path, shape=shape, max_bytes=64 << 20).astype(np.float32)
    except DataError:
        return None
    if not np.all(np.isfinite(mean)) or mean.min(initial=0) < 0 or mean.max(initial=0) > 1:
        return None
    return mean


def first_existing(candidates):
    """The first path in ``candidates`` that exists, else None."""
    for c in candidates:
        if os.path.exists(c):
            return c
    return None


def signature(paths):
    """A string identifying files by path, size and mtime (for cache keys)."""
    parts = []
    for p in paths:
        st = os.stat(p)
        parts.append(f"{os.path.realpath(p)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


class FileMemo:
    """A small LRU of values computed from files, invalidated when a file changes."""

    def __init__(self, maxsize=4):
        self._items = collections.OrderedDict()
        self._maxsize = maxsize
        self._lock = threading.Lock()

    def get(self, paths, compute, variant=""):
        key = (signature(paths), variant)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
        return value


def cache_dir():
    """tfq's cache folder: ``$TFQ_CACHE_DIR``, else ``$XDG_CACHE_HOME/tfq``, else ``~/.cache/tfq``."""
    if os.environ.get("TFQ_CACHE_DIR"):
        return os.environ["TFQ_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tfq")


def cache_path(kind, key, suffix):
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return os.path.join(cache_dir(), kind, digest + suffix)


def atomic_write(path, write):
    """Writes via ``write(file_object)`` to a temporary file, then renames it into place.

    Returns False (and writes nothing) when the cache folder is not writable.
    """
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
        return True
    except OSError:
        return False
