"""Deterministic, class-balanced subsets for ``limit`` and ``holdout``.

The same ``seed`` gives the same subset in every call and every process: the choice
depends only on the seed and the labels (NumPy's PCG64 seeded by ``[seed, purpose]``),
never on TensorFlow's random state.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

HOLDOUT = 1
LIMIT = 2
ORDER = 3


def rng(seed, purpose):
    """A NumPy generator for ``purpose`` (``HOLDOUT``, ``LIMIT``, ``ORDER``)."""
    return np.random.default_rng([int(seed), purpose])


def quotas(counts, n, generator):
    """Splits ``n`` examples over classes as evenly as their sizes allow.

    Args:
      counts: examples per class (int array); None when unknown (streams): every
        class is then assumed large enough.
      n: examples wanted, at most ``sum(counts)``.
      generator: decides which classes get the remainder.

    Returns:
      int64 array of examples to take per class.
    """
    num_classes = len(counts)
    counts = np.asarray(counts, np.int64)
    quota = np.zeros(num_classes, np.int64)
    remaining = int(n)
    active = np.flatnonzero(counts > 0)
    while remaining > 0 and len(active):
        share, extra = divmod(remaining, len(active))
        order = generator.permutation(active)
        give = np.full(len(order), share, np.int64)
        give[:extra] += 1
        add = np.minimum(give, counts[order] - quota[order])
        quota[order] += add
        remaining -= int(add.sum())
        active = np.flatnonzero(quota < counts)
    return quota


def balanced_subset(labels, n, num_classes, seed, purpose):
    """Indices (sorted) of a class-balanced random subset of ``n`` examples.

    Classes too small for an equal share give their leftover to the others, so the
    subset has exactly ``min(n, len(labels))`` examples.
    """
    labels = np.asarray(labels)
    n = min(int(n), len(labels))
    g = rng(seed, purpose)
    per_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    quota = quotas([len(p) for p in per_class], n, g)
    chosen = [g.permutation(p)[:q] for p, q in zip(per_class, quota)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def stream_quotas(n, num_classes, seed, purpose):
    """Per-class quotas for a stream whose class sizes are unknown."""
    return quotas(np.full(num_classes, np.iinfo(np.int64).max // 2), n, rng(seed, purpose))


def stream_select(ds, quota, *, keep):
    """Keeps (``keep=True``) or drops the first ``quota[c]`` records of each class.

    ``ds`` must be read in a fixed order: the subset is the first records per class
    in that order. Records carry a ``label`` (a class index).
    """
    quota = tf.constant(quota, tf.int64)

    def step(taken, element):
        label = tf.cast(element["label"], tf.int32)
        in_range = (label >= 0) & (label < tf.size(quota, tf.int32))
        safe = tf.where(in_range, label, 0)
        chosen = in_range & (taken[safe] < quota[safe])
        taken = tf.tensor_scatter_nd_add(taken, [[safe]], [tf.cast(chosen, tf.int64)])
        return taken, (element, chosen)

    ds = ds.scan(tf.zeros_like(quota), step)
    ds = ds.filter(lambda element, chosen: chosen if keep else tf.logical_not(chosen))
    return ds.map(lambda element, chosen: element)
