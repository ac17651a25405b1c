"""What each stage minimises, as modules DDP can wrap: forward(x, y, bits, keep) -> (loss, logits).

    teacher      CE(teacher(x), y)
    stage 1      Σ MSE(student f̂ and tail stages, teacher features)       tail frozen
    stage 2      α·CE + (1-α)·T²·KL(teacher ‖ student)                    quantization in loop
    exits        Σ_exits α·CE + (1-α)·T²·KL(teacher ‖ exit)               backbone frozen or not

Only parameters with `requires_grad` are trained; each objective freezes what its stage keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..splitnet import SplitExitNet
from .losses import feature_loss, kd_loss

if TYPE_CHECKING:
    from ..models.staged import StagedModel


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


class Objective(nn.Module):
    """A stage's loss as a module: forward(x, y, bits, keep) -> (loss, logits)."""

    def frozen(self) -> list[nn.Module]:
        """The submodules this stage keeps fixed (the loop puts them in eval mode)."""
        raise NotImplementedError


class TeacherObjective(Objective):
    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        set_trainable(model, True)

    def frozen(self) -> list[nn.Module]:
        return []

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        bits: int | torch.Tensor | None = None,
        keep: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits


class HeadDistillObjective(Objective):
    """Stage 1: student f̂ (and the frozen tail stages after it) match the teacher features."""

    def __init__(self, net: SplitExitNet, teacher: StagedModel, split: str, later_stages: bool):
        super().__init__()
        self.net, self.teacher = net, teacher
        tail_names = [n for n, _ in net.tail.named_children()][:-1]
        self.points = [split] + (tail_names if later_stages else [])
        self.later_stages = later_stages
        set_trainable(net, False)
        set_trainable(teacher, False)
        set_trainable(net.head, True)
        set_trainable(net.bottleneck, True)

    def frozen(self) -> list[nn.Module]:
        return [self.teacher, self.net.tail, self.net.exits]

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        bits: int | torch.Tensor | None = None,
        keep: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            target = self.teacher.forward_features(x, self.points)
        out = self.net(x, bits, keep, collect=True)
        student = [out["decoded"]]
        if self.later_stages:
            student += out["tail_features"]
        loss = feature_loss(student, [target[p] for p in self.points])
        return loss, out["logits"]


class DistillObjective(Objective):
    """The student `net` against a frozen `teacher`'s logits: α·CE + (1-α)·T²·KL (`kd`)."""

    def __init__(
        self, net: SplitExitNet, teacher: nn.Module, *, alpha: float, temperature: float
    ) -> None:
        super().__init__()
        self.net, self.teacher = net, teacher
        self.alpha, self.temperature = alpha, temperature
        set_trainable(teacher, False)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits: torch.Tensor = self.teacher(x)
        return logits

    def kd(self, logits: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return kd_loss(logits, teacher, y, alpha=self.alpha, temperature=self.temperature)


class FinetuneObjective(DistillObjective):
    """Stage 2: knowledge distillation with quantization (and ordered channels) in the loop."""

    def __init__(
        self,
        net: SplitExitNet,
        teacher: nn.Module,
        *,
        alpha: float,
        temperature: float,
        freeze_encoder: bool,
        freeze_head: bool,
    ) -> None:
        super().__init__(net, teacher, alpha=alpha, temperature=temperature)
        set_trainable(net, True)
        set_trainable(net.exits, False)
        self._frozen: list[nn.Module] = [teacher, net.exits]
        if freeze_head:
            set_trainable(net.head, False)
            self._frozen.append(net.head)
        if freeze_encoder:
            set_trainable(net.bottleneck.encoder, False)
            self._frozen.append(net.bottleneck.encoder)

    def frozen(self) -> list[nn.Module]:
        return self._frozen

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        bits: int | torch.Tensor | None = None,
        keep: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x, bits, keep)["logits"]
        return self.kd(logits, self.teacher_logits(x), y), logits


class ExitObjective(DistillObjective):
    """Exit branches against labels and teacher logits; the backbone frozen or trained jointly."""

    def __init__(
        self,
        net: SplitExitNet,
        teacher: nn.Module,
        *,
        alpha: float,
        temperature: float,
        freeze_backbone: bool,
    ) -> None:
        super().__init__(net, teacher, alpha=alpha, temperature=temperature)
        self.freeze_backbone = freeze_backbone
        set_trainable(net, not freeze_backbone)
        set_trainable(net.exits, True)

    def frozen(self) -> list[nn.Module]:
        if self.freeze_backbone:
            return [self.teacher, self.net.head, self.net.bottleneck, self.net.tail]
        return [self.teacher]

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        bits: int | torch.Tensor | None = None,
        keep: int | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.teacher_logits(x)
        if self.freeze_backbone:  # the backbone runs once, without autograd
            with torch.no_grad():
                _, feats = self.net.exit_features(x)
            exit_logits = {name: self.net.exits[name](f) for name, f in feats.items()}
            logits = exit_logits[self.net.exit_names[-1]]
            loss = x.new_zeros(())
        else:
            out = self.net(x, bits, keep)
            exit_logits, logits = out["exits"], out["logits"]
            loss = self.kd(logits, t, y)
        for e in exit_logits.values():
            loss = loss + self.kd(e, t, y)
        return loss, logits
