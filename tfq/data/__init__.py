"""Input pipelines: tf.data datasets in the models' input convention, from many sources.

Sources (``names()``; one module each): ``digits`` (scikit-learn, bundled),
``mnist`` / ``fashion_mnist`` (idx files), ``cifar10`` / ``cifar100`` (pickles, class
folders or tfds), ``imagenet`` (JPEG folders, TFRecord shards or tfds), ``folder``
(``root/<split>/<class>/*.jpg``), and ``"tfds:<name>"`` for any tensorflow-datasets
image-classification dataset.

Images: float32 ``pixel / 255 - mean`` (per-pixel mean image, [0, 1] units), in
[-1, 1], always 3 channels; labels: int32 class indices following the sorted class
names. Bad input raises ``DataError`` naming the file; problems found only while a
pipeline runs are re-raised as ``DataError`` inside ``translate_errors()``.

Example:
    import tfq.data
    info = tfq.data.info("cifar10", data_dir="/data")
    train = tfq.data.build_dataset("cifar10", "train", data_dir="/data", training=True)
    test = tfq.data.build_dataset("cifar10", "test", data_dir="/data")
"""

from tfq.data.api import build_dataset, distributed_dataset, info, pixel_mean
from tfq.data.core import DatasetInfo, option_from_text
from tfq.data.errors import DataError, translate_errors
from tfq.data.pipeline import check_name, names
from tfq.data.skip import SkipCounter, SkippedImagesReport, callbacks_for
from tfq.data.skip import counters_of as skip_counters

__all__ = [
    "names", "check_name", "info", "build_dataset", "pixel_mean", "distributed_dataset",
    "DatasetInfo", "DataError", "translate_errors", "option_from_text",
    "SkipCounter", "SkippedImagesReport", "skip_counters", "callbacks_for",
]
