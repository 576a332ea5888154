"""Counting images skipped with ``skip_corrupt=True`` and reporting them per epoch.

Usage with ``model.fit`` (what the training CLI does)::

    train = tfq.data.build_dataset("imagenet", "train", training=True, skip_corrupt=True, ...)
    val = tfq.data.build_dataset("imagenet", "validation", skip_corrupt=True, ...)
    model.fit(train, validation_data=val,
              callbacks=[tfq.data.SkippedImagesReport(train, val)])
    # or: callbacks=[...] + tfq.data.callbacks_for(train, val)

At the end of every epoch the callback prints how many images each dataset skipped
during that epoch, with up to ``max_names`` of their files, and adds
``skipped_images`` (the sum) to the epoch's logs, so callbacks after it (CSVLogger,
TensorBoard, History) see it. Datasets built by ``distributed_dataset`` work the
same way. Counts are taken from the epoch's start to its end; images that a
prefetching iterator decoded ahead of what the epoch consumed (``steps_per_epoch``
shorter than the data) are counted in the epoch that decoded them.
"""

from __future__ import annotations

import threading

import keras

from tfq.data.errors import DataError

_ATTR = "_tfq_skip_counters"


class SkipCounter:
    """Thread-safe count of skipped images (the pipeline calls ``add`` from its threads).

    Attributes:
      name: a label for reports (dataset name and split).
      total: images skipped since creation.
    """

    def __init__(self, name=""):
        self.name = name
        self.total = 0
        self._epoch = 0
        self._files = []
        self._lock = threading.Lock()

    def add(self, count, origin):
        """Records ``count`` skipped images, the last of them being ``origin``."""
        with self._lock:
            self.total += int(count)
            self._epoch += int(count)
            self._files.append(origin if count == 1 else f"{origin} (and {count - 1} before it)")

    def take(self):
        """Returns ``(count, files)`` since the previous ``take`` and resets them."""
        with self._lock:
            result = (self._epoch, list(self._files))
            self._epoch, self._files = 0, []
        return result


def attach(dataset, counters):
    """Remembers ``counters`` on ``dataset`` (a tf.data or distributed dataset)."""
    setattr(dataset, _ATTR, tuple(getattr(dataset, _ATTR, ())) + tuple(counters))
    return dataset


def counters_of(dataset):
    """The ``SkipCounter`` objects of a dataset built with ``skip_corrupt=True``.

    Raises:
      DataError: the dataset was not built by tfq.data with ``skip_corrupt=True``.
    """
    if isinstance(dataset, SkipCounter):
        return (dataset,)
    counters = getattr(dataset, _ATTR, None)
    if counters is None:
        raise DataError(
            f"{type(dataset).__name__}: not built by tfq.data.build_dataset(..., skip_corrupt=True) "
            "(only such datasets, or their SkipCounter objects, can be reported)"
        )
    return counters


def callbacks_for(*datasets):
    """``[SkippedImagesReport(...)]`` for the datasets built with ``skip_corrupt=True``
    among ``datasets`` (tf.data or distributed), else ``[]``: add it to ``fit``'s callbacks."""
    counted = [d for d in datasets if getattr(d, _ATTR, None)]
    return [SkippedImagesReport(*counted)] if counted else []


class SkippedImagesReport(keras.callbacks.Callback):
    """Keras callback: reports images skipped by ``skip_corrupt=True`` at each epoch end.

    Args:
      *datasets: datasets built with ``skip_corrupt=True`` (tf.data or distributed), or
        ``SkipCounter`` objects.
      max_names: how many skipped files to name per dataset and epoch.
      printer: called with each report line (default: ``print``).
    """

    def __init__(self, *datasets, max_names=10, printer=None):
        super().__init__()
        self.counters = [c for d in datasets for c in counters_of(d)]
        self.max_names = max_names
        self.printer = printer or _print
        self.history = []  # (epoch, skipped) per epoch
        self._in_fit = False

    def on_train_begin(self, logs=None):
        self._in_fit = True

    def on_train_end(self, logs=None):
        self._in_fit = False

    def on_epoch_begin(self, epoch, logs=None):
        # Count this epoch only: not images met by earlier loops over the dataset.
        for counter in self.counters:
            counter.take()

    def on_epoch_end(self, epoch, logs=None):
        skipped = self._report(f"epoch {epoch + 1}")
        self.history.append((epoch, skipped))
        if logs is not None:
            logs["skipped_images"] = skipped

    def on_test_end(self, logs=None):
        # During fit, validation is reported with its epoch.
        if not self._in_fit:
            self._report("evaluation")

    def _report(self, when):
        total = 0
        for counter in self.counters:
            count, files = counter.take()
            total += count
            if count:
                shown = ", ".join(files[: self.max_names])
                more = f" (+{len(files) - self.max_names} more)" if len(files) > self.max_names else ""
                self.printer(
                    f"tfq.data: {when}: skipped {count} unreadable image(s) in "
                    f"{counter.name}: {shown}{more}"
                )
        return total


def _print(line):
    print(line, flush=True)
