"""CIFAR-10 and CIFAR-100: "cifar10" and "cifar100".

Three layouts are detected, in this order, in ``data_dir`` (default: look in
``~/.keras/datasets`` and then in tfds's data dir):

1. the original python pickles: ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
   or ``cifar-100-python/{train,test,meta}`` (or ``data_dir`` being that folder);
2. class folders ``train/<class>/*.{jpg,jpeg,png}`` and ``test/<class>/...`` whose
   names must be exactly the dataset's classes;
3. a prepared tensorflow-datasets dir (``cifar10/<version>/`` or ``cifar100/<version>/``).

Pass ``layout="pickle" | "folder" | "tfds"`` to choose one; with ``download=True`` and
nothing found, tfds downloads and prepares the dataset into ``data_dir``.
CIFAR-100 takes ``label_mode="fine"`` (100 classes, default) or ``"coarse"`` (20).

Class indices follow the sorted class names, which is also CIFAR's own label order
(the pickles' label numbers are remapped by name should a meta file list them in
another order). Pickles are read with the restricted unpickler of
``tfq.data.safe_pickle`` and checked against the layout: a uint8 ``data`` array of
N x 3072 bytes (3 x 32 x 32, channel-major), N labels in range, and meta names.
"""

from __future__ import annotations

import os

import numpy as np

from tfq.data import core, folder, safe_pickle, tfds_source
from tfq.data.errors import DataError
from tfq.data.files import FileMemo

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
CIFAR100_FINE = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest",
    "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower",
    "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear",
    "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit",
    "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower",
    "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train",
    "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]
CIFAR100_COARSE = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
]
IMAGE_BYTES = 3 * 32 * 32

# Per dataset: pickle folder, train files, test file, meta file, meta key, label key.
_PICKLES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", {"fine": "label_names"}, {"fine": "labels"}),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta",
                 {"fine": "fine_label_names", "coarse": "coarse_label_names"},
                 {"fine": "fine_labels", "coarse": "coarse_labels"}),
}
_memo = FileMemo(maxsize=4)


def expected_classes(name, label_mode):
    if name == "cifar10":
        return CIFAR10_CLASSES
    return CIFAR100_FINE if label_mode == "fine" else CIFAR100_COARSE


def _field(obj, key, path):
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict (CIFAR layout), found {type(obj).__name__}")
    for k in (key.encode(), key):
        if k in obj:
            return obj[k]
    keys = sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in obj)
    shown = ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")
    raise DataError(f"{path}: no {key!r} entry (found: {shown[:400]})")


def _names(meta_path, key, count):
    names = _field(safe_pickle.load(meta_path), key, meta_path)
    if not isinstance(names, list) or len(names) != count or not all(
        isinstance(n, (bytes, str)) and 0 < len(n) <= 256 for n in names
    ):
        raise DataError(f"{meta_path}: {key!r} must be a list of {count} names")
    try:
        names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    except UnicodeDecodeError as e:
        raise DataError(f"{meta_path}: {key!r} holds a name that is not UTF-8 ({e})") from None
    if len(set(names)) != count:
        raise DataError(f"{meta_path}: {key!r} names a class twice")
    return names


def _labels(labels, count, path, label_key):
    """Labels as int64 [count]: a list of ints or a 1-D integer array, nothing else.

    Checked element by element before NumPy sees them: a list of (shared, nested)
    lists would otherwise expand into a huge array.
    """
    if isinstance(labels, np.ndarray):
        ok = labels.ndim == 1 and labels.dtype.kind in "iu"
    else:
        ok = isinstance(labels, list) and all(type(v) is int for v in labels)
    if not ok:
        raise DataError(f"{path}: {label_key!r} must be a list of ints or a 1-D integer array "
                        f"(found {type(labels).__name__})")
    if len(labels) != count:
        raise DataError(f"{path}: {label_key!r} has {len(labels)} entries for {count} images")
    try:
        return np.asarray(labels, dtype=np.int64)
    except OverflowError:
        raise DataError(f"{path}: {label_key!r} holds an integer out of range") from None


def _batch(path, label_key, num_classes):
    """(images uint8 [N, 32, 32, 3], labels int32 [N]) of one pickle, checked."""
    obj = safe_pickle.load(path)
    data = _field(obj, "data", path)
    labels = _field(obj, label_key, path)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == IMAGE_BYTES):
        shape = getattr(data, "shape", type(data).__name__)
        raise DataError(
            f"{path}: 'data' is {shape} {getattr(data, 'dtype', '')}, expected uint8 "
            f"[N, {IMAGE_BYTES}] (32x32x3 bytes per image)"
        )
    labels = _labels(labels, len(data), path, label_key)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: {label_key!r} holds {int(labels.min())}..{int(labels.max())}, "
            f"expected 0..{num_classes - 1}"
        )
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def load_pickles(name, root, label_mode):
    """``{"train": ArrayRecords, "test": ArrayRecords}``, class names (sorted)."""
    _, train_files, test_file, meta_file, meta_keys, label_keys = _PICKLES[name]
    expected = expected_classes(name, label_mode)
    paths = [os.path.join(root, f) for f in train_files + [test_file, meta_file]]
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"{p}: missing (a {name} pickle folder holds "
                            f"{', '.join(train_files + [test_file, meta_file])})")

    def compute():
        names = _names(paths[-1], meta_keys[label_mode], len(expected))
        # Indices follow sorted names in every layout: remap the file's numbering.
        remap = np.argsort(np.argsort(names)).astype(np.int32)
        splits = {}
        for split, files in (("train", paths[:-2]), ("test", [paths[-2]])):
            parts = [_batch(p, label_keys[label_mode], len(names)) for p in files]
            images = np.concatenate([p[0] for p in parts])
            labels = remap[np.concatenate([p[1] for p in parts])]
            splits[split] = core.ArrayRecords(images, labels, files[0])
        return sorted(names), splits

    return _memo.get(paths, compute, variant=label_mode)


def _pickle_root(name, d):
    folder_name, train_files = _PICKLES[name][:2]
    for root in (os.path.join(d, folder_name), d):
        if os.path.isfile(os.path.join(root, train_files[0])):
            return root
    return None


def _search_dirs(data_dir):
    if data_dir is not None:
        return [data_dir]
    tfds_dir = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    return [os.path.expanduser("~/.keras/datasets"), tfds_dir]


def _detect(name, dirs, layout):
    """(layout, path) of the first layout found."""
    for d in dirs:
        checks = {
            "pickle": lambda: _pickle_root(name, d),
            "folder": lambda: d if os.path.isdir(os.path.join(d, "train")) else None,
            "tfds": lambda: d if tfds_source.prepared_dir(d, name) else None,
        }
        for kind, check in checks.items():
            if layout in ("auto", kind):
                found = check()
                if found:
                    return kind, found
    return None, None


def _looked_for(name, dirs):
    folder_name = _PICKLES[name][0]
    return "; ".join(
        f"{d}/{folder_name}/ (pickles), {d}/train/<class>/ (class folders), "
        f"{d}/{name}/<version>/ (tfds)" for d in dirs
    )


def open_source(name, data_dir, download, options):
    """The "cifar10" / "cifar100" sources."""
    label_mode = options.pop("label_mode", "fine", ("fine", "coarse")) if name == "cifar100" else "fine"
    layout = options.pop("layout", "auto", ("auto", "pickle", "folder", "tfds"))
    dirs = _search_dirs(data_dir)
    kind, path = _detect(name, dirs, layout)
    if kind is None and download and layout in ("auto", "tfds"):
        kind, path = "tfds", data_dir
    if kind is None:
        raise DataError(f"{name}: no {layout if layout != 'auto' else ''} dataset found; "
                        f"looked for {_looked_for(name, dirs)}")
    expected = expected_classes(name, label_mode)
    if kind == "tfds":
        label_key = "coarse_label" if label_mode == "coarse" else "label"
        return tfds_source.open_tfds(name, name, path, download, options, label_key=label_key)
    if kind == "folder":
        class_names, tree = folder.scan_tree(path, expected_classes=expected)
        return folder.tree_source(name, f"{name} class folders at {path}", path, class_names, tree)
    class_names, splits = load_pickles(name, path, label_mode)
    return core.Source(
        name=name,
        description=f"{name} pickles at {path}",
        class_names=class_names,
        split_sizes={s: len(r) for s, r in splits.items()},
        records=splits.__getitem__,
        augment=core.Augment(core.PAD_CROP, native_size=(32, 32), pad=4, flip=True),
        aliases={"validation": "test"},
    )
