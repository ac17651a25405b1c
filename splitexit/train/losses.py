"""Losses of the pipeline: head distillation (summed MSE) and knowledge distillation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def kd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)."""
    ce = F.cross_entropy(student, labels)
    if alpha >= 1.0:
        return ce
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * ce + (1.0 - alpha) * t * t * kl


def feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the MSEs between matching feature maps (GHND / BottleFit stage 1)."""
    return sum(F.mse_loss(s, t) for s, t in zip(student, teacher, strict=True))  # type: ignore[return-value]
