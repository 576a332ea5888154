"""tf.distribute glue for training: strategies, the chief, per-replica input, sync BN.

- ``none``: the default strategy (one device).
- ``mirrored``: ``MirroredStrategy`` over every local GPU (or the CPU).
- ``multi_worker``: ``MultiWorkerMirroredStrategy``; each machine (or process) gets a
  ``TF_CONFIG`` describing the cluster and its own task. ``python -m tfq.launch``
  starts such a cluster on one machine.
- ``tpu``: ``TPUStrategy`` on the TPU named by ``--tpu`` (or the one attached).

The global batch (``--batch_size``) is split evenly across replicas; losses are
per-example means over the global batch (Keras and ``GuidedModel`` divide each
replica's mean by the number of replicas and gradients are summed). BatchNorm uses
each replica's own batch statistics unless ``--sync_batchnorm`` is set, which
all-reduces them so that N replicas compute what one device would with the whole batch.
"""

from __future__ import annotations

import json
import os


def make_strategy(cfg):
    """The strategy named by ``cfg.distribution``.

    Raises:
      ValueError: the strategy cannot be created here (no TF_CONFIG for
        multi_worker, no TPU for tpu), with what is needed.
    """
    import tensorflow as tf

    kind = cfg.distribution
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError(
                "--distribution=multi_worker needs the TF_CONFIG environment variable "
                "(cluster spec and this task); on one machine, start the workers with "
                "python -m tfq.launch --num_workers=N -- <training flags>"
            )
        json.loads(os.environ["TF_CONFIG"])  # fail early on malformed JSON
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=cfg.tpu or "")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError, RuntimeError) as e:
            raise ValueError(f"--distribution=tpu: no TPU found ({e}); pass --tpu=<name or grpc://address>") from None
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"unknown --distribution {kind!r}; accepted: none, mirrored, multi_worker, tpu")


def current_strategy():
    """The strategy whose scope is active (the default strategy outside any scope)."""
    import tensorflow as tf

    return tf.distribute.get_strategy()


def _task(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, None
    return resolver.task_type, resolver.task_id


def is_chief(strategy):
    """True for the one process that writes checkpoints, logs and results."""
    task_type, task_id = _task(strategy)
    if task_type is None:
        return True
    if task_type == "chief":
        return True
    spec = strategy.cluster_resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and "chief" not in spec


def task_name(strategy):
    """``worker_1``-style name of this process (``chief`` when single-process)."""
    task_type, task_id = _task(strategy)
    return "chief" if task_type is None else f"{task_type}_{task_id}"


def dataset(strategy, name, split, global_batch_size, **kwargs):
    """A dataset batched with the global batch; Keras splits it across replicas.

    Under several workers each worker builds the same (seeded) pipeline and takes
    its share of every global batch (DATA sharding), so no worker needs its own files.
    """
    import tensorflow as tf

    from tfq import data

    ds = data.build_dataset(name, split, batch_size=global_batch_size, **kwargs)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        ds = ds.with_options(options)
    return ds


def sync_batchnorm(model, synchronized=True):
    """Makes every BatchNormalization layer of ``model`` all-reduce its batch
    statistics across replicas (call before compiling)."""
    import keras

    from tfq.precision import iter_layers

    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = synchronized


def _is_multi_worker(strategy):
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def prepare(model, strategy, element_spec):
    """Adapts a compiled model to ``strategy`` before ``fit`` / ``evaluate``.

    Keras 3 (3.15) cannot run ``fit`` under ``MultiWorkerMirroredStrategy``
    (keras-team/keras#20585): it all-reduces a data batch only to learn its shapes,
    and reduces scalar logs along an axis they do not have. For that strategy this
    builds the model from the dataset's ``element_spec`` instead and returns the
    step's logs as length-1 vectors, which Keras' reduction then averages across
    workers. Other strategies are left untouched.

    Returns:
      Callbacks to add to ``fit``: under several replicas with per-replica
      BatchNorm, one that averages BatchNorm moving statistics across replicas
      after every epoch, so every replica (and every checkpoint) holds the same weights.
    """
    import tensorflow as tf

    if _is_multi_worker(strategy):
        def build(iterator=None, data_batch=None):
            with strategy.scope():
                model._symbolic_build(data_batch=element_spec)

        def as_vectors(step):
            def wrapped(data):
                logs = step(data)
                return {k: tf.reshape(v, [-1]) if v.shape.rank == 0 else v for k, v in logs.items()}

            return wrapped

        # Instance attributes: the class (and every other model) stays untouched.
        model._maybe_symbolic_build = build
        model.train_step = as_vectors(type(model).train_step.__get__(model))
        model.test_step = as_vectors(type(model).test_step.__get__(model))
    if strategy.num_replicas_in_sync > 1:
        return [AverageBatchNormStatistics(strategy)]
    return []


def _moving_statistics(model):
    import keras

    from tfq.precision import iter_layers

    out = []
    for layer in iter_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized:
            out += [layer.moving_mean, layer.moving_variance]
    return out


def average_batchnorm_statistics(model, strategy):
    """Replaces every replica's BatchNorm moving statistics by their mean over replicas
    (one all-reduce of all statistics); a no-op for synchronised BatchNorm."""
    import tensorflow as tf

    variables = _moving_statistics(model)
    if not variables:
        return
    sizes = [int(tf.size(v)) for v in variables]

    def local():
        return tf.concat([tf.reshape(tf.identity(v), [-1]) for v in variables], 0)

    mean = strategy.reduce("MEAN", strategy.run(local), axis=None)
    for v, part in zip(variables, tf.split(mean, sizes)):
        v.assign(tf.reshape(part, v.shape))


def _keras_callback_base():
    import keras

    return keras.callbacks.Callback


class AverageBatchNormStatistics(_keras_callback_base()):
    """Averages BatchNorm moving statistics across replicas at the end of each epoch.

    Must be the first callback, so checkpoints written at the end of the epoch see
    the averaged values; every worker runs it (it is a collective operation).
    """

    def __init__(self, strategy):
        super().__init__()
        self.strategy = strategy

    def on_epoch_end(self, epoch, logs=None):
        nets = [getattr(self.model, n) for n in ("low_net", "fp_net") if hasattr(self.model, n)]
        for net in nets or [self.model]:
            average_batchnorm_statistics(net, self.strategy)
