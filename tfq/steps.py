"""Train steps that do nothing at the end of a pass of unknown length.

Keras 3 (3.15, TensorFlow backend) asks for one more batch than a pass of unknown
length holds: its train function is called once more, and that call ends with
tf.data's end-of-data error. The batch never reaches the model, but the parts of the
step that do not read it have already run by then, inside the same graph: the
optimizer's decoupled weight decay (every weight shrinks by ``lr * weight_decay``),
its iteration count, and the metric counts that a static batch shape turns into
constants (so every training metric of the epoch is logged ``n / (n + 1)`` of its
value). A pipeline loses its length whenever tf.data cannot know it: a filter (corrupt
images skipped), a record stream cut to a limit, shards interleaved.

Making the whole step wait for its batch removes all three: the stateful ops gain a
control dependency on the batch, and with no batch nothing runs. The steps themselves
take no longer, but such a graph can take TensorFlow up to twice as long to build (a 4-bit
ResNet-20: seconds more, once per model; BENCHMARKS.md), so the wait is put only where
a pass's length is unknown (``length_unknown``).
"""

import functools

import keras
import tensorflow as tf

__all__ = ["after_batch", "waits_for_batch", "guard_train_step", "length_unknown"]


def after_batch(data):
    """A context in which every op created waits for the batch ``data`` to exist.

    Args:
      data: Keras's ``data`` of a step (tensors, composite tensors, None, nested).

    Returns:
      A ``tf.control_dependencies`` context.
    """
    return tf.control_dependencies(tf.nest.flatten(
        [t for t in tf.nest.flatten(data) if t is not None], expand_composites=True))


def waits_for_batch(train_step):
    """Wraps a Keras ``train_step`` so that nothing in it runs before its batch exists.

    Args:
      train_step: a callable taking Keras's ``data`` (a batch, possibly a tuple).

    Returns:
      The wrapped step; ``train_step`` itself if it is already wrapped.
    """
    if getattr(train_step, "waits_for_batch", False):
        return train_step

    @functools.wraps(train_step)
    def step(data):
        with after_batch(data):
            return train_step(data)

    step.waits_for_batch = True
    return step


def guard_train_step(model):
    """Makes ``model.fit`` take no step past the end of a pass of unknown length.

    Sets an instance attribute, so the class (and every other model) is untouched and
    nothing of it is saved with the model. ``tfq.train`` does this for every model it
    trains on a pipeline of unknown length; a ``GuidedModel`` is left as it is: its
    ``fit`` decides from its data whether its step waits.

    Args:
      model: a ``keras.Model``.

    Returns:
      ``model``.
    """
    model.train_step = waits_for_batch(model.train_step)
    return model


def length_unknown(data):
    """Whether Keras cannot know how many batches one pass over ``data`` holds.

    Only such a pass ends with the extra call this module is about. Anything not
    recognised as having a length (a generator, a distributed dataset) counts as
    unknown, which costs graph-building time only.

    Args:
      data: what ``fit`` takes as ``x``: a ``tf.data.Dataset``, a
        ``keras.utils.PyDataset``, arrays or tensors (nested), a generator.

    Returns:
      bool.
    """
    if isinstance(data, tf.data.Dataset):
        return int(data.cardinality()) == int(tf.data.UNKNOWN_CARDINALITY)
    if isinstance(data, keras.utils.PyDataset):  # a length, or endless (no end to pass)
        return False
    leaves = tf.nest.flatten(data)
    return not leaves or not all(hasattr(t, "shape") and hasattr(t, "__len__") for t in leaves)
