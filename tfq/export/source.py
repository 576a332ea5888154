"""Where an export starts: a tfq model (``.keras`` file or training ``model_dir``) and data."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import zipfile

import keras
import numpy as np

from tfq import layers as qlayers
from tfq import runstate
from tfq.data.errors import DataError
from tfq.data.files import load_npy
from tfq.precision import iter_layers

_TFQ_LAYERS = (qlayers.InputQuantizer, qlayers.QConv2D, qlayers.QDense, qlayers.QActivation,
               qlayers.Scalar)


class ExportError(ValueError):
    """Bad input to the exporter: the message says what and where."""


@dataclasses.dataclass
class ModelSource:
    """A loaded tfq model and what its training run recorded.

    Attributes:
      model: the Keras model.
      path: the ``.keras`` file.
      model_dir: the training run folder, or None for a bare ``.keras`` file.
      config: the run's ``config.json`` (empty without a model_dir).
      mean: the run's ``mean.npy`` (None when absent).
    """

    model: keras.Model
    path: str | None
    model_dir: str | None = None
    config: dict = dataclasses.field(default_factory=dict)
    mean: np.ndarray | None = None

    @property
    def stem(self):
        """The output files' name stem: one path component, whatever the model's name.

        A model's name comes from its (possibly downloaded) config; "../x" or "/x"
        must not place an output outside the export folder.
        """
        if self.path:
            stem = os.path.splitext(os.path.basename(self.path))[0]
        else:
            stem = self.model.name
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".")
        return stem[:100] or "model"


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path}: missing ({what})") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable {what} ({e})") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path}: {what} must be a JSON object")
    return value


def check_tfq_model(model, where):
    """Raises ``ExportError`` unless ``model`` is a Keras model with tfq layers."""
    if not isinstance(model, keras.Model):
        raise ExportError(f"{where}: not a Keras model (got {type(model).__name__})")
    if not any(isinstance(layer, _TFQ_LAYERS) for layer in iter_layers(model)):
        raise ExportError(
            f"{where}: not a tfq model (no InputQuantizer, QConv2D, QDense, QActivation or "
            "Scalar layer); build it with tfq.models.build or tfq.layers")
    return model


def load_keras(path):
    """Loads a ``.keras`` file with clear errors for anything that is not a tfq model."""
    if not os.path.exists(path):
        raise ExportError(f"{path}: no such file or directory")
    if not path.endswith(".keras"):
        raise ExportError(f"{path}: expected a .keras file or a training model_dir")
    if not zipfile.is_zipfile(path):
        raise ExportError(f"{path}: not a Keras model file (not a .keras zip archive, or "
                          "truncated)")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises many types for a bad archive
        raise ExportError(f"{path}: cannot be loaded as a Keras model "
                          f"({type(e).__name__}: {e})") from None
    return check_tfq_model(model, path)


def load(model_or_path):
    """A ``ModelSource`` from a Keras model, a ``.keras`` path or a training model_dir.

    A model_dir holds ``results.json`` (``"final_model"``: the model's path, relative
    to the folder), ``config.json`` (``dataset``, ``data_dir``, ``image_size``,
    ``eval_split``...) and, optionally, ``mean.npy``.

    Raises:
      ExportError: missing / unreadable files, not a tfq model.
    """
    if isinstance(model_or_path, keras.Model):
        return ModelSource(check_tfq_model(model_or_path, model_or_path.name), None)
    path = os.fspath(model_or_path)
    if not os.path.isdir(path):
        return ModelSource(load_keras(path), path)
    results_path = os.path.join(path, "results.json")
    try:
        model_path = runstate.final_model_path(path, _read_json(results_path, "training results"))
    except ValueError as e:
        raise ExportError(f"{results_path}: {e}") from None
    config_path = os.path.join(path, "config.json")
    config = _read_json(config_path, "training config") if os.path.exists(config_path) else {}
    model = load_keras(model_path)
    mean = None
    mean_path = os.path.join(path, "mean.npy")
    if os.path.exists(mean_path):
        dims = tuple(model.inputs[0].shape[1:])
        shape = dims[:2] + (3,) if len(dims) == 3 and None not in dims[:2] else None
        try:
            # Header checked before anything is allocated (np.load trusts it).
            mean = load_npy(mean_path, shape=shape, max_bytes=64 << 20).astype(np.float32)
        except DataError as e:
            raise ExportError(str(e)) from None
    return ModelSource(model, model_path, path, config, mean)


# ------------------------------------------------------------------------ data


def as_arrays(data, limit=None, what="data"):
    """(images float32 (N, H, W, C), labels int (N,) or None) from many data forms.

    Accepts an array of images, an ``(images, labels)`` tuple of arrays, or a
    ``tf.data.Dataset`` / iterable of ``(images, labels)`` or image batches.

    Raises:
      ExportError: empty or unusable data.
    """
    if data is None:
        return None, None
    if isinstance(data, np.ndarray):
        images, labels = data, None
    elif isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], np.ndarray):
        images, labels = data
    else:
        xs, ys = [], []
        count = 0
        try:
            for batch in data:
                if isinstance(batch, (tuple, list)):
                    x = np.asarray(batch[0])
                    ys.append(np.asarray(batch[1]).reshape(-1) if len(batch) > 1 else None)
                else:
                    x = np.asarray(batch)
                    ys.append(None)
                xs.append(x)
                count += len(x)
                if limit is not None and count >= limit:
                    break
        except TypeError:
            raise ExportError(f"{what}: expected an array, (images, labels) or a dataset; got "
                              f"{type(data).__name__}") from None
        if not xs:
            raise ExportError(f"{what}: the dataset is empty")
        images = np.concatenate(xs)
        labels = None if any(y is None for y in ys) else np.concatenate(ys)
    images = np.asarray(images, np.float32)
    if limit is not None:
        images = images[:limit]
        labels = None if labels is None else np.asarray(labels)[:limit]
    if images.ndim != 4 or len(images) == 0:
        raise ExportError(f"{what}: expected images (N, H, W, C) with N > 0; got shape "
                          f"{images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ExportError(f"{what}: {len(labels)} labels for {len(images)} images")
    return images, (None if labels is None else np.asarray(labels).astype(np.int64))


def dataset_arrays(name, split, *, data_dir=None, num_examples=None, image_size=None,
                   mean=None, options=None, holdout=0, train_limit=None, seed=0):
    """Images and labels of a ``tfq.data`` split, as arrays (evaluation pipeline).

    ``holdout``, ``train_limit`` and ``seed`` are a training run's: they define its
    ``"holdout"`` split, what ``"train"`` leaves after it, and its ``"unused"`` split
    (the training examples its ``train_limit`` subset left out). ``num_examples`` of a
    larger split are a class-balanced subset; of ``"unused"``, a seeded random one.
    """
    from tfq import data as tfq_data  # the data package is only needed here
    from tfq.data.pipeline import UNUSED

    kwargs = dict(data_dir=data_dir, **(options or {}))
    params = inspect.signature(tfq_data.build_dataset).parameters
    if image_size is not None and "image_size" in params:
        kwargs["image_size"] = image_size
    splits = dict(holdout=holdout, limit=train_limit if split == UNUSED else None)
    try:
        size = tfq_data.info(name, **kwargs, **splits).split_sizes.get(split)
        if mean is not None:
            kwargs["mean"] = mean
        subset = num_examples is not None and size is not None and num_examples < size
        if subset and split != UNUSED:
            splits["limit"] = num_examples  # a class-balanced subset, not the first N files
        ds = tfq_data.build_dataset(name, split, batch_size=256, training=False, seed=seed,
                                    **kwargs, **splits)
        with tfq_data.translate_errors():
            if subset and split == UNUSED:  # `limit` names the training subset here
                ds = _sample(ds, size, num_examples, seed)
            return as_arrays(ds, num_examples, what=f"dataset {name}:{split}")
    except tfq_data.DataError as e:
        raise ExportError(f"dataset {name!r} split {split!r}: {e}") from None


def _sample(ds, n, k, seed):
    """``k`` of the ``n`` examples ``ds`` yields, drawn at random (seeded), in order."""
    keep = np.zeros(n, bool)
    keep[np.random.default_rng(seed).choice(n, k, replace=False)] = True
    xs, ys, start = [], [], 0
    for x, y in ds:
        chosen = np.zeros(len(x), bool)
        part = keep[start:start + len(x)]
        chosen[:len(part)] = part
        xs.append(np.asarray(x)[chosen])
        ys.append(np.asarray(y)[chosen])
        start += len(x)
    return np.concatenate(xs), np.concatenate(ys)
