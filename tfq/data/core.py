"""Types shared by the sources and the pipeline.

A *source* module turns ``(data_dir, options)`` into a ``Source``: what the data is
(class names, split sizes, how to augment it) and, per split, its ``Records``:

- ``ArrayRecords``: decoded uint8 images held in memory (digits, idx files, CIFAR pickles);
- ``FileRecords``: image files and their labels (class folders, ImageNet JPEGs);
- ``StreamRecords``: encoded images read from record files (TFRecord shards, tfds).

The pipeline (``tfq.data.pipeline``) does everything else the same way for every source.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from tfq.data.errors import DataError

PAD_CROP = "pad_crop"
RESIZE_CROP = "resize_crop"
AUGMENTS = (PAD_CROP, RESIZE_CROP)

# ImageNet convention (method.md section 4): resize the shorter side to 256, crop 224.
RESIZE_RATIO = 256 / 224
DEFAULT_LARGE_SIZE = 224
# Images up to this size are "small" (CIFAR-like): padded and cropped, never resized.
SMALL_MAX_SIZE = 64


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
      name: the dataset name as given (``"cifar10"``, ``"tfds:mnist"``...).
      num_classes: number of classes.
      image_shape: ``(H, W, 3)`` of the images as fed to the model.
      class_names: class names; index ``i`` of a label is ``class_names[i]``.
      split_sizes: examples per split after ``limit``/``holdout`` (``"holdout"`` is
        present only with ``holdout > 0``; ``"unused"``, the training examples
        ``limit`` leaves out, only when it leaves some).
      source: the layout found and where (for logs).
    """

    name: str
    num_classes: int
    image_shape: tuple
    class_names: list
    split_sizes: dict
    source: str = ""


@dataclasses.dataclass(frozen=True)
class ArrayRecords:
    """Decoded images in memory: ``images`` uint8 [N, H, W, 1 or 3], ``labels`` int32 [N]."""

    images: np.ndarray
    labels: np.ndarray
    origin: str

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        return ArrayRecords(self.images[idx], self.labels[idx], self.origin)


@dataclasses.dataclass(frozen=True)
class FileRecords:
    """Image files: ``paths`` (str [N]) and ``labels`` (int32 [N])."""

    paths: np.ndarray
    labels: np.ndarray
    origin: str

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        return FileRecords(self.paths[idx], self.labels[idx], self.origin)


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """How the pipeline wants a stream read.

    Attributes:
      shuffle: reshuffle the file order every epoch (seeded by ``seed``).
      fixed_order_seed: when not None, read files in one fixed order drawn from this
        seed (needed by ``limit``/``holdout``, which pick the first records per class).
      seed: the shuffle seed.
      deterministic: keep the read order reproducible.
      input_context: a ``tf.distribute.InputContext`` to shard files by, or None.
      epoch: None, or the pipeline's epoch variable: a source that can should then
        draw each pass's file order from ``(seed, epoch)``
        (``tfq.data.robust.shuffled``) instead of reshuffling per pass.
    """

    shuffle: bool
    fixed_order_seed: Optional[int]
    seed: int
    deterministic: bool
    input_context: object = None
    epoch: object = None


@dataclasses.dataclass(frozen=True)
class StreamRecords:
    """Encoded images read from record files.

    Attributes:
      open: ``open(plan) -> (dataset, expected)``; ``dataset`` yields dicts with
        ``payload`` (encoded image bytes), ``label`` (int32, already a class index),
        ``origin`` (string: the file or record id, for messages), ``index`` (int64: the
        record's number in that file, or -1) and ``problem`` ("" or what is wrong with
        the record: missing feature, impossible label); ``expected`` is the number
        of records the dataset must yield (None when unknown), checked at the end of an
        epoch so that records lost to a read error are never dropped silently.
      size: number of records in the split.
      origin: where they are, for messages.
      selected: a ``limit``/``holdout`` subset: read in a fixed order, so it is
        sharded per element after selection rather than per file.
    """

    open: Callable
    size: int
    origin: str
    selected: bool = False

    def __len__(self):
        return self.size


@dataclasses.dataclass(frozen=True)
class Augment:
    """A source's default geometry.

    Attributes:
      mode: ``PAD_CROP`` (small images: zero-pad, random crop, optional flip) or
        ``RESIZE_CROP`` (shorter side resized, random crop / centre crop).
      native_size: (H, W) of the stored images, or None when they vary.
      pad: padding in pixels at ``native_size`` (PAD_CROP).
      flip: random horizontal flips while training.
    """

    mode: str
    native_size: Optional[tuple] = None
    pad: int = 4
    flip: bool = True


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The resolved geometry of one pipeline.

    Attributes:
      mode: ``PAD_CROP`` or ``RESIZE_CROP``.
      size: (H, W) fed to the model.
      pad: PAD_CROP padding in pixels.
      resize: RESIZE_CROP shorter side before cropping.
      flip: random horizontal flips while training.
    """

    mode: str
    size: tuple
    pad: int = 0
    resize: int = 0
    flip: bool = True


@dataclasses.dataclass
class Source:
    """A dataset found on disk (or in memory), ready to give records per split.

    Attributes:
      name: the dataset name.
      description: layout and location, for logs and ``DatasetInfo.source``.
      class_names: sorted (or source-defined, documented per source) class names.
      split_sizes: examples per canonical split.
      records: ``records(split) -> ArrayRecords | FileRecords | StreamRecords``.
      augment: default geometry.
      aliases: other accepted split names -> canonical split.
      cache_key: identifies the data for the pixel-mean cache; None: never cached
        (in-memory sources, cheap to recompute).
    """

    name: str
    description: str
    class_names: list
    split_sizes: dict
    records: Callable
    augment: Augment
    aliases: dict = dataclasses.field(default_factory=dict)
    cache_key: Optional[str] = None

    def canonical_split(self, split):
        """Maps an accepted split name to the source's own name.

        Raises:
          DataError: unknown split; the message lists the accepted ones.
        """
        if split in self.split_sizes:
            return split
        if split in self.aliases:
            return self.aliases[split]
        accepted = sorted(self.split_sizes) + sorted(self.aliases)
        raise DataError(
            f"{self.description}: no split {split!r}; accepted: {', '.join(accepted)}"
        )


_INT_OPTIONS = ("pad", "resize", "shuffle_buffer")
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def option_from_text(key, text):
    """A source option given as text (a command line's ``key=value``) as
    ``build_dataset`` takes it: ``pad``, ``resize`` and ``shuffle_buffer`` become ints,
    ``flip`` a bool (true/false, yes/no, 1/0); every other option stays text.

    Raises:
      DataError: the text is not a value of the option's type.
    """
    if key in _INT_OPTIONS:
        try:
            return int(text)
        except ValueError:
            raise DataError(f"option {key} must be an integer; got {text!r}") from None
    if key == "flip":
        if text.strip().lower() in _TRUE + _FALSE:
            return text.strip().lower() in _TRUE
        raise DataError(f"option flip must be true or false; got {text!r}")
    return text


class Options:
    """Source options (``**source_options``), consumed one by one.

    Every source reads the options it understands with ``pop``; ``finish`` then
    rejects anything left, so a typo never silently does nothing.
    """

    COMMON = ("augment", "pad", "flip", "resize", "shuffle_buffer")

    def __init__(self, name, options):
        self.name = name
        self._options = dict(options)
        self._accepted = list(self.COMMON)

    def pop(self, key, default=None, choices=None):
        self._accepted.append(key)
        value = self._options.pop(key, default)
        if choices is not None and value not in choices:
            raise DataError(
                f"{self.name}: option {key}={value!r} is not one of {', '.join(map(repr, choices))}"
            )
        return value

    def finish(self):
        """Raises ``DataError`` for options nobody read."""
        unknown = sorted(set(self._options) - set(self.COMMON))
        if unknown:
            raise DataError(
                f"{self.name}: unknown option(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(set(self._accepted)))}"
            )

    def common(self):
        return {k: self._options[k] for k in self.COMMON if k in self._options}
