"""How closely the exported TFLite models reproduce the Keras model.

Figures (on a validation set):

* top-1 agreement of the float and int8 TFLite models with the Keras model (and of
  int8 with float);
* for k-bit models, the share of the values of the last quantized activation
  tensor that have the same k-bit level in TFLite as in Keras. The tensor is read
  by giving a copy of the model one extra output (the shipped file is not
  changed); the interpreter then runs with its default delegate (XNNPACK), as a
  user's would.
"""

from __future__ import annotations

import keras
import numpy as np
from tensorflow.lite.tools import flatbuffer_utils

from tfq.export import int8 as int8_lib
from tfq.export.runtime import Runner


def feed(model, x):
    """``x`` in the input structure ``model`` was built with (tensor or [tensor])."""
    return [x] if isinstance(model.input, (list, tuple)) else x


def submodel(model, layer_name):
    """The model from its input to the output of ``layer_name``."""
    return keras.Model(model.input, model.get_layer(layer_name).output)


def predict(model, images, batch_size=256):
    """``model`` on ``images`` in eager batches (no per-model ``predict`` tracing)."""
    outs = [np.asarray(keras.ops.convert_to_numpy(
        model(feed(model, images[i:i + batch_size]), training=False)))
        for i in range(0, len(images), batch_size)]
    return np.concatenate(outs)


def last_quantized_activation(graph):
    """(index, node) of the last node with a k-bit activation, or (None, None)."""
    found = [(i, n) for i, n in enumerate(graph) if n.act is not None and n.act.quantized]
    return found[-1] if found else (None, None)


def with_probe(tflite_bytes, tag):
    """A copy of the model with the tensor computed by op ``tag`` as a second output.

    Returns:
      (bytes, (scale, zero point) of that tensor) or (None, None) when not found.
    """
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    found = int8_lib.find_ops(model, {tag})
    if tag not in found:
        return None, None
    sg = model.subgraphs[0]
    index = int(sg.operators[found[tag]].outputs[0])
    q = sg.tensors[index].quantization
    params = (float(q.scale[0]), int(q.zeroPoint[0])) if q is not None and \
        q.scale is not None and len(q.scale) else None
    sg.outputs = np.append(np.asarray(sg.outputs, np.int32), index).astype(np.int32)
    model.signatureDefs = []  # the probe copy is run by output index only
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), params


def logits_node(graph):
    """(index, node) of the classifier whose output feeds the softmax, or (None, None)."""
    for i, node in enumerate(graph):
        users = graph.consumers(node.name)
        if node.kind == "dense" and len(users) == 1 and users[0].kind == "softmax":
            return i, node
    return None, None


def _logit_step(tflite_bytes, tag):
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite_bytes))
    found = int8_lib.find_ops(model, {tag})
    if tag not in found:
        return None
    sg = model.subgraphs[0]
    q = sg.tensors[sg.operators[found[tag]].outputs[0]].quantization
    return float(q.scale[0]) if q is not None and q.scale is not None and len(q.scale) else None


def _levels_from_probe(raw, params, n):
    if params is None:  # float tensor: the k-bit value itself
        return np.round(raw.astype(np.float64) * n).astype(np.int64)
    scale, zp = params
    # k-bit activations are stored as 6 * a with scale 6 / n: the code is the level.
    return np.round((raw.astype(np.int64) - zp) * scale * n / int8_lib.ACT_REP).astype(np.int64)


def agreement(model, graph, images, labels=None, *, float_bytes=None, int8_bytes=None,
              input_quant=None, threads=1, batch_size=256):
    """Agreement figures of the exported models with ``model`` on ``images``.

    Returns:
      dict with ``examples``, ``keras_top1_accuracy`` (with labels), and per exported
      model (``float`` / ``int8``): ``top1_agreement``, ``top1_accuracy``,
      ``max_abs_output_diff``, and for k-bit models ``same_level`` (share of the
      last quantized activation's values on the Keras level), plus
      ``int8_vs_float_top1``.
    """
    keras_out = predict(model, images, batch_size)
    keras_top = keras_out.reshape(len(images), -1).argmax(axis=1)
    result = {"examples": int(len(images))}
    if labels is not None:
        result["keras_top1_accuracy"] = float(np.mean(keras_top == labels))
    index, last = last_quantized_activation(graph)
    keras_levels = None
    if last is not None:
        probe = submodel(model, last.keras_name)
        act = predict(probe, images, batch_size)
        n = last.act.levels
        keras_levels = np.round(act.astype(np.float64) * n).astype(np.int64)
        result["last_quantized_activation"] = {"layer": last.keras_name,
                                               "bits": last.act.bits,
                                               "values": int(keras_levels.size)}
    tops = {}
    for kind, data in (("float", float_bytes), ("int8", int8_bytes)):
        if data is None:
            continue
        params = None
        if last is not None:
            probed, params = with_probe(data, int8_lib.tag(index))
            data = probed if probed is not None else data
        runner = Runner(data, threads=threads,
                        input_quant=input_quant if kind == "int8" else None)
        out, raws = runner.predict(images)
        top = out.reshape(len(images), -1).argmax(axis=1)
        tops[kind] = top
        entry = {"top1_agreement": float(np.mean(top == keras_top)),
                 "max_abs_output_diff": float(np.max(np.abs(out.reshape(keras_out.shape)
                                                            - keras_out)))}
        if labels is not None:
            entry["top1_accuracy"] = float(np.mean(top == labels))
        if last is not None and len(raws) > 1:
            levels = _levels_from_probe(raws[1], params, last.act.levels)
            entry["same_level"] = float(np.mean(levels.reshape(keras_levels.shape)
                                                == keras_levels))
            entry["level_mismatches"] = int(np.sum(levels.reshape(keras_levels.shape)
                                                   != keras_levels))
        result[kind] = entry
    logit_index, logit_node = logits_node(graph)
    if "int8" in tops and logit_node is not None:
        step = _logit_step(int8_bytes, int8_lib.tag(logit_index))
        logit_model = submodel(model, logit_node.keras_name)
        z = np.sort(predict(logit_model, images, batch_size), axis=1)
        gap = z[:, -1] - z[:, -2]
        wrong = tops["int8"] != keras_top
        if step is not None:
            # A disagreement is a near tie when the Keras top-2 logits are closer than two
            # int8 logit steps: the int8 logits cannot order them.
            result["int8"].update(logit_step=step, top1_disagreements=int(wrong.sum()),
                                  disagreements_near_tie=int(np.sum(wrong & (gap < 2 * step))))
    if "float" in tops and "int8" in tops:
        result["int8_vs_float_top1"] = float(np.mean(tops["float"] == tops["int8"]))
    return result
