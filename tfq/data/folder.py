"""Class-folder layouts: ``root/<split>/<class>/*.{jpg,jpeg,png}`` (the "folder" source).

Class indices follow the sorted class-folder names of the ``train`` split (or of the
first split when there is no ``train``); the class folders of every other split must be
among them. Files are listed in sorted order. A folder that is missing or empty, a
class folder with no images, a file that is not an image (by extension: .jpg, .jpeg,
.png in any case), or an unknown class folder raises ``DataError`` naming it. Hidden
files and ``Thumbs.db`` / ``desktop.ini`` are ignored.

The real CIFAR-10 tarball (``shared/data/cifar10-jpeg.tar.gz``) has this layout once
extracted (``train/<class>/NNNN.jpg``, ``test/<class>/NNNN.jpg``).
"""

from __future__ import annotations

import os

import numpy as np

from tfq.data import core
from tfq.data.errors import DataError
from tfq.data.files import IMAGE_EXTENSIONS, is_image_name, listing, subdirs

# Requested split -> the folders tried, in order, when it is not present itself.
_SPLIT_ALIASES = {
    "validation": ("val", "valid", "test"),
    "val": ("validation", "valid", "test"),
    "test": ("validation", "val", "valid"),
}


def split_aliases(splits):
    """Alias -> present split, for the validation/val/test names absent from ``splits``."""
    aliases = {}
    for name, targets in _SPLIT_ALIASES.items():
        if name not in splits:
            present = [t for t in targets if t in splits]
            if present:
                aliases[name] = present[0]
    return aliases


def class_files(class_dir):
    """Sorted image files of one class folder.

    Raises:
      DataError: the folder holds a non-image file or a sub-folder, or no image.
    """
    files = []
    for name, is_dir in listing(class_dir):
        path = os.path.join(class_dir, name)
        if is_dir:
            raise DataError(f"{path}: unexpected folder inside a class folder")
        if not is_image_name(name):
            raise DataError(
                f"{path}: not an image file (accepted extensions: {', '.join(IMAGE_EXTENSIONS)})"
            )
        files.append(path)
    if not files:
        raise DataError(f"{class_dir}: class folder has no images")
    return files


def scan_split(split_dir, class_names):
    """Lists ``split_dir/<class>/*`` against the known ``class_names``.

    Returns:
      ``FileRecords``-ready ``(paths, labels)``: an object array and an int32 array.

    Raises:
      DataError: no class folders, an unknown class folder, or a stray file.
    """
    index = {c: i for i, c in enumerate(class_names)}
    paths, labels = [], []
    entries = listing(split_dir)
    for name, is_dir in entries:
        if not is_dir:
            raise DataError(
                f"{os.path.join(split_dir, name)}: file outside a class folder "
                f"(expected {split_dir}/<class>/<image>)"
            )
    classes = [n for n, is_dir in entries if is_dir]
    if not classes:
        raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    for c in classes:
        if c not in index:
            raise DataError(
                f"{os.path.join(split_dir, c)}: class folder {c!r} is not one of the "
                f"{len(class_names)} known classes ({_preview(class_names)})"
            )
        files = class_files(os.path.join(split_dir, c))
        paths.extend(files)
        labels.extend([index[c]] * len(files))
    return np.array(paths, dtype=object), np.array(labels, dtype=np.int32)


def _preview(names, n=5):
    shown = ", ".join(names[:n])
    return shown + (", ..." if len(names) > n else "")


def scan_tree(root, expected_classes=None):
    """Lists every split of ``root/<split>/<class>/*``.

    Args:
      root: the dataset folder.
      expected_classes: when given, the class folders must be exactly these (CIFAR).

    Returns:
      ``(class_names, {split: (paths, labels)})``.
    """
    splits = subdirs(root)
    if not splits:
        raise DataError(f"{root}: no split folders (expected {root}/<split>/<class>/<image>)")
    reference = "train" if "train" in splits else splits[0]
    class_names = subdirs(os.path.join(root, reference))
    if expected_classes is not None and sorted(expected_classes) != class_names:
        missing = sorted(set(expected_classes) - set(class_names))
        extra = sorted(set(class_names) - set(expected_classes))
        raise DataError(
            f"{os.path.join(root, reference)}: class folders do not match the dataset's "
            f"{len(expected_classes)} classes (missing: {_preview(missing) or 'none'}; "
            f"unexpected: {_preview(extra) or 'none'})"
        )
    tree = {s: scan_split(os.path.join(root, s), class_names) for s in splits}
    return class_names, tree


def probe_size(paths, tries=20):
    """(H, W) of the first readable image among ``paths`` (header only, via Pillow)."""
    from PIL import Image

    for path in paths[:tries]:
        try:
            with Image.open(path) as im:
                w, h = im.size
            return h, w
        except Exception:  # a corrupt file: try the next one
            continue
    raise DataError(f"{paths[0]}: none of the first {tries} images of the split can be read")


def augment_for(size):
    """PAD_CROP for small images (CIFAR-like, pad 1/8 of the size), RESIZE_CROP otherwise."""
    if max(size) <= core.SMALL_MAX_SIZE:
        return core.Augment(core.PAD_CROP, native_size=tuple(size), pad=max(1, round(min(size) / 8)))
    return core.Augment(core.RESIZE_CROP)


def tree_source(name, description, root, class_names, tree):
    """A ``Source`` over a scanned class-folder tree."""
    first = tree["train"][0] if "train" in tree else next(iter(tree.values()))[0]
    sizes = {s: len(labels) for s, (_, labels) in tree.items()}
    return core.Source(
        name=name,
        description=description,
        class_names=class_names,
        split_sizes=sizes,
        records=lambda split: core.FileRecords(*tree[split], origin=os.path.join(root, split)),
        augment=augment_for(probe_size(first)),
        aliases=split_aliases(sizes),
        cache_key=f"folder:{os.path.realpath(root)}:{sorted(sizes.items())}:{len(class_names)}",
    )


def open_source(name, data_dir, download, options):
    """The "folder" source: ``data_dir/<split>/<class>/*.{jpg,jpeg,png}``."""
    del download  # local files only
    if data_dir is None:
        raise DataError(
            "folder: data_dir is required (a folder laid out as <data_dir>/<split>/<class>/<image>)"
        )
    class_names, tree = scan_tree(data_dir)
    return tree_source(name, f"class folders at {data_dir}", data_dir, class_names, tree)
