"""scikit-learn's bundled 8x8 digits (1,797 images): the no-download demo set.

Pixel values 0..16 are scaled to 0..255 (``round(v * 255 / 16)``). The split is fixed:
per class, a permutation drawn from seed 0 puts 20% of the images (rounded) into
``test`` and the rest into ``train`` (1,438 / 359). ``data_dir`` is ignored. Class
``i`` is digit ``i``. Training shifts images by up to 1 pixel (zero padding); digits
are never flipped.
"""

from __future__ import annotations

import functools

import numpy as np

from tfq.data import core

TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)
def load():
    """``{"train": ArrayRecords, "test": ArrayRecords}``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int32)
    g = np.random.default_rng(0)
    test = []
    for c in range(10):
        idx = g.permutation(np.flatnonzero(labels == c))
        test.extend(idx[: round(len(idx) * TEST_FRACTION)])
    is_test = np.zeros(len(labels), bool)
    is_test[test] = True
    origin = "sklearn.datasets.load_digits"
    return {
        "train": core.ArrayRecords(images[~is_test], labels[~is_test], origin),
        "test": core.ArrayRecords(images[is_test], labels[is_test], origin),
    }


def open_source(name, data_dir, download, options):
    """The "digits" source (``data_dir`` and ``download`` are ignored)."""
    del data_dir, download
    splits = load()
    return core.Source(
        name=name,
        description="scikit-learn digits (bundled)",
        class_names=[str(i) for i in range(10)],
        split_sizes={s: len(r) for s, r in splits.items()},
        records=splits.__getitem__,
        augment=core.Augment(core.PAD_CROP, native_size=(8, 8), pad=1, flip=False),
        aliases={"validation": "test"},
    )
