"""``build_dataset`` and friends: one tf.data pipeline for every source.

Stages:

1. the records of the split, after ``holdout`` / ``limit`` (``tfq.data.select``);
2. in-memory arrays: sharding by the ``tf.distribute.InputContext``, shuffling when
   training, batching and gathering;
   files and record streams (``tfq.data.robust``): sharding, shuffling, then read +
   decode + per-element geometry in a parallel, order-preserving map in which no
   image is ever lost silently (an error naming the file, or with ``skip_corrupt`` a
   counted skip), and record problems (missing features, impossible labels) are
   errors whatever ``skip_corrupt`` says; then batching;
3. per batch: conversion to float, mean subtraction, padding/cropping and flips
   (vectorised, ``tfq.data.preprocess``), then prefetching.

Randomness (shuffles, crops, flips) is seeded from ``seed`` and tied to each element
or batch before any parallel stage, so a deterministic pipeline gives the same
batches on every run.
"""

from __future__ import annotations

import dataclasses
import numbers
import os

import numpy as np
import tensorflow as tf

from tfq.data import cifar, core, digits, folder, idx, imagenet, preprocess, robust, select
from tfq.data import tfds_source
from tfq.data.errors import DataError
from tfq.data.files import atomic_write, cache_path, load_mean
from tfq.data.skip import SkipCounter

_SOURCES = {
    "cifar10": cifar.open_source,
    "cifar100": cifar.open_source,
    "digits": digits.open_source,
    "fashion_mnist": idx.open_source,
    "folder": folder.open_source,
    "imagenet": imagenet.open_source,
    "mnist": idx.open_source,
}
TFDS_PREFIX = "tfds:"
MAX_MEAN_IMAGES = 10_000
DEFAULT_SHUFFLE_BUFFER = 4096
_MEAN_VERSION = 1
_BATCH_SEED_OFFSET = 1_000_003


# ----------------------------------------------------------------------------- sources


def names():
    """Dataset names accepted by ``build_dataset`` (plus any ``"tfds:<name>"``)."""
    return sorted(_SOURCES)


def check_name(name):
    """Raises ``DataError`` unless ``name`` is in ``names()`` or is ``"tfds:<name>"``."""
    if not isinstance(name, str) or not (
        name in _SOURCES or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX))
    ):
        raise DataError(
            f"unknown dataset {name!r}; known: {', '.join(names())}, or tfds:<name> for a "
            "tensorflow-datasets image-classification dataset"
        )


def open_source(name, data_dir=None, download=False, **source_options):
    """Finds the data of ``name``: returns ``(Source, common options)``.

    Raises:
      DataError: unknown name or option, or no usable data.
    """
    check_name(name)
    opener = tfds_source.open_source if name.startswith(TFDS_PREFIX) else _SOURCES[name]
    options = core.Options(name, source_options)
    source = opener(name, None if data_dir is None else str(data_dir), bool(download), options)
    options.finish()
    return source, options.common()


def _image_size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, numbers.Integral):
        image_size = (image_size, image_size)
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"image_size must be an int or (height, width); got {image_size!r}")
    return size


def _int_option(common, key, default, minimum):
    value = common.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise DataError(f"option {key} must be an int >= {minimum}; got {value!r}")
    return int(value)


def resolve_geometry(source, image_size, common):
    """The ``Geometry`` of a pipeline: the source's defaults, overridden by options."""
    size = _image_size(image_size)
    aug = source.augment
    mode = common.get("augment", aug.mode)
    if mode not in core.AUGMENTS:
        raise DataError(f"option augment={mode!r} is not one of {core.AUGMENTS}")
    flip = common.get("flip", aug.flip)
    if not isinstance(flip, bool):
        raise DataError(f"option flip must be True or False; got {flip!r}")
    if mode == core.PAD_CROP:
        native = aug.native_size if aug.mode == core.PAD_CROP else None
        size = size or native
        if size is None:
            raise DataError(f"{source.description}: images vary in size: pass image_size "
                            "to use augment='pad_crop'")
        default_pad = round(aug.pad * min(size) / min(native)) if native else max(1, round(min(size) / 8))
        pad = _int_option(common, "pad", default_pad, 0)
        return core.Geometry(core.PAD_CROP, size, pad=pad, flip=flip)
    size = size or (core.DEFAULT_LARGE_SIZE, core.DEFAULT_LARGE_SIZE)
    resize = _int_option(common, "resize", round(min(size) * core.RESIZE_RATIO), max(size))
    return core.Geometry(core.RESIZE_CROP, size, resize=resize, flip=flip)


# ----------------------------------------------------------------------------- splits


def _check_count(value, what, minimum):
    if value is None and what == "limit":
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise DataError(f"{what} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _stream_subset(records, quota, keep, size):
    """A stream restricted to (``keep``) or deprived of the first ``quota[c]`` records per class."""

    def open_(plan):
        fixed = dataclasses.replace(plan, shuffle=False, fixed_order_seed=plan.seed,
                                    input_context=None)
        ds, _ = records.open(fixed)
        return select.stream_select(ds, quota, keep=keep), None

    return core.StreamRecords(open=open_, size=size, origin=records.origin, selected=True)


def _take(records, n, num_classes, seed, purpose, keep=True):
    """A deterministic class-balanced subset of ``n`` records (or its complement)."""
    n = min(n, len(records))
    if isinstance(records, core.StreamRecords):
        quota = select.stream_quotas(n, num_classes, seed, purpose)
        return _stream_subset(records, quota, keep, n if keep else len(records) - n)
    chosen = select.balanced_subset(records.labels, n, num_classes, seed, purpose)
    if not keep:
        chosen = np.setdiff1d(np.arange(len(records)), chosen)
    return records.subset(chosen)


UNUSED = "unused"


def split_records(source, split, *, holdout=0, limit=None, seed=0):
    """The records of ``split`` after ``holdout`` and ``limit``.

    ``holdout=N`` moves a class-balanced subset of N training examples into the split
    ``"holdout"``; ``limit=N`` then keeps a class-balanced subset of N examples of the
    requested split. Both are drawn from ``seed`` alone. Split ``"unused"`` is the
    training examples in neither subset: what a run on ``limit`` examples never saw,
    a validation set as large as the data allows (here ``limit`` names the training
    subset it leaves out, not a size for the split).

    In-memory arrays and file lists get exactly ``min(N, size)`` examples, as evenly
    spread over the classes as their sizes allow. Record streams (TFRecord, tfds), whose
    labels are only known once read, take the first ``N / classes`` records of each class
    in a fixed order drawn from the seed (shards in a seeded order, read one after
    another), so they can hold fewer than N when a class has fewer records than its
    share; such pipelines are also reshuffled only within ``shuffle_buffer``.
    """
    k = len(source.class_names)
    if split == UNUSED:
        if limit is None:
            raise DataError(f"split {UNUSED!r} is the training examples left out by `limit` "
                            "(and `holdout`): it needs limit")
        # the complement, within what "train" leaves after the holdout, of its limit subset
        records = _take(split_records(source, "train", holdout=holdout, seed=seed), limit, k,
                        seed, select.LIMIT, keep=False)
        if not len(records):
            raise DataError(f"split {UNUSED!r} is empty: limit={limit} (with holdout={holdout}) "
                            "takes every training example")
        return records
    if split == "holdout":
        if holdout <= 0:
            raise DataError("split 'holdout' needs holdout > 0")
        records = _take(source.records(source.canonical_split("train")), holdout, k, seed,
                        select.HOLDOUT)
    else:
        canonical = source.canonical_split(split)
        records = source.records(canonical)
        if holdout > 0 and canonical == source.canonical_split("train"):
            records = _take(records, holdout, k, seed, select.HOLDOUT, keep=False)
    if limit is not None:
        records = _take(records, limit, k, seed, select.LIMIT)
    return records


def split_sizes(source, *, holdout=0, limit=None):
    """Examples per split after ``holdout`` and ``limit`` (what ``split_records`` gives),
    with ``"unused"`` when ``limit`` leaves training examples out. Record streams may
    hold fewer than ``limit`` when classes run short (see ``split_records``)."""
    sizes = dict(source.split_sizes)
    if holdout > 0:
        train = source.canonical_split("train")
        taken = min(holdout, sizes[train])
        sizes[train] -= taken
        sizes["holdout"] = taken
    if limit is not None:
        left_out = 0
        if "train" in sizes or "train" in source.aliases:
            train = source.canonical_split("train")
            left_out = sizes[train] - min(limit, sizes[train])
        sizes = {s: min(n, limit) for s, n in sizes.items()}
        if left_out:
            sizes[UNUSED] = left_out
    return sizes


# ----------------------------------------------------------------------------- batches


def _shard(ds, input_context):
    if input_context is not None and input_context.num_input_pipelines > 1:
        return ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return ds


def _batches(records, geometry, *, batch_size, training, seed, deterministic, counter,
             input_context, drop_remainder, shuffle_buffer, epoch):
    """A dataset of (uint8 [B, h, w, c], int32 [B]) batches."""
    if isinstance(records, core.ArrayRecords):
        n = len(records)
        images = tf.constant(records.images)
        labels = tf.constant(records.labels, tf.int32)
        ds = _shard(tf.data.Dataset.range(n), input_context)
        if training and epoch is not None:
            # A permutation drawn from the pass's seed alone, as for files.
            mine = list(ds.batch(max(n, 1)).as_numpy_iterator())
            mine = tf.constant(mine[0] if mine else np.zeros([0], np.int64))
            ds = robust.shuffled(mine, seed, epoch)
        elif training:
            ds = ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        return ds.map(lambda i: (tf.gather(images, i), tf.gather(labels, i)),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if isinstance(records, core.FileRecords):
        ds, expected = robust.files(records, geometry, training=training, seed=seed,
                                    input_context=input_context, counter=counter, epoch=epoch)
    else:
        ds, expected = robust.streams(records, geometry, training=training, seed=seed,
                                      deterministic=deterministic, input_context=input_context,
                                      shuffle_buffer=shuffle_buffer, counter=counter,
                                      epoch=epoch)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if counter is None and expected is not None:
        # Nothing can be dropped silently, so the batch count is known: Keras shows
        # progress bars with totals and never warns about running out of data.
        batches = expected // batch_size if drop_remainder else -(-expected // batch_size)
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    return ds


def make_pipeline(records, geometry, mean, *, batch_size, training, seed=0, deterministic=False,
                  counter=None, input_context=None, drop_remainder=None,
                  shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, epoch=None):
    """The full pipeline over ``records`` (see ``build_dataset``)."""
    drop_remainder = training if drop_remainder is None else bool(drop_remainder)
    # Evaluation always keeps the listing order: predictions line up with files.
    deterministic = bool(deterministic) or not training
    ds = _batches(records, geometry, batch_size=batch_size, training=training, seed=seed,
                  deterministic=deterministic, counter=counter, input_context=input_context,
                  drop_remainder=drop_remainder, shuffle_buffer=shuffle_buffer, epoch=epoch)
    mean_t = None if mean is None else tf.constant(mean, tf.float32)
    if training:
        randoms = robust.pass_randoms(seed + _BATCH_SEED_OFFSET, epoch)
        ds = tf.data.Dataset.zip(ds, randoms).map(
            lambda batch, r: (preprocess.finish_batch(batch[0], geometry, mean_t, True,
                                                      tf.stack([r, tf.constant(0, tf.int64)])),
                              batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    else:
        ds = ds.map(lambda x, y: (preprocess.finish_batch(x, geometry, mean_t, False), y),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


# ----------------------------------------------------------------------------- mean


def _mean_sample(records, max_images):
    """Up to ``max_images`` records for the mean, chosen deterministically (seed 0)."""
    if isinstance(records, core.ArrayRecords) or len(records) <= max_images:
        return records
    if isinstance(records, core.FileRecords):
        chosen = np.sort(select.rng(0, select.LIMIT).choice(len(records), max_images, replace=False))
        return records.subset(chosen)

    def open_(plan):
        ds, _ = records.open(dataclasses.replace(plan, shuffle=False, input_context=None))
        return ds.take(max_images), None

    return core.StreamRecords(open=open_, size=max_images, origin=records.origin)


def compute_mean(source, geometry, *, max_images=MAX_MEAN_IMAGES, skip_corrupt=False):
    """Per-pixel mean image (H, W, 3) float32 in [0, 1] units of the training split.

    In-memory sources use every training image; others a deterministic sample of up
    to ``max_images``, cached under ``tfq.data.files.cache_dir()`` by source and geometry.
    """
    train = source.records(source.canonical_split("train")) if (
        "train" in source.split_sizes or "train" in source.aliases) else None
    if train is None:
        raise DataError(f"{source.description}: no train split to compute a mean from; pass "
                        "mean='none' or a mean array")
    key = None
    if source.cache_key is not None:
        key = [source.cache_key, dataclasses.asdict(geometry), int(max_images), _MEAN_VERSION]
        path = cache_path("means", key, ".npy")
        cached = load_mean(path, (*geometry.size, 3))
        if cached is not None:
            return cached
    sample = _mean_sample(train, max_images)
    counter = SkipCounter("mean") if skip_corrupt else None
    ds = make_pipeline(sample, dataclasses.replace(geometry, flip=False), None, batch_size=256,
                       training=False, counter=counter)
    total, count = np.zeros((*geometry.size, 3), np.float64), 0
    for x, _ in ds:
        total += x.numpy().sum(axis=0, dtype=np.float64)
        count += x.shape[0]
    if count == 0:
        raise DataError(f"{source.description}: no readable training images for the mean")
    mean = (total / count).astype(np.float32)
    if key is not None:
        atomic_write(path, lambda f: np.save(f, mean))
    return mean


def _resolve_mean(mean, source, geometry, skip_corrupt):
    shape = (*geometry.size, 3)
    if isinstance(mean, str):
        if mean == "per_pixel":
            return compute_mean(source, geometry, skip_corrupt=skip_corrupt)
        if mean == "none":
            return None
    elif mean is None:
        return None
    else:
        array = np.asarray(mean, dtype=np.float32)
        if array.shape != shape:
            raise DataError(f"mean has shape {array.shape}; this pipeline feeds {shape} images")
        if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
            raise DataError("mean must be finite and in [0, 1] units (pixel / 255)")
        return array
    raise DataError(f"mean must be 'per_pixel', 'none' or an array of shape {shape}; got {mean!r}")
