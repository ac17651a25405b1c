"""A small residual CNN for 28x28 / 32x32 images: the embedded default model.

    x (C×28×28) ─ stem ─ layer1 ─ layer2 ─ layer3 ─ classifier ─ logits
                  w×28²  w×14²    2w×7²    4w×7²    pool·fc

``stem`` is conv-bn-relu at full resolution; each ``layerK`` is a stack of basic residual
blocks (two 3x3 convs, batch norm, ReLU, identity or 1x1 projection shortcut) whose first
block changes the stride. Sizes are for a 28x28 input; a 32x32 input gives 32, 16, 8, 8.
With ``width=32`` it has about 0.3M parameters and trains to >= 92.5% on Fashion-MNIST
with an ordinary recipe (SGD or AdamW, a few epochs, light augmentation).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from splitexit.models.registry import ModelSpec, Preprocessing, register_model
from splitexit.models.staged import ClassifierHead, StagedModel

__all__ = ["BasicBlock", "small_resnet"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers plus a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x))``.

    The shortcut is the identity, or a strided 1x1 conv + bn when the shape changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_channels),
                )
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        y: torch.Tensor = self.relu2(out + self.shortcut(x))
        return y


def _layer(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def small_resnet(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 32,
    blocks: Sequence[int] = (1, 1, 1),
    layer3_stride: int = 1,
    input_size: int | tuple[int, int] = 28,
    zero_init_residual: bool = False,
) -> StagedModel:
    """Build the small ResNet as a :class:`StagedModel`.

    Stages ``stem`` (``width``, full res), ``layer1`` (``width``, /2), ``layer2`` (``2*width``,
    /4), ``layer3`` (``4*width``, /``4*layer3_stride``), ``classifier``.
    ``blocks`` is the number of residual blocks in layer1..layer3. ``input_size`` only records
    the expected input (the classifier pools globally, so other sizes run too).
    ``zero_init_residual`` starts each block's last batch norm at zero (block = identity).
    """
    if len(blocks) != 3 or min(blocks) < 1:
        raise ValueError(f"blocks must be three positive counts, got {tuple(blocks)!r}")
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    w = width
    model = StagedModel(
        OrderedDict(
            stem=nn.Sequential(
                OrderedDict(conv=_conv3x3(in_channels, w), bn=nn.BatchNorm2d(w), relu=nn.ReLU())
            ),
            layer1=_layer(w, w, blocks[0], stride=2),
            layer2=_layer(w, 2 * w, blocks[1], stride=2),
            layer3=_layer(2 * w, 4 * w, blocks[2], stride=layer3_stride),
            classifier=ClassifierHead(nn.Linear(4 * w, num_classes)),
        ),
        input_shape=(in_channels, *size),
    )
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_residual:
        for module in model.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)
    return model


def _build(
    *, pretrained: bool = False, weights_path: str | None = None, **kwargs: Any
) -> StagedModel:
    model = small_resnet(**kwargs)
    if pretrained or weights_path is not None:
        if weights_path is None:
            raise FileNotFoundError(
                "small_resnet ships no pretrained weights; train one (splitexit train) or pass "
                "weights_path= to a state_dict saved with torch.save(model.state_dict(), path)"
            )
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model


_SPLITS = ("stem", "layer1", "layer2", "layer3")

register_model(
    ModelSpec(
        name="small_resnet",
        builder=_build,
        preprocessing=Preprocessing(size=(28, 28), mean=(0.2860,), std=(0.3530,), channels=1),
        split_points=_SPLITS,
        default_split="layer2",
        exit_points=("layer1", "layer2"),
        num_classes=10,
        description="small ResNet (w=32, ~0.3M params) for 1x28x28 Fashion-MNIST",
        weights=None,
    )
)


def _build_cifar(**kwargs: Any) -> StagedModel:
    kwargs.setdefault("in_channels", 3)
    kwargs.setdefault("input_size", 32)
    return _build(**kwargs)


register_model(
    ModelSpec(
        name="small_resnet_cifar10",
        builder=_build_cifar,
        preprocessing=Preprocessing(
            size=(32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), channels=3
        ),
        split_points=_SPLITS,
        default_split="layer2",
        exit_points=("layer1", "layer2"),
        num_classes=10,
        description="small ResNet (w=32, ~0.3M params) for 3x32x32 CIFAR-10",
        weights=None,
    )
)
