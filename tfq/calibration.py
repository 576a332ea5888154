"""Fit a ReLU network's activations into [0, 1] before quantizing them, exactly.

A full-precision net trained with ReLU has activations far above 1; the k-bit
activation quantizer (eq. 3) clips them to [0, 1], so the first quantized stage
starts from a very different function (method.md section 6: even 8 bits fall to
chance). But ReLU is positively homogeneous, every conv / hidden FC is followed by
BatchNorm, and DoReFa weights are normalised per tensor, so dividing every
BatchNorm's output by one scale ``s`` scales every activation by ``1/s`` and leaves
the function unchanged once the classifier's kernel is multiplied by ``s``:

- BatchNorm ``gamma`` and ``beta`` are divided by ``s``;
- a BatchNorm whose input depends on a scaled activation also gets its moving mean
  divided by ``s``, its moving variance by ``s^2`` and its epsilon by ``s^2``;
- a conv / FC not followed by BatchNorm (the classifier) gets its kernel times ``s``.

``s`` is chosen from data: the median over activation layers of each layer's
``percentile``-th percentile of its positive outputs, so that after rescaling a
typical layer's activations fill [0, 1] and only the top 1% clip.
"""

from __future__ import annotations

import keras
import numpy as np

from tfq import layers as qlayers

DEFAULT_PERCENTILE = 99.0


def _producer(tensor):
    return tensor._keras_history.operation


def _inputs_of(layer):
    """The input tensors of ``layer``'s (single) call in its functional model."""
    node = layer._inbound_nodes[0]
    return list(node.input_tensors)


def _depends_on_activation(tensor, memo):
    """True when ``tensor`` is computed from the output of a QActivation."""
    layer = _producer(tensor)
    if layer.name in memo:
        return memo[layer.name]
    if isinstance(layer, qlayers.QActivation):
        result = True
    elif isinstance(layer, (keras.layers.InputLayer, qlayers.InputQuantizer)) or not layer._inbound_nodes:
        result = False
    else:
        result = any(_depends_on_activation(t, memo) for t in _inputs_of(layer))
    memo[layer.name] = result
    return result


def _consumers(model):
    out = {}
    for layer in model.layers:
        if not layer._inbound_nodes:
            continue
        for t in _inputs_of(layer):
            out.setdefault(_producer(t).name, []).append(layer)
    return out


def applicable(model):
    """True for a full-precision ReLU tfq model (every activation layer at 32 bits)."""
    acts = [l for l in model.layers if isinstance(l, qlayers.QActivation)]
    return bool(acts) and all(l.quantizer.full_precision and l.fp_activation == "relu" for l in acts)


def activation_scale(model, images, percentile=DEFAULT_PERCENTILE):
    """The scale ``s``: median over activation layers of their positive outputs'
    ``percentile``-th percentile, in inference mode on ``images``.

    Args:
      model: a functional tfq model.
      images: an array or an iterable of batches (``(images, labels)`` tuples work).
      percentile: in (0, 100].
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100]; got {percentile}")
    acts = [l for l in model.layers if isinstance(l, qlayers.QActivation)]
    probe = keras.Model(model.inputs, [l.output for l in acts])
    batches = [images] if isinstance(images, np.ndarray) else images
    values = [[] for _ in acts]
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        for i, o in enumerate(probe(x, training=False)):
            o = np.asarray(o)
            values[i].append(o[o > 0])
    per_layer = [np.percentile(np.concatenate(v), percentile) for v in values if sum(len(a) for a in v)]
    if not per_layer:
        raise ValueError("no positive activations: cannot choose a scale")
    return float(np.median(per_layer))


def rescale_activations(model, scale):
    """Divides every activation of a ReLU ``model`` by ``scale``, keeping its function.

    Args:
      model: a functional tfq model whose activations are 32-bit ReLU.
      scale: ``s`` > 0.
    """
    if not scale > 0:
        raise ValueError(f"scale must be > 0; got {scale}")
    if not applicable(model):
        raise ValueError(f"{model.name}: rescaling needs every activation layer at 32-bit ReLU")
    memo, consumers = {}, _consumers(model)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta = layer.gamma, layer.beta
            if gamma is None or beta is None:
                raise ValueError(f"{layer.name}: BatchNorm without scale/center cannot be rescaled")
            gamma.assign(gamma / scale)
            beta.assign(beta / scale)
            if _depends_on_activation(_inputs_of(layer)[0], memo):
                layer.moving_mean.assign(layer.moving_mean / scale)
                layer.moving_variance.assign(layer.moving_variance / scale**2)
                layer.epsilon = layer.epsilon / scale**2
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            normalised = any(isinstance(c, keras.layers.BatchNormalization)
                             for c in consumers.get(layer.name, []))
            if not normalised and _depends_on_activation(_inputs_of(layer)[0], memo):
                layer.kernel.assign(layer.kernel * scale)


def calibrate_activation_range(model, images, percentile=DEFAULT_PERCENTILE):
    """Chooses ``s`` on ``images`` and rescales ``model`` in place (ReLU FP models).

    Returns:
      The scale applied, or 1.0 when the model is not a full-precision ReLU net
      (clip-activation nets already live in [0, 1]; quantized nets are left alone).
    """
    if not applicable(model):
        return 1.0
    scale = activation_scale(model, images, percentile)
    rescale_activations(model, scale)
    return scale
