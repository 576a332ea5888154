"""ImageNet (ILSVRC-2012): the "imagenet" source, from three layouts.

Detected in ``data_dir`` in this order (or chosen with ``layout=``):

1. ``jpeg``: ``train/<wnid>/*.JPEG`` and ``val/`` (or ``validation/``), either as
   class folders ``val/<wnid>/*.JPEG`` or flat ``val/*.JPEG`` with a labels file;
2. ``tfrecord``: ``train-NNNNN-of-01024`` / ``validation-NNNNN-of-00128`` shards
   written by TensorFlow models' ``build_imagenet_data.py`` (see ``tfq.data.tfrecord``);
3. ``tfds``: a prepared tensorflow-datasets ``imagenet2012/<version>/`` folder.

Splits: ``train`` and ``validation``; ``val`` and ``test`` are accepted for ``validation``
(tfds's unlabelled imagenet2012 ``test`` split is not offered).

Class indices follow the sorted wnids: the ``train/`` folder names for JPEG folders,
else the standard 1,000 ILSVRC-2012 wnids (shipped with tensorflow-datasets). Every
label read from a file is checked against them; an unknown wnid is an error.

Labels of a flat ``val/`` folder (option ``val_labels=PATH``, else the first found of
``LOC_val_solution.csv``, ``val_labels.csv``, ``val_labels.txt``,
``ILSVRC2012_validation_ground_truth.txt``,
``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` and
``validation_labels.txt`` in ``data_dir``), in one of three formats:

- CSV ``file,wnid`` (a header line is allowed; ``file`` with or without extension;
  only the first word of the second field is read, so Kaggle's ``LOC_val_solution.csv``
  works as is);
- the devkit's ``ILSVRC2012_validation_ground_truth.txt``: one ILSVRC2012_ID (1..1000)
  per line, line ``i`` for ``ILSVRC2012_val_{i:08d}.JPEG``. IDs are in the devkit's
  ``meta.mat`` order, which is not the sorted wnid order, so the devkit's
  ``data/meta.mat`` is required (found next to the ground-truth file or in
  ``data_dir/ILSVRC2012_devkit_t12/data/``), or ``synsets=PATH``: a text file with the
  1,000 wnids in ILSVRC2012_ID order;
- one wnid per line, line ``i`` for ``ILSVRC2012_val_{i:08d}.JPEG`` (tensorflow-datasets'
  ``validation_labels.txt``).

Every image in ``val/`` must have a label (labels of absent images are allowed, so a
subset of the validation set works). For TFRecords, ``synsets=PATH`` (or
``imagenet_lsvrc_2015_synsets.txt`` / ``synsets.txt`` in ``data_dir``) lists the class
names in label order, line ``L`` for ``image/class/label == L`` (wnids for ImageNet; any
names without spaces for other data written in this layout); default: the standard
sorted 1,000 wnids, which is what ``build_imagenet_data.py`` uses. Labels are remapped
to the sorted names when the file lists them in another order.

Training uses ``RESIZE_CROP`` (shorter side ``resize`` = 256 for 224 crops, scaled with
``image_size``; random crop and flip); evaluation the centre crop. ``augment="pad_crop"``
with ``image_size`` switches to the small-image geometry (e.g. for 32x32 data in
TFRecords).
"""

from __future__ import annotations

import functools
import os
import re

import numpy as np

from tfq.data import core, folder, matfile, tfds_source, tfrecord
from tfq.data.errors import DataError
from tfq.data.files import (IMAGE_EXTENSIONS, first_existing, is_image_name, listing,
                            read_bounded)

MAX_TEXT_BYTES = 64 << 20
# ILSVRC-2012 has 50,000 validation images; Kaggle's LOC_val_solution.csv as many lines.
MAX_TEXT_LINES = 2_000_000
_WNID = re.compile(r"^n[0-9]{8}$")
_ID = re.compile(r"^[0-9]{1,9}$")  # an ILSVRC2012_ID (1..1000; ASCII digits only)
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits at
_LABEL_FILES = (
    "LOC_val_solution.csv", "val_labels.csv", "val_labels.txt",
    "ILSVRC2012_validation_ground_truth.txt",
    os.path.join("ILSVRC2012_devkit_t12", "data", "ILSVRC2012_validation_ground_truth.txt"),
    "validation_labels.txt",
)
_TFRECORD_SYNSETS = ("imagenet_lsvrc_2015_synsets.txt", "synsets.txt")
_ALIASES = {"val": "validation", "test": "validation"}


@functools.lru_cache(maxsize=1)
def standard_wnids():
    """The 1,000 ILSVRC-2012 wnids, sorted (tensorflow-datasets' imagenet2012 labels.txt)."""
    import tensorflow_datasets as tfds

    path = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012", "labels.txt")
    return read_lines(path)


def read_lines(path):
    """Non-empty stripped lines of a text file of at most ``MAX_TEXT_BYTES`` and
    ``MAX_TEXT_LINES`` lines (counted before the text is split: a file of newlines
    would otherwise become tens of millions of strings)."""
    text = read_bounded(path, MAX_TEXT_BYTES, "labels file")
    try:
        text = text.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e})") from None
    breaks = sum(text.count(c) for c in _LINE_BREAKS) - text.count("\r\n")
    if breaks > MAX_TEXT_LINES:
        raise DataError(f"{path}: {breaks} lines is too many for a labels file "
                        f"({MAX_TEXT_LINES})")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_synsets(path, wnids_only=True):
    """Class names in ILSVRC2012_ID / label order, from a text file or the devkit's meta.mat.

    Args:
      path: a text file with one name per line, or the devkit's ``meta.mat``.
      wnids_only: every name must be a wnid (``nXXXXXXXX``); TFRecord shards of other
        datasets may use any names without spaces.
    """
    if path.endswith(".mat"):
        return _meta_mat(path)
    names = read_lines(path)
    pattern = _WNID if wnids_only else re.compile(r"^\S+$")
    bad = [n for n in names if not pattern.match(n)]
    if bad or not names:
        what = "one wnid (nXXXXXXXX)" if wnids_only else "one class name (no spaces)"
        raise DataError(f"{path}: expected {what} per line; found {bad[:1] or 'none'}")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: a class is listed twice")
    return names


MAX_META_BYTES = 16 << 20  # the devkit's meta.mat is about 2 MB
MAX_META_EXPANDED = 32 << 20  # with any compressed parts expanded


def _meta_mat(path):
    import io

    import scipy.io

    data = read_bounded(path, MAX_META_BYTES, "devkit meta.mat")
    # Every declared count is checked against the bytes first, compressed parts are
    # expanded with a limit, and SciPy then reads from memory.
    data = matfile.uncompressed(data, path, MAX_META_EXPANDED)
    try:
        synsets = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        ids = np.asarray(synsets["ILSVRC2012_ID"], dtype=np.int64).reshape(-1)
        wnids = [str(w) for w in np.asarray(synsets["WNID"]).reshape(-1)]
        children = np.asarray(synsets["num_children"], dtype=np.int64).reshape(-1)
    except Exception as e:
        raise DataError(f"{path}: not the ILSVRC-2012 devkit's meta.mat ({str(e)[:200]})") from None
    if not len(ids) == len(wnids) == len(children):
        raise DataError(f"{path}: synsets fields of different lengths")
    leaves = sorted((i, w) for i, w, c in zip(ids.tolist(), wnids, children.tolist()) if c == 0)
    if [i for i, _ in leaves] != list(range(1, len(leaves) + 1)):
        raise DataError(f"{path}: leaf synsets do not have ILSVRC2012_IDs 1..{len(leaves)}")
    bad = [w for _, w in leaves if not _WNID.match(w)]
    if bad or not leaves:
        raise DataError(f"{path}: leaf synsets must be wnids (nXXXXXXXX); found "
                        f"{bad[0][:40] if bad else 'none'}")
    return [w for _, w in leaves]


def _stem(name):
    return os.path.splitext(os.path.basename(name))[0]


def _val_name(i):
    return f"ILSVRC2012_val_{i:08d}"


def parse_val_labels(path, class_names, synsets_path=None):
    """Maps image stems to wnids from a validation labels file (any of the 3 formats)."""
    lines = read_lines(path)
    if not lines:
        raise DataError(f"{path}: empty labels file")
    known = set(class_names)
    if "," in lines[0] or "," in lines[-1]:
        return _parse_csv(path, lines, known)
    if all(_ID.match(line) for line in lines):
        order_path = synsets_path or first_existing([
            os.path.join(os.path.dirname(path), "meta.mat"),
            os.path.join(os.path.dirname(os.path.dirname(path)), "data", "meta.mat"),
        ])
        if order_path is None:
            raise DataError(
                f"{path}: ILSVRC2012 ground-truth IDs need the devkit's ID order: put "
                "ILSVRC2012_devkit_t12/data/meta.mat next to it or pass synsets=<meta.mat or "
                "a text file of wnids in ILSVRC2012_ID order>"
            )
        order = read_synsets(order_path)
        mapping = {}
        for i, line in enumerate(lines, 1):
            ident = int(line)
            if not 1 <= ident <= len(order):
                raise DataError(f"{path}: line {i}: ID {ident} is outside 1..{len(order)} "
                                f"(the IDs of {order_path})")
            mapping[_val_name(i)] = order[ident - 1]
        return _known(path, mapping, known)
    if all(_WNID.match(line) for line in lines):
        return _known(path, {_val_name(i): w for i, w in enumerate(lines, 1)}, known)
    raise DataError(
        f"{path}: unrecognised labels file: expected CSV lines 'file,wnid', one "
        "ILSVRC2012_ID per line (devkit ground truth) or one wnid per line"
    )


def _parse_csv(path, lines, known):
    mapping = {}
    for i, line in enumerate(lines, 1):
        fields = line.split(",", 1)
        wnid = fields[1].split()[0] if len(fields) == 2 and fields[1].split() else ""
        if i == 1 and wnid not in known and not _WNID.match(wnid):
            continue  # a header line
        if not wnid:
            raise DataError(f"{path}: line {i}: expected 'file,wnid', got {line[:80]!r}")
        stem = _stem(fields[0].strip())
        if stem in mapping:
            raise DataError(f"{path}: line {i}: {fields[0]!r} is labelled twice")
        mapping[stem] = (wnid, i)
    return _known(path, mapping, known)


def _known(path, mapping, known):
    for stem, value in mapping.items():
        wnid, line = value if isinstance(value, tuple) else (value, None)
        if wnid not in known:
            where = f"line {line}" if line else f"image {stem}"
            raise DataError(f"{path}: {where} names class {wnid!r}, which is not one of the "
                            f"{len(known)} classes")
    return {s: (v[0] if isinstance(v, tuple) else v) for s, v in mapping.items()}


def _flat_val(val_dir, class_names, labels_path, synsets_path):
    index = {c: i for i, c in enumerate(class_names)}
    mapping = parse_val_labels(labels_path, class_names, synsets_path)
    paths, labels = [], []
    for name, is_dir in listing(val_dir):
        path = os.path.join(val_dir, name)
        if is_dir or not is_image_name(name):
            raise DataError(f"{path}: expected only images in a flat validation folder "
                            f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        wnid = mapping.get(_stem(name))
        if wnid is None:
            raise DataError(f"{path}: no label for this image in {labels_path}")
        paths.append(path)
        labels.append(index[wnid])
    if not paths:
        raise DataError(f"{val_dir}: no images")
    return np.array(paths, dtype=object), np.array(labels, dtype=np.int32)


def _jpeg_source(name, data_dir, val_labels, synsets_path):
    train_dir = os.path.join(data_dir, "train")
    val_dir = first_existing([os.path.join(data_dir, "val"), os.path.join(data_dir, "validation")])
    has_train = os.path.isdir(train_dir)
    class_names = folder.subdirs(train_dir) if has_train else standard_wnids()
    tree = {}
    if has_train:
        tree["train"] = folder.scan_split(train_dir, class_names)
    if val_dir is not None:
        if folder.subdirs(val_dir):
            tree["validation"] = folder.scan_split(val_dir, class_names)
        else:
            labels_path = val_labels or first_existing(
                [os.path.join(data_dir, f) for f in _LABEL_FILES])
            if labels_path is None:
                raise DataError(
                    f"{val_dir}: flat validation folder but no labels file: pass val_labels=PATH "
                    f"or put one of {', '.join(_LABEL_FILES)} in {data_dir}"
                )
            tree["validation"] = _flat_val(val_dir, class_names, labels_path, synsets_path)
    source = folder.tree_source(name, f"imagenet JPEG folders at {data_dir}", data_dir,
                                class_names, tree)
    source.augment = core.Augment(core.RESIZE_CROP)
    source.aliases = dict(_ALIASES)
    return source


def _tfrecord_source(name, data_dir, synsets_path, files):
    synsets_path = synsets_path or first_existing(
        [os.path.join(data_dir, f) for f in _TFRECORD_SYNSETS])
    synsets = read_synsets(synsets_path, wnids_only=False) if synsets_path else standard_wnids()
    class_names = sorted(synsets)
    records = {s: tfrecord.stream(f, synsets, class_names, s) for s, f in files.items()}
    sizes = {s: len(r) for s, r in records.items()}
    return core.Source(
        name=name,
        description=f"imagenet TFRecord shards at {data_dir}",
        class_names=class_names,
        split_sizes=sizes,
        records=records.__getitem__,
        augment=core.Augment(core.RESIZE_CROP),
        aliases=dict(_ALIASES),
        cache_key=f"tfrecord:{os.path.realpath(data_dir)}:{sorted(sizes.items())}",
    )


def open_source(name, data_dir, download, options):
    """The "imagenet" source."""
    layout = options.pop("layout", "auto", ("auto", "jpeg", "tfrecord", "tfds"))
    val_labels = options.pop("val_labels")
    synsets_path = options.pop("synsets")
    if data_dir is None:
        raise DataError("imagenet: data_dir is required (JPEG folders, TFRecord shards or a "
                        "tfds data_dir)")
    if layout in ("auto", "jpeg") and (os.path.isdir(os.path.join(data_dir, "train"))
                                      or os.path.isdir(os.path.join(data_dir, "val"))
                                      or os.path.isdir(os.path.join(data_dir, "validation"))):
        return _jpeg_source(name, data_dir, val_labels, synsets_path)
    if layout in ("auto", "tfrecord"):
        files = {s: tfrecord.shards(data_dir, s) for s in ("train", "validation")}
        files = {s: f for s, f in files.items() if f}
        if files:
            return _tfrecord_source(name, data_dir, synsets_path, files)
    if layout in ("auto", "tfds") and (download or tfds_source.prepared_dir(data_dir, "imagenet2012")):
        source = tfds_source.open_tfds(name, "imagenet2012", data_dir, download, options, manual=True)
        # tfds's imagenet2012 "test" split has no labels: "test" means validation here too.
        source.split_sizes.pop("test", None)
        source.aliases.update(_ALIASES)
        return source
    raise DataError(
        f"{data_dir}: no ImageNet found{'' if layout == 'auto' else f' in layout {layout!r}'}; "
        "looked for train/<wnid>/*.JPEG and val/ (JPEG folders), train-NNNNN-of-NNNNN / "
        "validation-NNNNN-of-NNNNN (TFRecord shards of build_imagenet_data.py) and "
        "imagenet2012/<version>/ (a prepared tfds data_dir)"
    )
