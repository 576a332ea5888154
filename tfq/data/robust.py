"""Decoding that never loses an image silently.

Images are decoded in a parallel, order-preserving map; one that fails (corrupt,
truncated, not an image, unreadable) raises inside that map, and ``ignore_errors``
drops it. Every element carries its position in the epoch, so a later element that
arrives with a higher position than expected reveals the loss: it becomes an error
naming the file (``skip_corrupt=False``) or a counted, logged skip (``skip_corrupt=True``,
see ``tfq.data.skip``). A sentinel element after the last one reveals losses at the very
end, and, for record files, checks the number of records read against the number the
files hold (a record lost to a read error is never dropped silently either).

File lists are shuffled with a stateless permutation (``RandomIndexShuffle`` seeded by the
epoch's random seed and ``seed``), so the file at any position is known and named
exactly. Record streams remember the previous record's origin instead.

Each pass over a training pipeline draws its random seeds from ``pass_randoms``: by
default a new draw per pass, or, given an epoch variable, a function of the epoch
number alone, so that a resumed run sees the same passes as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tfq.data import core, preprocess
from tfq.data.errors import TAG

_LOST = (": cannot be read or decoded as an image (corrupt, truncated or not an image; "
         "pass skip_corrupt=True to skip such files; images lost here: ")
_UNREAD = ": records could not be read (corrupt record file?; records lost: "


def _describe(origin, index):
    """"file" or "file record N" (element-wise; built only when a message is needed)."""
    return tf.where(index >= 0,
                    tf.strings.join([origin, " record ", tf.strings.as_string(index)]),
                    origin)


_CHECK_BATCH = 256  # elements checked together: one cond per group, not per image


def _report(counter, counts, names_fn, what):
    """Counts (skip mode) or fails (error mode) for the ``counts > 0``; returns an int64.

    Args:
      counts: int64 [K] lost images per element of a group.
      names_fn: ``() -> string [K]``: what to name for each (built only when needed).
    """

    def record(n, names):
        for count, name in zip(n.numpy(), names.numpy()):
            if count > 0:
                counter.add(int(count), name.decode("utf-8", "replace"))
        return 0

    def skip():
        return tf.py_function(record, [counts, names_fn()], tf.int64)

    def fail():
        first = tf.argmax(tf.cast(counts > 0, tf.int32))
        message = tf.strings.join([TAG, names_fn()[first], what,
                                   tf.strings.as_string(counts[first]), ")"])
        with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
            return tf.constant(0, tf.int64)

    return tf.cond(tf.reduce_any(counts > 0), skip if counter is not None else fail,
                   lambda: tf.constant(0, tf.int64))


def _robust_map(ds, load, names_of_previous, counter, expected_total, origin):
    """``ds.map(load)`` where a failing element is noticed (see the module doc).

    Args:
      ds: elements with ``pos`` (int64, 0, 1, ...) and ``last`` (the sentinel).
      load: the element function that may fail; keeps ``pos`` and ``last``.
      names_of_previous: ``f(group) -> string [K]``: the origins of positions ``pos - 1``
        of a group (a batch) of elements.
      counter: a ``SkipCounter`` (skip mode) or None (error mode).
      expected_total: the number of elements before the sentinel, or None.
      origin: names the whole source in the count message.
    """
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors().batch(_CHECK_BATCH)

    def step(expected, group):
        pos = group["pos"]
        gaps = pos - tf.concat([[expected], pos[:-1] + 1], 0)
        done = _report(counter, gaps, lambda: names_of_previous(group), _LOST)
        if expected_total is not None:
            lost = tf.where(group["last"], expected_total - pos, tf.zeros_like(pos))
            done += _report(counter, lost, lambda: tf.fill(tf.shape(pos), origin), _UNREAD)
        with tf.control_dependencies([done]):
            return pos[-1] + 1, dict(group)

    ds = ds.scan(tf.constant(0, tf.int64), step).unbatch()
    return ds.filter(lambda e: tf.logical_not(e["last"]))


def pass_randoms(seed, epoch=None):
    """An endless stream of int64 random numbers, drawn anew for every pass.

    Args:
      seed: int.
      epoch: None: each iteration over the dataset (each pass) gets a new stream,
        following the number of passes made so far by this dataset object. An int64
        ``tf.Variable``: each pass's stream is a function of ``(seed, epoch)`` read
        when the pass starts (its first element), whatever happened before, so the
        caller decides which pass is which (``tfq.train`` sets the run's global epoch).
    """
    if epoch is None:
        return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    base = tf.constant(seed, tf.int64)

    def draw(key):
        return tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)

    def stream(e):
        key = draw(tf.stack([base, e]))
        return tf.data.Dataset.range(tf.int64.max).map(lambda i: draw(tf.stack([key, i])))

    # Read when a pass starts (its first element is asked for), not when built.
    now = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).map(
        lambda _: tf.cast(epoch.read_value(), tf.int64))
    # flat_map hides the length; a pipeline zipped with this stream keeps its own only
    # if the stream says it is endless (see ``shuffled`` for why lengths matter).
    return now.flat_map(stream).apply(
        tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY))


def shuffled(values, seed, epoch=None):
    """A dataset of the 1-D tensor ``values`` in a new order every pass: a permutation
    drawn from the first number of the pass's ``pass_randoms(seed, epoch)`` (the one
    file lists get, ``permuted_index``), so with an epoch variable it is a function of
    ``(seed, epoch)``."""
    values = tf.convert_to_tensor(values)
    last = tf.size(values, tf.int64) - 1
    seed_t = tf.constant(seed, tf.int64)
    # flat_map hides the length; with it known, Keras knows each pass's step count
    # and does not call the train step once more at its end (see tfq.steps).
    return pass_randoms(seed, epoch).take(1).flat_map(
        lambda r: tf.data.Dataset.range(last + 1).map(
            lambda pos: tf.gather(values, permuted_index(pos, r, seed_t, last)))).apply(
        tf.data.experimental.assert_cardinality(last + 1))


def permuted_index(pos, r, seed, last):
    """Where position ``pos`` of a pass goes in its permutation of ``0 .. last``, the
    permutation drawn from the pass's random number ``r`` and ``seed`` (int64 tensors;
    ``pos`` and ``r`` scalars or vectors of one shape, e.g. a group of elements)."""
    # shape [3] or [K, 3]: the op's own seed layout
    seeds = tf.stack([r, tf.ones_like(r) * seed, tf.zeros_like(r)], axis=-1)
    return tf.raw_ops.RandomIndexShuffle(index=pos, seed=seeds, max_index=last)


def files(records, geometry, *, training, seed, input_context, counter, epoch=None):
    """(uint8 image [H, W, 3], int32 label) of image files, shuffled when training.

    ``epoch``: as ``pass_randoms``.

    Returns:
      ``(dataset, number of files of this input pipeline)``.
    """
    paths, labels = records.paths, records.labels
    if input_context is not None and input_context.num_input_pipelines > 1:
        k, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        paths, labels = paths[i::k], labels[i::k]
    n = len(paths)
    if n == 0:
        return tf.data.Dataset.from_tensors(
            (tf.zeros([*geometry.size, 3], tf.uint8), tf.constant(0, tf.int32))).take(0), 0
    paths_t = tf.constant(np.asarray(paths, dtype=str))
    labels_t = tf.constant(labels, tf.int32)
    seed_t = tf.constant(seed, tf.int64)
    h, w = geometry.size
    if training:
        epochs = pass_randoms(seed, epoch).take(1)
    else:
        epochs = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64))
    ds = epochs.flat_map(lambda epoch: tf.data.Dataset.range(n + 1).map(
        lambda pos: {"pos": pos, "epoch": epoch, "last": pos >= n}))

    def index_of(pos, epoch):
        pos = tf.clip_by_value(pos, 0, n - 1)
        if not training:
            return pos
        return permuted_index(pos, epoch, seed_t, tf.constant(n - 1, tf.int64))

    def load(e):
        index = index_of(e["pos"], e["epoch"])

        def decoded():
            image = preprocess.decode(tf.io.read_file(tf.gather(paths_t, index)))
            return preprocess.element_geometry(image, geometry, training,
                                               tf.stack([e["epoch"], e["pos"]]))

        image = tf.cond(e["last"], lambda: tf.zeros([h, w, 3], tf.uint8), decoded)
        return {**e, "image": image, "label": tf.gather(labels_t, index)}

    def names_of_previous(group):
        return tf.gather(paths_t, index_of(group["pos"] - 1, group["epoch"]))

    ds = _robust_map(ds, load, names_of_previous, counter, None, records.origin)
    return ds.map(lambda e: (e["image"], e["label"])), n


def streams(records, geometry, *, training, seed, deterministic, input_context, shuffle_buffer,
            counter, epoch=None):
    """(uint8 image [H, W, 3], int32 label) of a record stream; also checks each record's
    ``problem`` (missing feature, impossible label) whatever ``skip_corrupt`` says.

    ``epoch``: as ``pass_randoms``; it keys the shuffle buffer and each record's
    augmentation, and the source's file order where the source supports it
    (``core.ReadPlan.epoch``).

    Returns:
      ``(dataset, number of records expected, or None when unknown)``.
    """
    plan = core.ReadPlan(shuffle=training, fixed_order_seed=None, seed=seed,
                         deterministic=deterministic,
                         input_context=None if records.selected else input_context,
                         epoch=epoch if training else None)
    ds, expected = records.open(plan)
    if records.selected and input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    if training:
        if epoch is None:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
            randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        else:
            # The pass's first number seeds its buffer shuffle; the rest, its records.
            unshuffled = ds

            def shuffle_pass(r):
                # A graph-level seed of this function's own: with a global seed of 0
                # (tf.random.set_seed(0)) TF's seed helper would test the tensor `r`
                # as a Python bool; this also keeps the order independent of it.
                tf.compat.v1.set_random_seed(1)
                return unshuffled.shuffle(shuffle_buffer, seed=r, reshuffle_each_iteration=False)

            ds = pass_randoms(seed, epoch).take(1).flat_map(shuffle_pass)
            randoms = pass_randoms(seed, epoch).skip(1)
        ds = tf.data.Dataset.zip(ds, randoms).map(lambda e, r: {**e, "seed": r})
    else:
        ds = ds.map(lambda e: {**e, "seed": tf.constant(0, tf.int64)})
    ds = ds.map(lambda e: {**e, "last": tf.constant(False)})
    sentinel = {k: tf.zeros([], v.dtype) for k, v in ds.element_spec.items()}
    sentinel["last"] = tf.constant(True)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(sentinel))

    def position(state, e):
        pos, origin, index = state
        return ((pos + 1, e["origin"], e["index"]),
                {**e, "pos": pos, "prev_origin": origin, "prev_index": index})

    ds = ds.scan((tf.constant(0, tf.int64), tf.constant(""), tf.constant(-1, tf.int64)), position)
    h, w = geometry.size

    def load(e):
        def decoded():
            return preprocess.element_geometry(preprocess.decode(e["payload"]), geometry,
                                               training, tf.stack([e["seed"], e["pos"]]))

        skip = e["last"] | tf.not_equal(e["problem"], "")
        image = tf.cond(skip, lambda: tf.zeros([h, w, 3], tf.uint8), decoded)
        return {k: v for k, v in e.items() if k not in ("payload", "seed")} | {"image": image}

    ds = _robust_map(ds, load, lambda g: _describe(g["prev_origin"], g["prev_index"]),
                     counter, expected, records.origin)

    def check_problem(e):
        def fail():
            message = tf.strings.join([TAG, _describe(e["origin"], e["index"]), ": ",
                                       e["problem"]])
            with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
                return tf.identity(e["image"])

        image = tf.cond(tf.equal(e["problem"], ""), lambda: e["image"], fail)
        return image, e["label"]

    return ds.map(check_problem), expected
