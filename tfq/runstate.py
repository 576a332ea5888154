"""Crash-safe files of a training run: atomic writes, the run state, a run lock.

Every file a run writes goes to a temporary name in the same directory and is moved
into place with ``os.replace``, so a ``kill -9`` at any moment leaves either the old
or the new file, never half of one. ``state.json`` is the single source of truth for
what has finished; checkpoints are only trusted through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yields a temporary path beside ``path``; moves it onto ``path`` on success.

    Args:
      path: the final file path.
      suffix: suffix of the temporary name (Keras checks file extensions).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    os.unlink(tmp)  # writers such as Keras refuse to overwrite without asking
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj):
    """Writes ``obj`` as indented JSON, atomically."""
    with atomic_path(path, ".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
            f.write("\n")


def write_text(path, text):
    """Writes ``text`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path, default=None):
    """Reads JSON, or returns ``default`` when the file does not exist."""
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def final_model_path(model_dir, results):
    """The path of a run's final model from its ``results.json`` dict, kept inside the run.

    ``final_model`` is a path relative to ``model_dir``; a results file copied from
    elsewhere (or crafted) must not make a loader read, or a writer replace, a file
    outside the run.

    Raises:
      ValueError: ``results`` is not a dict, ``final_model`` is missing or not a
        non-empty string, or it resolves outside ``model_dir`` (the message says which).
    """
    if not isinstance(results, dict):
        raise ValueError("results.json must hold a JSON object")
    final = results.get("final_model")
    if not isinstance(final, str) or not final:
        raise ValueError('no "final_model" entry (the run has not finished a stage)')
    root = os.path.realpath(model_dir)
    path = os.path.realpath(os.path.join(root, final))
    if os.path.isabs(final) or os.path.commonpath([root, path]) != root:
        raise ValueError(f"final_model {final!r} lies outside the run folder {model_dir}")
    return path


class RunBusy(RuntimeError):
    """Another live process is training in the same run directory."""


class RunLock:
    """An exclusive lock on a run directory (released by the OS if the process dies).

    Raises:
      RunBusy: another live process holds the lock.
    """

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, ".lock")
        self._f = None

    def __enter__(self):
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.close()
            raise RunBusy(
                f"{os.path.dirname(self.path)} is in use by another training process; "
                "wait for it to finish or choose another --model_dir"
            ) from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(str(os.getpid()))
        self._f.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()
