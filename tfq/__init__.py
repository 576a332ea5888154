"""tfq: low-bit (DoReFa-style) CNNs in Keras 3, trained with TS, PQ and Guided schemes.

Implements Zhuang et al., "Towards Effective Low-bitwidth Convolutional Neural
Networks" (CVPR 2018).
"""

import os as _os

# TensorFlow's C++ start-up chatter buries the messages users need; let users opt back in.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tfq import layers, models, precision, quantizers, steps  # noqa: E402
from tfq.layers import InputQuantizer, QActivation, QConv2D, QDense, Scalar  # noqa: E402
from tfq.precision import Precision, get_precision, set_precision  # noqa: E402
from tfq.guided import GuidedModel  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "layers", "models", "precision", "quantizers", "steps",
    "QConv2D", "QDense", "QActivation", "InputQuantizer", "Scalar",
    "Precision", "set_precision", "get_precision", "GuidedModel",
]
