"""The model zoo moved to :mod:`sparsetrain.models` (it serves export and the commands, not only the trainer).

This module re-exports it so that ``from sparsetrain.train.models import build_model`` keeps working.
"""

from ..models import (  # noqa: F401
    MODEL_REGISTRY,
    MODELS,
    ConvBase,
    LeNet5,
    MobileNetV1,
    ResNetCifar,
    WideResNet,
    __all__,  # noqa: F401
    build_model,
    check_model_name,
    list_models,
    mlp,
    model_spec,
    register_model,
)
