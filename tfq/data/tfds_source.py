"""tensorflow-datasets sources: ``"tfds:<name>"`` and the tfds layouts of cifar/imagenet.

Any tfds image-classification dataset works: the image is the first element of the
dataset's ``supervised_keys`` (or its first ``Image`` feature), the label the second
(or ``label``), a ``ClassLabel``; override with the ``image_key`` / ``label_key``
options. Class indices are tfds's own (``ClassLabel.names`` order; for cifar10,
cifar100 and imagenet2012 this is the sorted order of the names, as everywhere else
in tfq.data). Splits are tfds's; ``validation`` and ``test`` stand in for each other
when only one exists.

Nothing is downloaded unless ``download=True``; a dataset that is not prepared in
``data_dir`` (default: tfds's, ``~/tensorflow_datasets``) raises ``DataError`` saying
how to prepare it. Images are read still encoded (``SkipDecoding``) and decoded by
the pipeline, so corrupt ones are handled like any other source's.
"""

from __future__ import annotations

import glob
import os

import tensorflow as tf

from tfq.data import core
from tfq.data.errors import DataError

# Character sets whose meaning changes when mirrored: never flipped.
NO_FLIP = frozenset(["mnist", "emnist", "kmnist", "binarized_mnist", "svhn_cropped", "omniglot"])
_PROBE_SPLITS = ("train", "test", "validation")


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def prepared_dir(data_dir, tfds_name):
    """The version folder of a prepared ``tfds_name`` under ``data_dir``, or None."""
    found = sorted(glob.glob(os.path.join(data_dir, tfds_name, "*", "dataset_info.json")))
    return os.path.dirname(found[-1]) if found else None


def _not_prepared(tfds_name, data_dir, manual):
    where = data_dir or "tfds's default data_dir (~/tensorflow_datasets)"
    manual_note = (
        f" {tfds_name} needs the original archives first: put them in "
        f"{os.path.join(data_dir or '~/tensorflow_datasets', 'downloads', 'manual')} "
        "(or pass manual_dir=...)."
        if manual else ""
    )
    return DataError(
        f"{where}: tfds dataset {tfds_name!r} is not prepared there. Prepare it with "
        f"`tfds build {tfds_name}" + (f" --data_dir={data_dir}" if data_dir else "")
        + "` on a machine with internet access, or pass download=True (--download)."
        + manual_note
    )


def _builder(tfds_name, data_dir, download, manual_dir):
    tfds = _tfds()
    try:
        b = tfds.builder(tfds_name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for unknown names
        raise DataError(f"tfds:{tfds_name}: no such tensorflow-datasets dataset ({e})") from None
    if download:
        config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        b.download_and_prepare(download_config=config)
    return b


def _keys(b, image_key, label_key):
    tfds = _tfds()
    features = b.info.features
    supervised = b.info.supervised_keys or ()
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    image_key = image_key or (supervised[0] if supervised and supervised[0] in images else
                              images[0] if images else None)
    label_key = label_key or (supervised[1] if len(supervised) > 1 else "label")
    if image_key not in images:
        raise DataError(f"tfds:{b.name}: no image feature {image_key!r} (image features: {images})")
    label = features[label_key] if label_key in features.keys() else None
    if not isinstance(label, tfds.features.ClassLabel):
        raise DataError(f"tfds:{b.name}: {label_key!r} is not a ClassLabel feature "
                        f"(features: {list(features.keys())})")
    return image_key, label_key


def _as_dataset(b, split, data_dir, manual, **kwargs):
    try:
        return b.as_dataset(split=split, **kwargs)
    except AssertionError:
        raise _not_prepared(b.name, data_dir, manual) from None


def _split_sizes(b, data_dir, manual):
    sizes = {s: info.num_examples for s, info in b.info.splits.items()}
    if sizes:
        return sizes
    # No split metadata (a mocked dataset): ask the datasets themselves.
    for s in _PROBE_SPLITS:
        n = int(_as_dataset(b, s, data_dir, manual).cardinality())
        if n >= 0:
            sizes[s] = n
    return sizes


def _augment(tfds_name, shape):
    h, w = shape[:2]
    if h and w and max(h, w) <= core.SMALL_MAX_SIZE:
        return core.Augment(core.PAD_CROP, native_size=(h, w), pad=max(1, round(min(h, w) / 8)),
                            flip=tfds_name.split("/")[0] not in NO_FLIP)
    return core.Augment(core.RESIZE_CROP)


def open_tfds(name, tfds_name, data_dir, download, options, *, label_key=None, manual=False):
    """A ``Source`` reading a tfds dataset.

    Args:
      name: the tfq dataset name (for messages and DatasetInfo).
      tfds_name: the tfds name, e.g. ``"cifar100"`` or ``"imagenet2012"``.
      data_dir: tfds data_dir (None: tfds's default).
      download: allow downloading and preparing.
      options: ``core.Options``; reads ``image_key``, ``label_key``, ``manual_dir``.
      label_key: default label feature (cifar100's coarse labels: ``coarse_label``).
      manual: the dataset needs manually downloaded archives (imagenet2012).
    """
    tfds = _tfds()
    image_key = options.pop("image_key")
    label_key = options.pop("label_key", label_key)
    manual_dir = options.pop("manual_dir")
    b = _builder(tfds_name, data_dir, download, manual_dir)
    image_key, label_key = _keys(b, image_key, label_key)
    sizes = _split_sizes(b, data_dir, manual)
    label_feature = b.info.features[label_key]
    num_classes = label_feature.num_classes
    where = b.data_dir

    def records(split):
        def open_(plan):
            fixed = plan.fixed_order_seed is not None
            opts = tf.data.Options()
            opts.deterministic = plan.deterministic or fixed
            # plan.epoch is not used: tfds's file shuffle takes one seed when built, so
            # its file order reshuffles per pass (the pipeline keys the buffer itself).
            read_config = tfds.ReadConfig(
                shuffle_seed=plan.fixed_order_seed if fixed else plan.seed,
                shuffle_reshuffle_each_iteration=not fixed,
                add_tfds_id=True,
                input_context=plan.input_context,
                options=opts,
            )
            ds = _as_dataset(
                b, split, data_dir, manual, shuffle_files=plan.shuffle or fixed, read_config=read_config,
                decoders={image_key: tfds.decode.SkipDecoding()},
            )
            ds = ds.map(lambda ex: _element(ex, image_key, label_key, num_classes, where),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=opts.deterministic)
            sharded = plan.input_context is not None and plan.input_context.num_input_pipelines > 1
            return ds, None if sharded else sizes[split]

        return core.StreamRecords(open=open_, size=sizes[split], origin=f"{where} ({split})")

    shape = b.info.features[image_key].shape
    return core.Source(
        name=name,
        description=f"tfds {b.info.full_name} at {where}",
        class_names=list(label_feature.names),
        split_sizes=sizes,
        records=records,
        augment=_augment(tfds_name, shape),
        aliases=_aliases(sizes),
        cache_key=f"tfds:{b.info.full_name}:{os.path.realpath(str(where))}:{sorted(sizes.items())}",
    )


def _aliases(sizes):
    if "test" in sizes and "validation" not in sizes:
        return {"validation": "test"}
    if "validation" in sizes and "test" not in sizes:
        return {"test": "validation"}
    return {}


def _element(ex, image_key, label_key, num_classes, where):
    label = tf.cast(ex[label_key], tf.int32)
    problem = tf.cond(
        (label < 0) | (label >= num_classes),
        lambda: tf.strings.join([label_key, " ", tf.strings.as_string(label),
                                 f" is outside 0..{num_classes - 1}"]),
        lambda: tf.constant(""),
    )
    return {
        "payload": ex[image_key],
        "label": label,
        "origin": tf.strings.join([str(where), "/", ex["tfds_id"]]),
        "index": tf.constant(-1, tf.int64),
        "problem": problem,
    }


def open_source(name, data_dir, download, options):
    """The "tfds:<name>" source."""
    return open_tfds(name, name.split(":", 1)[1], data_dir, download, options)
