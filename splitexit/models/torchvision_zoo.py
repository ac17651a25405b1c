"""torchvision's ResNet-18/50 and MobileNetV2 as StagedModels (when torchvision is installed).

    ResNet:       x ─ stem ─ layer1 ─ layer2 ─ layer3 ─ layer4 ─ classifier
                      conv1·bn1·relu·maxpool                    avgpool·flatten·fc
    MobileNetV2:  x ─ stem ─ stage1 ─ … ─ stage7 ─ head ─ classifier
                      features[0]  features[1..17] by       features[18]  pool·dropout·fc
                                   architecture-table row

BottleFit and head-network distillation cut ResNets at ``layer1``: the learned bottleneck
replaces ``stem..layer1`` on the device and the tail resumes at ``layer2``, hence
``default_split="layer1"``. The stages reuse torchvision's module objects.

``pretrained=True`` never downloads: it loads torchvision's weights only if they already sit
in the torch hub cache (``torch.hub.get_dir()/checkpoints``), or from ``weights_path=``.
The metadata below is copied from torchvision's weight enums (a test keeps it in sync), so
registering these entries does not import torchvision.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitexit.models.registry import (
    ModelSpec,
    Preprocessing,
    WeightsInfo,
    register_model,
    register_unavailable,
)
from splitexit.models.staged import ClassifierHead, StagedModel

__all__ = ["TorchvisionWeights", "mobilenet_v2", "resnet18", "resnet50"]

IMAGENET = Preprocessing(
    size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels=3
)
RESNET_STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "classifier")
MOBILENET_V2_STAGES = ("stem", *(f"stage{i}" for i in range(1, 8)), "head", "classifier")
# Inverted-residual blocks per row of the MobileNetV2 table (t, c, n, s): the n column.
_MOBILENET_V2_REPEATS = (1, 2, 3, 4, 3, 3, 1)


@dataclass(frozen=True)
class TorchvisionWeights:
    """Which torchvision weight enum a zoo entry uses, and what it says about them."""

    enum: str  # e.g. "ResNet18_Weights.IMAGENET1K_V1"
    url: str
    top1: float
    num_params: int
    recipe: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def info(self) -> WeightsInfo:
        return WeightsInfo(
            source=f"torchvision {self.enum}",
            dataset="ImageNet-1K",
            top1=self.top1,
            num_params=self.num_params,
            license="BSD-3-Clause (torchvision); ImageNet-1K terms apply to the weights",
            url=self.url,
            notes=f"recipe: {self.recipe}",
        )


WEIGHTS = {
    "resnet18": TorchvisionWeights(
        enum="ResNet18_Weights.IMAGENET1K_V1",
        url="https://download.pytorch.org/models/resnet18-f37072fd.pth",
        top1=69.758,
        num_params=11_689_512,
        recipe="https://github.com/pytorch/vision/tree/main/references/classification#resnet",
    ),
    "resnet50": TorchvisionWeights(
        enum="ResNet50_Weights.IMAGENET1K_V2",
        url="https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
        top1=80.858,
        num_params=25_557_032,
        recipe="https://github.com/pytorch/vision/issues/3995#issuecomment-1013906621",
    ),
    "mobilenet_v2": TorchvisionWeights(
        enum="MobileNet_V2_Weights.IMAGENET1K_V2",
        url="https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth",
        top1=72.154,
        num_params=3_504_872,
        recipe="https://github.com/pytorch/vision/issues/3995#new-recipe-with-reg-tuning",
    ),
}


def _load_state_dict(name: str, net: nn.Module, weights_path: str | Path | None) -> None:
    """Load ``name``'s weights from ``weights_path`` or the hub cache; never download."""
    weights = WEIGHTS[name]
    if weights_path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.filename
        if not cached.is_file():
            raise FileNotFoundError(
                f"pretrained weights for {name} ({weights.enum}) are not in the torch hub cache "
                f"({cached}) and splitexit never downloads weights. Either fetch them on a "
                f"machine with network access (torchvision.models.{name}(weights="
                f"'{weights.enum.split('.')[-1]}') saves them to that cache) and copy "
                f"{weights.filename} there, or pass weights_path= to a local state_dict file"
            )
        weights_path = cached
    net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))


def _torchvision_net(
    name: str, pretrained: bool, num_classes: int, weights_path: str | Path | None, **kwargs: Any
) -> Any:  # a torchvision model; torchvision ships no types, its attributes are untyped
    models = importlib.import_module("torchvision.models")
    load = pretrained or weights_path is not None
    net = getattr(models, name)(weights=None, num_classes=1000 if load else num_classes, **kwargs)
    if load:
        _load_state_dict(name, net, weights_path)
    return net


def _resnet(
    name: str,
    pretrained: bool,
    num_classes: int,
    weights_path: str | Path | None,
    **kwargs: Any,
) -> StagedModel:
    net = _torchvision_net(name, pretrained, num_classes, weights_path, **kwargs)
    classifier = ClassifierHead(net.fc)
    model = StagedModel(
        OrderedDict(
            stem=nn.Sequential(
                OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool)
            ),
            layer1=net.layer1,
            layer2=net.layer2,
            layer3=net.layer3,
            layer4=net.layer4,
            classifier=classifier,
        ),
        input_shape=(3, 224, 224),
    )
    if classifier.num_classes != num_classes:
        classifier.reset(num_classes)
    return model


def resnet18(
    *,
    pretrained: bool = False,
    num_classes: int = 1000,
    weights_path: str | Path | None = None,
    **kwargs: Any,
) -> StagedModel:
    """torchvision ResNet-18 with stages ``stem, layer1..layer4, classifier``."""
    return _resnet("resnet18", pretrained, num_classes, weights_path, **kwargs)


def resnet50(
    *,
    pretrained: bool = False,
    num_classes: int = 1000,
    weights_path: str | Path | None = None,
    **kwargs: Any,
) -> StagedModel:
    """torchvision ResNet-50 with stages ``stem, layer1..layer4, classifier``."""
    return _resnet("resnet50", pretrained, num_classes, weights_path, **kwargs)


def mobilenet_v2(
    *,
    pretrained: bool = False,
    num_classes: int = 1000,
    weights_path: str | Path | None = None,
    **kwargs: Any,
) -> StagedModel:
    """torchvision MobileNetV2 with stages ``stem, stage1..stage7, head, classifier``.

    ``stageK`` holds the inverted-residual blocks of row K of the architecture table
    (channels 16, 24, 32, 64, 96, 160, 320 at strides 2, 4, 8, 16, 16, 32, 32).
    """
    net = _torchvision_net("mobilenet_v2", pretrained, num_classes, weights_path, **kwargs)
    features = list(net.features)
    if len(features) != 2 + sum(_MOBILENET_V2_REPEATS):
        raise ValueError("mobilenet_v2 stages need the default inverted_residual_setting")
    stages: OrderedDict[str, nn.Module] = OrderedDict(stem=features[0])
    start = 1
    for index, repeats in enumerate(_MOBILENET_V2_REPEATS, start=1):
        stages[f"stage{index}"] = nn.Sequential(*features[start : start + repeats])
        start += repeats
    stages["head"] = features[-1]
    dropout, fc = net.classifier
    stages["classifier"] = classifier = ClassifierHead(fc, dropout=dropout.p)
    model = StagedModel(stages, input_shape=(3, 224, 224))
    if classifier.num_classes != num_classes:
        classifier.reset(num_classes)
    return model


_BUILDERS = {"resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2}
_ENTRIES = {
    "resnet18": (RESNET_STAGES, "layer1", ("layer1", "layer2", "layer3"), "ResNet-18"),
    "resnet50": (RESNET_STAGES, "layer1", ("layer1", "layer2", "layer3"), "ResNet-50"),
    "mobilenet_v2": (
        MOBILENET_V2_STAGES,
        "stage3",
        ("stage3", "stage4", "stage5"),
        "MobileNetV2",
    ),
}

if importlib.util.find_spec("torchvision") is not None:
    for _name, (_stages, _split, _exits, _title) in _ENTRIES.items():
        _weights = WEIGHTS[_name]
        register_model(
            ModelSpec(
                name=_name,
                builder=_BUILDERS[_name],
                preprocessing=IMAGENET,
                split_points=_stages[:-1],
                default_split=_split,
                exit_points=_exits,
                num_classes=1000,
                description=f"torchvision {_title} ({_weights.num_params / 1e6:.1f}M params), "
                "ImageNet, 224x224 RGB",
                weights=_weights.info(),
            )
        )
else:
    for _name in _ENTRIES:
        register_unavailable(_name, "torchvision is not installed: pip install 'splitexit[vision]'")
