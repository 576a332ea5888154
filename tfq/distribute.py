"""tf.distribute glue for training: strategies and per-replica input."""

from __future__ import annotations


def make_strategy(cfg):
    """The strategy named by ``cfg.distribution`` (``none`` -> the default strategy)."""
    import tensorflow as tf

    if cfg.distribution == "none":
        return tf.distribute.get_strategy()
    raise ValueError(f"--distribution={cfg.distribution} is not supported yet")


def dataset(strategy, name, split, global_batch_size, **kwargs):
    """A batched dataset of ``name``/``split``; Keras splits the global batch across
    the strategy's replicas."""
    from tfq import data

    return data.build_dataset(name, split, batch_size=global_batch_size, **kwargs)


def sync_batchnorm(model):
    """Makes every BatchNormalization layer of ``model`` synchronise across replicas."""
    from tfq.precision import iter_layers
    import keras

    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True
