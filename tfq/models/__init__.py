"""Model registry: ``build(name, ...)``, ``names()``, ``guidance_layers(model)``."""

from tfq.models import alexnet as _alexnet  # noqa: F401  (registers its builders)
from tfq.models import resnet as _resnet  # noqa: F401
from tfq.models.registry import ModelSpec, build, guidance_layers, names, register, spec

__all__ = ["build", "names", "guidance_layers", "register", "spec", "ModelSpec"]
