"""Lowering of a tfq Keras model to the exporter's graph (a small IR).

Every exporter (float TFLite, int8 TFLite, packed weights) starts from this graph,
so they all read a Keras model the same way. A node holds *true* values: the same
numbers the Keras model computes, in numpy (weights already quantized by the
layer's own quantizer). Lowering also fuses what a deployed network fuses:

* ``BatchNormalization`` after a conv / FC layer -> per-channel ``scale`` / ``shift``
  of that layer (``y = scale * (x @ W) + shift``); the weights stay on their k-bit
  levels, which is what the int8 construction needs;
* the ``Scalar`` after the last FC layer -> the FC's ``scale`` / ``shift``;
* a ``QActivation`` (or ReLU) right after a conv / FC / Add -> that node's ``act``.

Supported layers: ``InputLayer``, ``InputQuantizer``, ``QConv2D`` / ``Conv2D``,
``QDense`` / ``Dense`` (2-D input), ``BatchNormalization`` (after a conv / FC),
``QActivation``, ``ReLU``, ``Activation`` (softmax or any elementwise Keras
activation), ``Scalar``, ``Add``, ``MaxPooling2D``, ``AveragePooling2D``,
``GlobalAveragePooling2D``, ``Flatten``, ``Dropout`` (identity at inference).
Anything else raises ``UnsupportedModelError`` naming the layer.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from tfq import layers as qlayers
from tfq import quantizers as qz


class UnsupportedModelError(ValueError):
    """The model contains something the exporter cannot lower."""


@dataclasses.dataclass
class Act:
    """A fused activation: ``bits`` < 32 is eq. (3); 32 uses ``fp`` (relu/clip/linear)."""

    bits: int
    fp: str = "relu"

    @property
    def quantized(self):
        return self.bits != qz.FULL_PRECISION

    @property
    def levels(self):
        """``n = 2^k - 1`` (the k-bit grid is ``i / n``)."""
        return 2**self.bits - 1


@dataclasses.dataclass
class Weights:
    """A conv / FC kernel as the Keras layer uses it.

    Attributes:
      values: float32 kernel after the layer's weight quantizer (HWIO or IO).
      bits: weight bit-width (32: full precision, ``codes`` is None).
      codes: for ``bits`` <= 8, the odd integers ``m`` with ``values == m / n``.
    """

    values: np.ndarray
    bits: int
    codes: np.ndarray | None = None

    @property
    def levels(self):
        return 2**self.bits - 1

    @property
    def exact_int8(self):
        """True when the codes fit int8 (k <= 7): the int8 weights can be exact."""
        return self.codes is not None and self.levels <= 127


@dataclasses.dataclass
class Node:
    """One op of the export graph.

    Attributes:
      name: unique name (the Keras layer whose output this node computes).
      kind: ``input``, ``input_quant``, ``conv``, ``dense``, ``act``, ``activation``,
        ``softmax``, ``add``, ``maxpool``, ``avgpool``, ``gap``, ``flatten``.
      inputs: names of the input nodes.
      shape: output shape, batch 1.
      params: kind-specific parameters (see ``lower``).
      keras_name: the Keras layer whose output equals this node's output.
    """

    name: str
    kind: str
    inputs: list
    shape: tuple
    params: dict
    keras_name: str

    @property
    def act(self):
        return self.params.get("act")


@dataclasses.dataclass
class Graph:
    """Nodes in topological order; ``output`` is the name of the output node."""

    nodes: dict
    input: str
    output: str
    model_name: str

    def consumers(self, name):
        return [n for n in self.nodes.values() if name in n.inputs]

    def __getitem__(self, name):
        return self.nodes[name]

    def __iter__(self):
        return iter(self.nodes.values())


def _batch1(shape):
    shape = tuple(shape)
    if any(d is None for d in shape[1:]):
        raise UnsupportedModelError(
            f"the model input must have a static shape; got {shape} (rebuild the model "
            "with a fixed input_shape)")
    return (1,) + tuple(int(d) for d in shape[1:])


def quantized_kernel(layer):
    """``Weights`` of a conv / dense layer: its kernel through its own quantizer."""
    bits = getattr(layer, "w_bits", qz.FULL_PRECISION)
    kernel = layer.kernel
    if bits == qz.FULL_PRECISION:
        return Weights(np.asarray(keras.ops.convert_to_numpy(kernel), np.float32), bits)
    values = np.asarray(keras.ops.convert_to_numpy(layer.kernel_quantizer(kernel)), np.float32)
    n = 2**bits - 1
    codes = np.round(values.astype(np.float64) * n)
    if np.max(np.abs(codes - values * n), initial=0.0) > 1e-3:
        raise UnsupportedModelError(
            f"layer {layer.name!r}: quantized weights are not on the {bits}-bit grid")
    return Weights(values, bits, codes.astype(np.int32))


def _bn_affine(layer):
    """(scale, shift) float64 of an inference-mode BatchNormalization on the last axis."""
    axis = layer.axis if isinstance(layer.axis, int) else layer.axis[0]
    if axis not in (-1, len(layer.input.shape) - 1):
        raise UnsupportedModelError(
            f"BatchNormalization {layer.name!r}: only the channel (last) axis is supported")
    mean = np.asarray(layer.moving_mean.numpy(), np.float64)
    var = np.asarray(layer.moving_variance.numpy(), np.float64)
    gamma = np.asarray(layer.gamma.numpy(), np.float64) if layer.scale else np.ones_like(mean)
    beta = np.asarray(layer.beta.numpy(), np.float64) if layer.center else np.zeros_like(mean)
    g = gamma / np.sqrt(var + layer.epsilon)
    return g, beta - mean * g


def _activation_name(layer):
    fn = layer.activation
    return getattr(fn, "__name__", str(fn))


def _check_no_activation(layer):
    if _activation_name(layer) != "linear":
        raise UnsupportedModelError(
            f"layer {layer.name!r}: a fused activation ({_activation_name(layer)}) is not "
            "supported; use a separate activation layer")


def _padding(layer):
    return layer.padding.upper()


def _lower_layer(layer, inputs, shape):
    """(kind, params) of one Keras layer."""
    if isinstance(layer, keras.layers.InputLayer):
        return "input", {}
    if isinstance(layer, qlayers.InputQuantizer):
        if layer.bits == qz.FULL_PRECISION:
            return "identity", {}
        return "input_quant", {"bits": layer.bits, "low": layer.low, "high": layer.high}
    if isinstance(layer, keras.layers.Conv2D) and type(layer).__name__ in ("Conv2D", "QConv2D"):
        _check_no_activation(layer)
        if layer.groups != 1 or layer.data_format != "channels_last":
            raise UnsupportedModelError(
                f"conv {layer.name!r}: only groups=1, channels_last convolutions are supported")
        w = quantized_kernel(layer)
        cout = w.values.shape[-1]
        bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else np.zeros(cout)
        return "conv", {
            "weights": w, "scale": np.ones(cout), "shift": bias,
            "strides": tuple(layer.strides), "padding": _padding(layer),
            "dilation": tuple(layer.dilation_rate), "act": None,
        }
    if isinstance(layer, keras.layers.Dense) and type(layer).__name__ in ("Dense", "QDense"):
        _check_no_activation(layer)
        if len(layer.input.shape) != 2:
            raise UnsupportedModelError(
                f"dense {layer.name!r}: only 2-D inputs are supported (add a Flatten)")
        w = quantized_kernel(layer)
        cout = w.values.shape[-1]
        bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else np.zeros(cout)
        return "dense", {"weights": w, "scale": np.ones(cout), "shift": bias, "act": None,
                         "bn": False}
    if isinstance(layer, keras.layers.BatchNormalization):
        return "bn", dict(zip(("scale", "shift"), _bn_affine(layer)))
    if isinstance(layer, qlayers.QActivation):
        return "act", {"act": Act(layer.bits, layer.fp_activation)}
    if isinstance(layer, keras.layers.ReLU):
        if layer.max_value is not None or layer.negative_slope or layer.threshold:
            raise UnsupportedModelError(f"ReLU {layer.name!r}: only the plain ReLU is supported")
        return "act", {"act": Act(qz.FULL_PRECISION, "relu")}
    if isinstance(layer, keras.layers.Activation):
        name = _activation_name(layer)
        if name == "softmax":
            return "softmax", {}
        if name == "relu":
            return "act", {"act": Act(qz.FULL_PRECISION, "relu")}
        if name == "linear":
            return "identity", {}
        return "activation", {"fn": name}
    if isinstance(layer, qlayers.Scalar):
        s = float(layer.scale.numpy())
        return "scalar", {"scale": s}
    if isinstance(layer, keras.layers.Add):
        if len(inputs) != 2:
            raise UnsupportedModelError(f"Add {layer.name!r}: only two inputs are supported")
        return "add", {"act": None}
    if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        kind = "maxpool" if isinstance(layer, keras.layers.MaxPooling2D) else "avgpool"
        return kind, {"pool": tuple(layer.pool_size), "strides": tuple(layer.strides),
                      "padding": _padding(layer)}
    if isinstance(layer, keras.layers.GlobalAveragePooling2D):
        if layer.data_format != "channels_last":
            raise UnsupportedModelError(f"{layer.name!r}: only channels_last is supported")
        return "gap", {"keepdims": bool(layer.keepdims)}
    if isinstance(layer, keras.layers.Flatten):
        return "flatten", {}
    if isinstance(layer, keras.layers.Dropout):
        return "identity", {}
    raise UnsupportedModelError(
        f"layer {layer.name!r} of type {type(layer).__name__} is not supported by tfq.export "
        "(supported: InputQuantizer, QConv2D/Conv2D, QDense/Dense, BatchNormalization, "
        "QActivation, ReLU, Activation, Scalar, Add, Max/AveragePooling2D, "
        "GlobalAveragePooling2D, Flatten, Dropout)")


def _raw_nodes(model):
    """Keras layers -> unfused nodes, in topological order."""
    if not isinstance(model, keras.Model) or not hasattr(model, "inputs") or \
            model.inputs is None:
        raise UnsupportedModelError("only functional / Sequential Keras models can be exported")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedModelError(
            f"the model must have one input and one output; got {len(model.inputs)} inputs "
            f"and {len(model.outputs)} outputs")
    nodes = {}
    order = []
    seen = set()

    def visit(tensor):
        layer, node_index, _ = tensor._keras_history
        if layer.name in seen:
            return layer.name
        if len(layer._inbound_nodes) > 1:
            raise UnsupportedModelError(f"layer {layer.name!r} is used more than once")
        if isinstance(layer, keras.Model):
            raise UnsupportedModelError(
                f"nested model {layer.name!r} is not supported; flatten the model first")
        inbound = layer._inbound_nodes[node_index]
        inputs = [visit(t) for t in inbound.input_tensors]
        seen.add(layer.name)
        kind, params = _lower_layer(layer, inputs, inbound.output_tensors[0].shape)
        shape = _batch1(inbound.output_tensors[0].shape)
        nodes[layer.name] = Node(layer.name, kind, inputs, shape, params, layer.name)
        order.append(layer.name)
        return layer.name

    out = visit(model.outputs[0])
    return {name: nodes[name] for name in order}, out


def _replace_input(nodes, old, new):
    for n in nodes.values():
        n.inputs = [new if i == old else i for i in n.inputs]


def _only_consumer(nodes, name):
    users = [n for n in nodes.values() if name in n.inputs]
    return users[0] if len(users) == 1 else None


def _absorb(nodes, producer, consumer):
    """Deletes ``consumer``; ``producer`` now computes its output (and takes its name)."""
    producer.keras_name = consumer.keras_name
    del nodes[consumer.name]
    _replace_input(nodes, consumer.name, producer.name)


def _fuse(nodes, output):
    """Identity removal, BN / Scalar / activation fusion. Returns the new output name."""
    for n in list(nodes.values()):
        if n.kind == "identity":
            (src,) = n.inputs
            if output == n.name:
                output = src
                nodes[src].keras_name = n.keras_name
            del nodes[n.name]
            _replace_input(nodes, n.name, src)
    for n in list(nodes.values()):
        if n.name not in nodes or n.kind not in ("conv", "dense"):
            continue
        user = _only_consumer(nodes, n.name)
        if user is not None and user.kind == "bn" and n.name != output:
            n.params["scale"] = n.params["scale"] * user.params["scale"]
            n.params["shift"] = n.params["shift"] * user.params["scale"] + user.params["shift"]
            n.params["bn"] = True
            output = n.name if output == user.name else output
            _absorb(nodes, n, user)
            user = _only_consumer(nodes, n.name)
        if (n.kind == "dense" and user is not None and user.kind == "scalar"
                and n.name != output):
            s = user.params["scale"]
            n.params["scale"] = n.params["scale"] * s
            n.params["shift"] = n.params["shift"] * s
            output = n.name if output == user.name else output
            _absorb(nodes, n, user)
    for n in list(nodes.values()):
        if n.name not in nodes or n.kind not in ("conv", "dense", "add"):
            continue
        user = _only_consumer(nodes, n.name)
        if user is not None and user.kind == "act" and n.name != output:
            n.params["act"] = user.params["act"]
            output = n.name if output == user.name else output
            _absorb(nodes, n, user)
    for n in nodes.values():
        if n.kind in ("bn", "scalar"):
            raise UnsupportedModelError(
                f"layer {n.name!r} ({'BatchNormalization' if n.kind == 'bn' else 'Scalar'}) "
                "must directly follow a conv / dense layer that has no other consumer")
    return output


def lower(model):
    """Lowers a Keras model to a ``Graph``.

    Args:
      model: a functional (or Sequential) Keras model with one input and one output.

    Returns:
      The ``Graph``.

    Raises:
      UnsupportedModelError: a layer or a connection the exporter cannot handle.
    """
    nodes, output = _raw_nodes(model)
    inputs = [n for n in nodes.values() if n.kind == "input"]
    if len(inputs) != 1:
        raise UnsupportedModelError("the model must have exactly one InputLayer")
    output = _fuse(nodes, output)
    return Graph(nodes, inputs[0].name, output, model.name)
