"""``DataError`` and the bridge from errors raised inside a running tf.data pipeline."""

from __future__ import annotations

import contextlib
import os
import re

# Problems found while a pipeline runs surface as a ``tf.errors.OpError`` (TensorFlow
# cannot raise a Python class from inside a graph); their message carries this tag so
# that ``translate_errors`` can turn them back into a ``DataError``.
TAG = "tfq.data.DataError: "

_TAGGED = re.compile(re.escape(TAG) + r"(.*?)(?:\]\s*(?:\n|$)|\Z)", re.S)


class DataError(ValueError):
    """Bad input data: the message names the file and says what was wrong or accepted."""


def fail(path, problem):
    """Raises ``DataError`` for ``path`` (a file or folder) with ``problem``."""
    raise DataError(f"{os.fspath(path)}: {problem}")


@contextlib.contextmanager
def translate_errors():
    """Re-raises tfq pipeline errors met while iterating as ``DataError``.

    Corrupt images, records with missing features or impossible labels are only seen
    when the pipeline decodes them; TensorFlow then raises ``tf.errors.OpError``. Wrap
    ``model.fit`` / ``evaluate`` / a loop over the dataset in this context manager to
    get a ``DataError`` naming the file instead. Other errors pass through unchanged.

    Example:
      with tfq.data.translate_errors():
          model.fit(train_ds, epochs=2)
    """
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as e:
        match = _TAGGED.search(e.message or "")
        if match is None:
            raise
        raise DataError(match.group(1).strip()) from e
