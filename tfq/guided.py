"""Guided training (paper section 3.4, Algorithm 3): a full-precision net and a
low-bit net of the same architecture trained jointly.

``R = 1/2 ||Q(mu) - nu||^2`` compares feature maps at the guidance layers; ``Q`` is the
low-bit net's activation quantizer at that layer (identity where the layer is not a
quantized activation), so the two maps are on the same grid. The full-precision
weights follow ``L1 = CE_full + lambda R`` and the low-bit weights follow
``L2 = CE_low + lambda R``, each with its own optimizer.

Both gradients come from one backward pass of ``CE_full + CE_low + lambda R``: ``CE_low``
does not depend on the full-precision weights and ``CE_full`` not on the low-bit ones,
so the gradient of the sum with respect to each net equals the gradient of its own
objective.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

from tfq import layers as qlayers
from tfq.models import registry
from tfq.steps import after_batch, length_unknown

GUIDANCE_NORMS = ("mean", "sum")


def guidance_loss(fp_features, low_features, quantizers, norm="mean"):
    """The guidance loss R, averaged over the examples of the batch.

    Args:
      fp_features: feature maps ``mu`` of the full-precision net, one per layer.
      low_features: matching feature maps ``nu`` of the low-bit net.
      quantizers: per layer, a callable applied to ``mu`` (the low-bit activation
        quantizer) or None for no quantization.
      norm: ``"sum"``: ``1/2 sum (Q(mu) - nu)^2`` over each example's feature map, the
        paper's squared norm; ``"mean"``: the same with a mean over the map's elements,
        which keeps lambda comparable across layer sizes.

    Returns:
      A scalar: the sum over layers of the per-example R, averaged over the batch.
    """
    if norm not in GUIDANCE_NORMS:
        raise ValueError(f"guidance norm must be one of {GUIDANCE_NORMS}; got {norm!r}")
    total = 0.0
    for mu, nu, q in zip(fp_features, low_features, quantizers):
        target = q(mu) if q is not None else mu
        sq = tf.reshape(tf.square(target - nu), (tf.shape(nu)[0], -1))
        per_example = tf.reduce_sum(sq, 1) if norm == "sum" else tf.reduce_mean(sq, 1)
        total += 0.5 * tf.reduce_mean(per_example)
    return total


def _as_loss(loss):
    """A loss object or a Keras loss function, reduced like Keras' default reduction."""
    obj = keras.losses.get(loss)
    if isinstance(obj, keras.losses.Loss):
        return obj

    def reduced(y_true, y_pred, sample_weight=None):
        values = obj(y_true, y_pred)
        if sample_weight is not None:
            values = values * tf.cast(sample_weight, values.dtype)
        return tf.reduce_mean(values)

    return reduced


def _same_architecture(a, b):
    wa = [(w.path, tuple(w.shape)) for w in a.weights]
    wb = [(w.path, tuple(w.shape)) for w in b.weights]
    if [l.name for l in a.layers] != [l.name for l in b.layers] or [s for _, s in wa] != [
        s for _, s in wb
    ]:
        raise ValueError(
            f"the full-precision net {a.name!r} and the low-bit net {b.name!r} must have "
            "the same architecture (same layer names and weight shapes)"
        )


@keras.saving.register_keras_serializable(package="tfq")
class GuidedModel(keras.Model):
    """Co-trains a full-precision net and a low-bit net (the paper's Guided scheme).

    ``fit`` runs the joint step; ``evaluate``, ``predict``, ``__call__`` and ``save``
    act on the low-bit net (``save(..., with_fp=True)`` writes the whole pair, which
    ``keras.models.load_model`` restores as a ``GuidedModel``). Metrics: the compiled
    metrics of the low-bit net, plus ``fp_accuracy``, ``fp_loss`` (L1) and
    ``guidance_loss`` (R); ``loss`` is the low-bit objective L2, in training and in
    evaluation alike (``low_net.evaluate`` gives the plain cross-entropy).

    Attributes:
      wait_for_batch: whether the step waits for its batch (``tfq.steps``); ``fit``
        sets it from its data, True for a pipeline of unknown length.

    Args:
      fp_net: the full-precision ``keras.Model``.
      low_net: the low-bit ``keras.Model`` (same architecture).
      guidance_layers: layer names whose outputs are compared; default: the
        registered model's two guidance points (``tfq.models.guidance_layers``).
      guidance_weight: lambda.
      guidance_norm: ``"mean"`` or ``"sum"`` (see ``guidance_loss``).
      freeze_fp: keep the full-precision net fixed (weights and BatchNorm statistics),
        the paper's "without joint training" ablation.
      **kwargs: ``keras.Model`` arguments (name...).
    """

    def __init__(self, fp_net, low_net, guidance_layers=None, guidance_weight=0.5,
                 guidance_norm="mean", freeze_fp=False, **kwargs):
        kwargs.setdefault("name", "guided")
        super().__init__(**kwargs)
        _same_architecture(fp_net, low_net)
        if guidance_layers is None:
            try:
                guidance_layers = registry.guidance_layers(low_net)
            except ValueError:
                raise ValueError(
                    f"{low_net.name!r} is not a registered tfq model: pass "
                    "guidance_layers=[layer names] to GuidedModel"
                ) from None
        guidance_layers = list(guidance_layers)
        if not guidance_layers:
            raise ValueError("guidance_layers must name at least one layer")
        names = {l.name for l in low_net.layers}
        missing = [g for g in guidance_layers if g not in names]
        if missing:
            raise ValueError(f"guidance layers {missing} are not layers of {low_net.name!r}")
        if guidance_norm not in GUIDANCE_NORMS:
            raise ValueError(f"guidance_norm must be one of {GUIDANCE_NORMS}; got {guidance_norm!r}")
        self.fp_net = fp_net
        self.low_net = low_net
        self.guidance_layers = guidance_layers
        self.guidance_weight = float(guidance_weight)
        self.guidance_norm = guidance_norm
        self.freeze_fp = bool(freeze_fp)

        def taps(net):
            outs = [net.get_layer(g).output for g in guidance_layers] + list(net.outputs)
            return keras.Model(net.inputs, outs, name=f"{net.name}_taps")

        # Tap models share the nets' layers; kept out of Keras tracking so the
        # variables are saved once, under fp_net / low_net.
        object.__setattr__(self, "_taps", (taps(fp_net), taps(low_net)))
        self.fp_loss_tracker = keras.metrics.Mean(name="fp_loss")
        self.guidance_tracker = keras.metrics.Mean(name="guidance_loss")
        self.fp_accuracy = keras.metrics.SparseCategoricalAccuracy(name="fp_accuracy")
        self.fp_optimizer = None
        self._ce = None
        self.wait_for_batch = False
        self.built = True

    def _quantizers(self):
        out = []
        for g in self.guidance_layers:
            layer = self.low_net.get_layer(g)
            quantized = isinstance(layer, qlayers.QActivation) and not layer.quantizer.full_precision
            out.append(layer.quantizer if quantized else None)
        return out

    def compile(self, optimizer="sgd", loss="sparse_categorical_crossentropy", metrics=None,
                *, fp_optimizer=None, **kwargs):
        """Configures training.

        Args:
          optimizer: the low-bit net's optimizer (also ``self.optimizer``, the one
            Keras callbacks see).
          loss: the classification loss of both nets (default sparse categorical
            cross-entropy on the softmax outputs).
          metrics: metrics of the low-bit net.
          fp_optimizer: the full-precision net's optimizer; default: a fresh copy of
            ``optimizer``'s configuration.
          **kwargs: other ``keras.Model.compile`` arguments.
        """
        optimizer = keras.optimizers.get(optimizer)
        if fp_optimizer is None:
            fp_optimizer = optimizer.__class__.from_config(optimizer.get_config())
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)
        self.fp_optimizer = keras.optimizers.get(fp_optimizer)
        self._ce = _as_loss(loss)
        # Built here, each on its own net: Keras would otherwise give the low-bit
        # optimizer slots for every variable of the pair, and a lazily built second
        # optimizer cannot create its variables inside a tf.distribute replica step.
        self.optimizer.build(self.low_net.trainable_variables)
        self.fp_optimizer.build(self.fp_net.trainable_variables)

    def get_compile_config(self):
        # The pair of optimizers is rebuilt by whoever resumes training.
        return None

    def call(self, inputs, training=None):
        return self.low_net(inputs, training=training)

    def _num_replicas(self):
        return tf.distribute.get_strategy().num_replicas_in_sync

    def _forward(self, x, y, sample_weight, training):
        fp_taps, low_taps = self._taps
        fp_out = fp_taps(x, training=training and not self.freeze_fp)
        if self.freeze_fp:
            fp_out = [tf.stop_gradient(t) for t in fp_out]
        low_out = low_taps(x, training=training)
        r = guidance_loss(fp_out[:-1], low_out[:-1], self._quantizers(), self.guidance_norm)
        ce_fp = self._ce(y, fp_out[-1], sample_weight)
        ce_low = self._ce(y, low_out[-1], sample_weight)
        return fp_out[-1], low_out[-1], ce_fp, ce_low, r

    def fit(self, x=None, *args, **kwargs):
        """``keras.Model.fit``; the step waits for its batch when ``x``'s length is unknown.

        Keras takes a step past the end of a pass of unknown length (see ``tfq.steps``);
        the wait that prevents it costs seconds of graph building, so it is traced in
        only for such data, and the train function is rebuilt when that changes.
        """
        wait = length_unknown(x)
        if wait != self.wait_for_batch:
            self.wait_for_batch = wait
            self.train_function = None
        return super().fit(x, *args, **kwargs)

    def train_step(self, data):
        with after_batch(data) if self.wait_for_batch else contextlib.nullcontext():
            return self._train_step(data)

    train_step.waits_for_batch = True  # so tfq.steps.guard_train_step leaves it to fit

    def _train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        lam = self.guidance_weight
        with tf.GradientTape() as tape:
            fp_pred, low_pred, ce_fp, ce_low, r = self._forward(x, y, sample_weight, True)
            total = ce_low + lam * r if self.freeze_fp else ce_fp + ce_low + lam * r
            # Per-example mean over the global batch under tf.distribute: gradients
            # are summed across replicas.
            scaled = total / self._num_replicas()
        low_vars = self.low_net.trainable_variables
        fp_vars = [] if self.freeze_fp else self.fp_net.trainable_variables
        grads = tape.gradient(scaled, low_vars + fp_vars)
        self.optimizer.apply_gradients(zip(grads[: len(low_vars)], low_vars))
        if fp_vars:
            self.fp_optimizer.apply_gradients(zip(grads[len(low_vars):], fp_vars))
        return self._update_metrics(x, y, sample_weight, fp_pred, low_pred, ce_fp, ce_low, r)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        outs = self._forward(x, y, sample_weight, False)
        return self._update_metrics(x, y, sample_weight, *outs)

    def _update_metrics(self, x, y, sample_weight, fp_pred, low_pred, ce_fp, ce_low, r):
        lam = self.guidance_weight
        self._loss_tracker.update_state(ce_low + lam * r, sample_weight=tf.shape(low_pred)[0])
        self.fp_loss_tracker.update_state(ce_fp + lam * r, sample_weight=tf.shape(low_pred)[0])
        self.guidance_tracker.update_state(r, sample_weight=tf.shape(low_pred)[0])
        self.fp_accuracy.update_state(y, fp_pred, sample_weight)
        return self.compute_metrics(x, y, low_pred, sample_weight)

    def predict_step(self, data):
        x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self.low_net(x, training=False)

    def save(self, filepath, overwrite=True, zipped=None, *, with_fp=False, **kwargs):
        """Saves the low-bit net (default) or, with ``with_fp=True``, the whole pair."""
        if with_fp:
            return super().save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)
        return self.low_net.save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)

    def get_config(self):
        return {
            "name": self.name,
            "fp_net": keras.saving.serialize_keras_object(self.fp_net),
            "low_net": keras.saving.serialize_keras_object(self.low_net),
            "guidance_layers": list(self.guidance_layers),
            "guidance_weight": self.guidance_weight,
            "guidance_norm": self.guidance_norm,
            "freeze_fp": self.freeze_fp,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        fp_net = keras.saving.deserialize_keras_object(config.pop("fp_net"))
        low_net = keras.saving.deserialize_keras_object(config.pop("low_net"))
        return cls(fp_net, low_net, **config)

    @classmethod
    def from_model(cls, fp_model, w_bits, a_bits, **kwargs):
        """Pairs ``fp_model`` with a low-bit copy of itself (same initial weights).

        Args:
          fp_model: a tfq model (its current weights initialise both nets).
          w_bits: weight bits of the low-bit net.
          a_bits: activation bits of the low-bit net.
          **kwargs: ``GuidedModel`` arguments.
        """
        from tfq.precision import set_precision

        low = keras.models.clone_model(fp_model)
        low.set_weights(fp_model.get_weights())
        set_precision(low, w_bits, a_bits)
        return cls(fp_model, low, **kwargs)
