"""Models as chains of named stages, the zoo that builds them, and the cut that splits them.

    build_model("small_resnet") ─ StagedModel ─ cut("layer2") ─ (head, tail)
    cut_model(any_fx_traceable_model, "block3") ─ (head, tail)

Importing this package registers the zoo: ``small_resnet`` and ``small_resnet_cifar10``
always; ``efficientnet_lite0`` and ``resnet18`` / ``resnet50`` / ``mobilenet_v2`` when their
optional packages are installed (``list_models()`` says which).
"""

from splitexit.models import efficientnet_lite, small_resnet, torchvision_zoo  # registers
from splitexit.models.cut import cut_model, valid_split_points
from splitexit.models.registry import (
    ModelSpec,
    Preprocessing,
    WeightsInfo,
    build_model,
    get_spec,
    list_models,
    register_model,
)
from splitexit.models.staged import ClassifierHead, StagedModel

__all__ = [
    "ClassifierHead",
    "ModelSpec",
    "Preprocessing",
    "StagedModel",
    "WeightsInfo",
    "build_model",
    "cut_model",
    "efficientnet_lite",
    "get_spec",
    "list_models",
    "register_model",
    "small_resnet",
    "torchvision_zoo",
    "valid_split_points",
]
