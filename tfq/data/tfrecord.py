"""TFRecord shards in the layout of TensorFlow models' ``build_imagenet_data.py``.

Files ``<split>-NNNNN-of-MMMMM``; each record a ``tf.train.Example`` with
``image/encoded`` (JPEG bytes), ``image/class/label`` (int64, counted from 1: label
``L`` is line ``L`` of the synsets list) and optionally ``image/class/synset`` (the
wnid), which when present must agree with the label. Other features are ignored.

Checks before any image is read: every shard of ``-of-MMMMM`` is present; each shard's
framing is walked (every record length is checked against its CRC-32C and the bytes
left in the file, so a truncated or corrupt shard is found at once) to count its
records (counts are cached under tfq's cache folder, keyed by path, size and mtime); the first record of every shard is
parsed and must have the two required features with the right types.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct

import numpy as np
import tensorflow as tf

from tfq.data import core, robust, select
from tfq.data.errors import DataError
from tfq.data.files import atomic_write, cache_path, file_size

ENCODED, LABEL, SYNSET = "image/encoded", "image/class/label", "image/class/synset"
MAX_RECORD_BYTES = 256 << 20
_SHARD = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})$")
_counts = {}


def shards(data_dir, split):
    """Sorted shard paths of ``split``; all ``-of-N`` shards must be there."""
    files = sorted(glob.glob(os.path.join(glob.escape(data_dir), f"{split}-*-of-*")))
    matches = [_SHARD.match(os.path.basename(f)) for f in files]
    files = [f for f, m in zip(files, matches) if m and m["split"] == split]
    if not files:
        return []
    totals = {int(_SHARD.match(os.path.basename(f))["total"]) for f in files}
    indices = {int(_SHARD.match(os.path.basename(f))["index"]) for f in files}
    if len(totals) != 1 or indices != set(range(max(totals))):
        missing = sorted(set(range(max(totals))) - indices)[:5]
        raise DataError(
            f"{data_dir}: incomplete {split} shards: found {len(files)} of "
            f"{'/'.join(map(str, sorted(totals)))}" + (f" (missing e.g. {missing})" if missing else "")
        )
    return files


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def masked_crc32c(data):
    """TFRecord's masked CRC-32C (Castagnoli) of ``data`` (a few bytes: pure Python)."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC32C[(c ^ b) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record_length(header, path, offset, count, left):
    """The length in a 12-byte record header, checked against its CRC and ``left`` bytes."""
    if len(header) < 12:
        raise DataError(f"{path}: truncated record header at byte {offset}")
    (length,) = struct.unpack("<Q", header[:8])
    if masked_crc32c(header[:8]) != struct.unpack("<I", header[8:12])[0]:
        raise DataError(f"{path}: record {count} at byte {offset}: corrupt length "
                        "(CRC mismatch; not a TFRecord file, or damaged)")
    if length > MAX_RECORD_BYTES or length + 16 > left:
        raise DataError(
            f"{path}: record {count} at byte {offset} declares {length} bytes, "
            f"more than the {left - 16} left in the file (truncated or not a TFRecord)"
        )
    return length


def _walk(path):
    """Counts the records of one shard, checking every length against the file size."""
    size = file_size(path)
    count, offset = 0, 0
    with open(path, "rb") as f:
        while offset < size:
            length = _record_length(f.read(12), path, offset, count, size - offset)
            offset += 12 + length + 4
            f.seek(offset)
            count += 1
    return count


def count_records(path):
    """Records in a shard (cached in memory and on disk by path, size and mtime)."""
    st = os.stat(path)
    key = [os.path.realpath(path), st.st_size, st.st_mtime_ns]
    memo_key = tuple(key)
    if memo_key in _counts:
        return _counts[memo_key]
    cached = cache_path("tfrecord_counts", key, ".json")
    try:
        with open(cached) as f:
            count = int(json.load(f)["count"])
    except (OSError, ValueError, KeyError, TypeError):
        count = _walk(path)
        atomic_write(cached, lambda f: f.write(json.dumps({"path": key[0], "count": count}).encode()))
    _counts[memo_key] = count
    return count


def _first_record(path):
    with open(path, "rb") as f:
        length = _record_length(f.read(12), path, 0, 0, file_size(path))
        return f.read(length)


def check_first_example(path):
    """Parses a shard's first record; it must have the required features and types."""
    try:
        example = tf.train.Example.FromString(_first_record(path))
    except Exception as e:
        raise DataError(f"{path}: record 0 is not a tf.train.Example ({e})") from None
    feature = example.features.feature
    for key, kind in ((ENCODED, "bytes_list"), (LABEL, "int64_list")):
        if key not in feature or feature[key].WhichOneof("kind") != kind:
            raise DataError(
                f"{path}: record 0 has no {kind} feature {key!r} (features: "
                f"{', '.join(sorted(feature)) or 'none'}); expected the layout of "
                "build_imagenet_data.py (image/encoded, image/class/label counted from 1)"
            )


def _parse(record, synsets, remap):
    features = tf.io.parse_single_example(record, {
        ENCODED: tf.io.FixedLenFeature([], tf.string, default_value=""),
        LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        SYNSET: tf.io.FixedLenFeature([], tf.string, default_value=""),
    })
    raw = features[LABEL]
    k = len(synsets)
    index = tf.clip_by_value(raw - 1, 0, k - 1)
    expected = tf.gather(tf.constant(synsets), index)
    synset = features[SYNSET]

    def label_text():
        return tf.strings.as_string(raw)

    problems = [
        (tf.equal(features[ENCODED], ""), lambda: tf.constant(f"no feature {ENCODED}")),
        (tf.equal(raw, -1), lambda: tf.constant(f"no feature {LABEL}")),
        ((raw < 1) | (raw > k), lambda: tf.strings.join(
            [LABEL, " ", label_text(), f" is outside 1..{k} (labels count from 1)"])),
        ((synset != "") & (synset != expected), lambda: tf.strings.join(
            [SYNSET, " ", synset, " does not match ", LABEL, " ", label_text(),
             " (which is ", expected, ")"])),
    ]

    def describe():  # strings are built only for a bad record
        problem = tf.constant("")
        for bad, text in reversed(problems):
            problem = tf.where(bad, text(), problem)
        return problem

    any_bad = tf.reduce_any(tf.stack([bad for bad, _ in problems]))
    problem = tf.cond(any_bad, describe, lambda: tf.constant(""))
    return features[ENCODED], tf.gather(tf.constant(remap), index), problem


def stream(files, synsets, class_names, split):
    """``StreamRecords`` over checked shards.

    Args:
      files: shard paths.
      synsets: wnids in label order (label ``L`` is ``synsets[L - 1]``).
      class_names: the sorted class names; labels are remapped to their indices.
      split: for messages.
    """
    counts = [count_records(f) for f in files]
    for f, n in zip(files, counts):
        if n:
            check_first_example(f)
    position = {c: i for i, c in enumerate(class_names)}
    remap = np.array([position[s] for s in synsets], np.int32)

    def open_(plan):
        chosen, expected = list(files), sum(counts)
        element_shard = None
        ctx = plan.input_context
        if ctx is not None and ctx.num_input_pipelines > 1:
            if len(files) >= ctx.num_input_pipelines:
                chosen = files[ctx.input_pipeline_id::ctx.num_input_pipelines]
                expected = sum(counts[files.index(f)] for f in chosen)
            else:
                element_shard, expected = (ctx.num_input_pipelines, ctx.input_pipeline_id), None
        fixed = plan.fixed_order_seed is not None
        if fixed:
            chosen = list(select.rng(plan.fixed_order_seed, select.ORDER).permutation(chosen))
        names = tf.data.Dataset.from_tensor_slices(chosen)
        if plan.shuffle and not fixed and plan.epoch is not None:
            names = robust.shuffled(chosen, plan.seed, plan.epoch)
        elif plan.shuffle and not fixed:
            names = names.shuffle(len(chosen), seed=plan.seed, reshuffle_each_iteration=True)
        deterministic = plan.deterministic or fixed

        def read(path):
            return tf.data.TFRecordDataset(path).enumerate().map(lambda i, r: (r, path, i))

        # A fixed order reads whole shards one after another, so that the first records
        # per class (``limit``/``holdout``) come from the shards the seed put first.
        cycle = 1 if fixed else min(len(chosen), 16)
        ds = names.interleave(read, cycle_length=cycle, block_length=1,
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        if element_shard:
            ds = ds.shard(*element_shard)

        def to_element(record, path, index):
            payload, label, problem = _parse(record, synsets, remap)
            return {"payload": payload, "label": label, "origin": path, "index": index,
                    "problem": problem}

        ds = ds.map(to_element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
        return ds, expected

    return core.StreamRecords(open=open_, size=sum(counts),
                              origin=f"{os.path.dirname(files[0])}/{split}-*")
