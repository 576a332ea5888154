"""Export of trained tfq models for deployment (TFLite, Edge TPU, packed weights).

``export_model`` turns a tfq model (a Keras model, a ``.keras`` file or a training
``model_dir``) into a float TFLite model, a full-integer int8 TFLite model that
reproduces the k-bit network, optionally the packed k-bit weights, and a report
(sizes, LiteRT latency, agreement with the Keras model, Edge TPU readiness).
``python -m tfq.export`` is the command line.

Modules: ``graph`` (Keras model -> export graph), ``tflite`` (float / int8
conversion), ``int8`` and ``requant`` (the exact int8 construction), ``packed``
(packed weights format), ``runtime`` (LiteRT inference and latency), ``evaluate``
(agreement figures), ``report`` (targets and table), ``edgetpu`` (compatibility).

Example::

    from tfq.export import export_model
    report = export_model("runs/demo", "export/", validation_data=(x, y), packed=True)
"""

from tfq.export.api import export_model
from tfq.export.graph import UnsupportedModelError
from tfq.export.packed import PackedFormatError
from tfq.export.packed import load as load_packed
from tfq.export.packed import save as save_packed
from tfq.export.report import format_table
from tfq.export.source import ExportError

__all__ = ["export_model", "ExportError", "UnsupportedModelError", "PackedFormatError",
           "load_packed", "save_packed", "format_table"]
