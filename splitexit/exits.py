"""Early-exit branches and the confidence scores that decide when to take them.

    features at a named point ─ [conv 3x3] ─ global avg pool ─ linear ─ logits ─ confidence

The confidence measures (`max_prob`, `margin`, `entropy`) live in `splitexit.confidence`,
which also scores numpy logits on a device without torch; they are re-exported here.
"""

from __future__ import annotations

import torch
from torch import nn

from .confidence import CONFIDENCE_MEASURES, confidence

__all__ = ["CONFIDENCE_MEASURES", "ExitBranch", "confidence"]


class ExitBranch(nn.Module):
    """A small classifier attached to an intermediate feature map.

    Args:
        in_channels: channels of the feature map it reads.
        num_classes: number of output classes.
        hidden: width of the optional hidden layer of the classifier (None: linear only).
        conv: add a 3x3 conv-bn-relu before pooling (a little more accurate, a little slower).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        hidden: int | None = None,
        conv: bool = False,
    ) -> None:
        super().__init__()
        width = in_channels
        if conv:
            width = max(in_channels, 32)
            self.features: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
        else:
            self.features = nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        if hidden:
            self.classifier: nn.Module = nn.Sequential(
                nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        else:
            self.classifier = nn.Linear(width, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(torch.flatten(self.pool(self.features(f)), 1))
        return logits
