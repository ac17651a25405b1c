"""Early-exit branches and the confidence scores that decide when to take them.

    features at a named point ─ [conv 3x3] ─ global avg pool ─ linear ─ logits ─ confidence

Confidence measures, all batched and "higher means more confident", in [0, 1]:

- `max_prob`: the largest softmax probability;
- `margin`: top-1 minus top-2 probability;
- `entropy`: 1 - H(p) / log(K), the normalised negative entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")


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
        return self.classifier(torch.flatten(self.pool(self.features(f)), 1))


def confidence(logits: torch.Tensor, measure: str = "max_prob") -> torch.Tensor:
    """Per-sample confidence of logits [N, K] as a tensor [N] in [0, 1]."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected logits of shape [N, K>=2], got {tuple(logits.shape)}")
    logits = logits.float()
    if measure == "max_prob":
        return F.softmax(logits, dim=1).amax(dim=1)
    if measure == "margin":
        top2 = F.softmax(logits, dim=1).topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    if measure == "entropy":
        logp = F.log_softmax(logits, dim=1)
        h = -(logp.exp() * logp).sum(dim=1)
        return (1.0 - h / math.log(logits.shape[1])).clamp(0.0, 1.0)
    raise ValueError(f"unknown confidence measure {measure!r}; choose one of {CONFIDENCE_MEASURES}")
