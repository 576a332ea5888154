"""The public functions of ``tfq.data`` (re-exported by the package)."""

from __future__ import annotations

import numbers

import tensorflow as tf

from tfq.data import core, pipeline
from tfq.data.errors import DataError
from tfq.data.skip import SkipCounter, attach

_MEAN_DEFAULT = "per_pixel"


def _common_checks(seed, limit, holdout):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise DataError(f"seed must be an int; got {seed!r}")
    return pipeline._check_count(limit, "limit", 1), pipeline._check_count(holdout, "holdout", 0)


def info(name, data_dir=None, *, image_size=None, limit=None, holdout=0, download=False,
         **source_options):
    """What ``build_dataset`` with the same arguments would feed a model.

    Args:
      name: a name from ``names()`` or ``"tfds:<name>"``.
      data_dir: where the data is (see each source; some have a default).
      image_size: int or (H, W) fed to the model; None: the source's default
        (native size for small images, 224 for ImageNet-like ones).
      limit: examples per split after a class-balanced subset (see ``build_dataset``).
      holdout: training examples moved to the ``"holdout"`` split.
      download: tfds sources may download and prepare.
      **source_options: see the source modules (``label_mode``, ``layout``,
        ``val_labels``, ``synsets``, ``augment``, ``pad``, ``flip``, ``resize`` ...).

    Returns:
      ``DatasetInfo``.

    Raises:
      DataError: unknown name or option, or missing / malformed data.
    """
    limit, holdout = _common_checks(0, limit, holdout)
    source, common = pipeline.open_source(name, data_dir, download, **source_options)
    geometry = pipeline.resolve_geometry(source, image_size, common)
    return core.DatasetInfo(
        name=name,
        num_classes=len(source.class_names),
        image_shape=(*geometry.size, 3),
        class_names=list(source.class_names),
        split_sizes=pipeline.split_sizes(source, holdout=holdout, limit=limit),
        source=source.description,
    )


def build_dataset(name, split, *, data_dir=None, batch_size=128, training=False, seed=0,
                  deterministic=False, image_size=None, mean=_MEAN_DEFAULT, limit=None,
                  holdout=0, skip_corrupt=False, download=False, input_context=None,
                  drop_remainder=None, epoch=None, **source_options):
    """A batched, prefetched ``tf.data.Dataset`` of ``(images, labels)``.

    ``images``: float32 [B, H, W, 3] = pixel / 255 - mean, in [-1, 1]; ``labels``:
    int32 [B] class indices (``info(...).class_names`` order).

    Args:
      name: a name from ``names()`` or ``"tfds:<name>"``.
      split: ``"train"``, ``"test"`` (``"validation"`` for ImageNet; each stands in for
        the other where a source has only one), ``"holdout"`` (with ``holdout > 0``), or
        ``"unused"``: the training examples that ``holdout`` and ``limit`` both leave
        out, i.e. never seen by a run trained with the same seed, ``limit`` and
        ``holdout`` (needs ``limit``).
      data_dir: where the data is.
      batch_size: examples per batch (per replica under ``distributed_dataset``).
      training: shuffle and augment (random crops and flips; see ``tfq.data.preprocess``).
      seed: seeds shuffling, augmentation, ``limit`` and ``holdout``.
      deterministic: same order and same augmentation on every run with the same
        seed (and the same TF global seed); False lets parallel stages of a training
        pipeline deliver elements out of order, which is faster on uneven images.
        Evaluation pipelines (``training=False``) always keep the files' order, and
        ``limit``/``holdout`` subsets are deterministic either way.
      image_size: int or (H, W) fed to the model (None: the source's default).
      mean: ``"per_pixel"`` (the training split's per-pixel mean image, see
        ``pixel_mean``), ``"none"``, or an array (H, W, 3) in [0, 1] units.
      limit: keep a class-balanced subset of this many examples of the split (for
        ``"unused"``: the size of the training subset it leaves out).
      holdout: move a class-balanced subset of this many training examples from
        ``"train"`` into the split ``"holdout"``.
      skip_corrupt: skip images that cannot be decoded instead of failing; they are
        counted (``SkippedImagesReport``). True, or a ``SkipCounter`` to count into.
      download: tfds sources may download and prepare.
      input_context: a ``tf.distribute.InputContext``: shard the data for this input
        pipeline (``distributed_dataset`` passes it).
      drop_remainder: drop a last partial batch (default: when ``training``).
      epoch: None, or a scalar integer ``tf.Variable`` holding the number of the pass
        about to start: each pass of a training pipeline then takes its order and
        augmentation from ``(seed, epoch)`` alone, read when the pass starts, instead
        of from how many passes this dataset has made. Set it before each epoch
        (``tfq.train`` sets the run's global epoch), and a run resumed at an epoch
        boundary sees the very passes an uninterrupted run would have. In-memory,
        file and TFRecord sources (shard order, shuffle buffer and augmentation);
        tfds keys its buffer and augmentation, but its own file order still
        reshuffles per pass (tfds takes one fixed shuffle seed).
      **source_options: see ``info``; also ``shuffle_buffer`` (record streams, 4096).

    Returns:
      ``tf.data.Dataset``. Problems met only while decoding surface as
      ``tf.errors.OpError`` tagged for ``translate_errors``, which re-raises them as
      ``DataError``.

    Raises:
      DataError: unknown name, split or option, or missing / malformed data.
    """
    limit, holdout = _common_checks(seed, limit, holdout)
    if epoch is not None and not (isinstance(epoch, tf.Variable) and epoch.dtype.is_integer
                                  and epoch.shape.rank == 0):
        raise DataError(f"epoch must be None or a scalar integer tf.Variable; got {epoch!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise DataError(f"batch_size must be an int >= 1; got {batch_size!r}")
    source, common = pipeline.open_source(name, data_dir, download, **source_options)
    geometry = pipeline.resolve_geometry(source, image_size, common)
    records = pipeline.split_records(source, split, holdout=holdout, limit=limit, seed=int(seed))
    mean_array = pipeline._resolve_mean(mean, source, geometry, bool(skip_corrupt))
    counter = skip_corrupt if isinstance(skip_corrupt, SkipCounter) else (
        SkipCounter(f"{name}/{split}") if skip_corrupt else None)
    shuffle_buffer = pipeline._int_option(common, "shuffle_buffer",
                                          pipeline.DEFAULT_SHUFFLE_BUFFER, 1)
    ds = pipeline.make_pipeline(
        records, geometry, mean_array, batch_size=int(batch_size), training=bool(training),
        seed=int(seed), deterministic=bool(deterministic), counter=counter,
        input_context=input_context, drop_remainder=drop_remainder,
        shuffle_buffer=shuffle_buffer, epoch=epoch,
    )
    return attach(ds, [counter]) if counter is not None else ds


def pixel_mean(name, data_dir=None, *, image_size=None, max_images=pipeline.MAX_MEAN_IMAGES,
               download=False, skip_corrupt=False, **source_options):
    """The per-pixel mean image of the training split, as ``mean="per_pixel"`` uses it.

    In-memory sources (digits, idx files, CIFAR pickles) average every training image;
    the others a deterministic sample of up to ``max_images`` (seed 0), decoded at the
    evaluation geometry (ImageNet: resize + centre crop) and cached under
    ``~/.cache/tfq/means`` (``$TFQ_CACHE_DIR``), keyed by the source's path, split sizes
    and geometry; ``data_dir`` is never written to. ``limit`` and ``holdout`` do not
    change the mean: it is a property of the source.

    Returns:
      float32 array (H, W, 3) in [0, 1] units.
    """
    if isinstance(max_images, bool) or not isinstance(max_images, numbers.Integral) or max_images < 1:
        raise DataError(f"max_images must be an int >= 1; got {max_images!r}")
    source, common = pipeline.open_source(name, data_dir, download, **source_options)
    geometry = pipeline.resolve_geometry(source, image_size, common)
    return pipeline.compute_mean(source, geometry, max_images=int(max_images),
                                 skip_corrupt=bool(skip_corrupt))


def distributed_dataset(strategy, name, split, *, global_batch_size, **kwargs):
    """``build_dataset`` for ``strategy``: per-replica batches, sharded per input pipeline.

    Uses ``strategy.distribute_datasets_from_function``: each input pipeline builds
    its own dataset with ``batch_size = global_batch_size / replicas`` and its
    ``InputContext`` (files or examples sharded by pipeline). The per-pixel mean is
    computed once and shared. With ``skip_corrupt=True`` all pipelines count into one
    ``SkipCounter``, so ``SkippedImagesReport(dist_ds)`` works.

    Args:
      strategy: a ``tf.distribute.Strategy``.
      name, split: as ``build_dataset``.
      global_batch_size: examples per step over all replicas.
      **kwargs: ``build_dataset`` keyword arguments (not ``batch_size`` /
        ``input_context``).
    """
    for key in ("batch_size", "input_context"):
        if key in kwargs:
            raise DataError(f"distributed_dataset sets {key} itself; pass global_batch_size")
    mean = kwargs.get("mean", _MEAN_DEFAULT)
    if isinstance(mean, str) and mean == _MEAN_DEFAULT:
        mean_kwargs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_MEAN}
        mean_kwargs["skip_corrupt"] = bool(mean_kwargs.get("skip_corrupt", False))
        kwargs["mean"] = pixel_mean(name, **mean_kwargs)
    counter = None
    if kwargs.get("skip_corrupt"):
        counter = kwargs["skip_corrupt"] if isinstance(kwargs["skip_corrupt"], SkipCounter) \
            else SkipCounter(f"{name}/{split}")
        kwargs["skip_corrupt"] = counter

    def dataset_fn(input_context):
        batch = input_context.get_per_replica_batch_size(global_batch_size)
        return build_dataset(name, split, batch_size=batch, input_context=input_context, **kwargs)

    dist = strategy.distribute_datasets_from_function(dataset_fn)
    return attach(dist, [counter]) if counter is not None else dist


_NOT_FOR_MEAN = frozenset(
    ["training", "seed", "deterministic", "mean", "limit", "holdout", "drop_remainder"])
