"""A classifier cut at a split point, with a learned bottleneck and early exits.

    x ─ head stages ─┬───────────── encoder ─ z ─┬─ code(k, bits) ─ decoder ─ tail stages ─ logits
                     │                           │
                exit 'layer1'              exit 'bottleneck'

The head stages and the tail stages start as copies of the teacher's, cut at `split`; the
bottleneck replaces nothing but sits between them, so with a perfect bottleneck the model is
the teacher. Exits read the feature map after a named head stage, or the code `z`.

For deployment the head is split into *segments* at the exit points, so a device can stop
computing as soon as an exit is confident:

    segment 0 = stages up to the first exit point, segment 1 = ... up to the next,
    last segment = remaining stages + encoder (its output is z).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .bottleneck import Bottleneck
from .errors import SplitPointError
from .exits import ExitBranch

if TYPE_CHECKING:
    from .models.staged import StagedModel

BOTTLENECK = "bottleneck"


class SplitExitNet(nn.Module):
    """Head stages + bottleneck + tail stages + exit branches.

    Args:
        head: named head stages (an `nn.Sequential` whose children are the stages).
        bottleneck: the bottleneck between head and tail.
        tail: named tail stages; the last one outputs logits.
        exits: exit branches by point name (a head stage name or "bottleneck").
    """

    def __init__(
        self,
        head: nn.Sequential,
        bottleneck: Bottleneck,
        tail: nn.Sequential,
        exits: Mapping[str, ExitBranch] | None = None,
    ) -> None:
        super().__init__()
        self.head = head
        self.bottleneck = bottleneck
        self.tail = tail
        exits = dict(exits or {})
        order = [name for name, _ in head.named_children()] + [BOTTLENECK]
        unknown = [p for p in exits if p not in order]
        if unknown:
            raise SplitPointError(
                f"exit points {unknown} are not in the head; valid points: {order}"
            )
        self.exits = nn.ModuleDict(OrderedDict((p, exits[p]) for p in order if p in exits))

    @classmethod
    def from_teacher(
        cls,
        teacher: StagedModel,
        split: str,
        *,
        input_shape: Sequence[int],
        channels: int,
        hidden: int = 64,
        downsample: int = 1,
        bits: Sequence[int] = (2, 4, 8),
        exit_points: Sequence[str] = (),
        exit_conv: bool = True,
        exit_hidden: int | None = None,
        num_classes: int | None = None,
    ) -> SplitExitNet:
        """Cut a copy of a staged teacher at `split` and insert a fresh bottleneck and exits."""
        teacher = copy.deepcopy(teacher).eval()
        shapes = teacher.feature_shapes(tuple(input_shape))
        head, tail = teacher.cut(split)
        bottleneck = Bottleneck(
            shapes[split], channels, hidden=hidden, downsample=downsample, bits=bits
        )
        if num_classes is None:
            num_classes = int(list(shapes.values())[-1][0])
        exits = {}
        for point in exit_points:
            if point == BOTTLENECK:
                in_ch = channels
            elif point in dict(head.named_children()):
                in_ch = shapes[point][0]
            else:
                valid = [n for n, _ in head.named_children()] + [BOTTLENECK]
                raise SplitPointError(f"exit point {point!r} is not in the head; valid: {valid}")
            exits[point] = ExitBranch(in_ch, num_classes, hidden=exit_hidden, conv=exit_conv)
        return cls(head, bottleneck, tail, exits)

    @property
    def exit_names(self) -> list[str]:
        """Exit point names, in the order the head reaches them."""
        return list(self.exits.keys())

    def forward(
        self,
        x: torch.Tensor,
        bits: int | torch.Tensor | None = None,
        keep: int | torch.Tensor | None = None,
        *,
        collect: bool = False,
    ) -> dict:
        """Training path. Returns a dict with `logits`, `exits` (logits by exit name), and,
        when `collect` is set, `decoded` (f̂ at the split point) and `tail_features` (the
        output of every tail stage but the last), for head-distillation losses."""
        z, exit_logits = self.run_head(x)
        y = self.bottleneck.decoder(self.bottleneck.code(z, bits, keep))
        out: dict = {"exits": exit_logits}
        if collect:
            out["decoded"] = y
        tail_features = []
        for stage in self.tail.children():
            y = stage(y)
            tail_features.append(y)
        out["logits"] = y
        if collect:
            out["tail_features"] = tail_features[:-1]
        return out

    def exit_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The code z and the feature map every exit reads, by exit name."""
        feats: dict[str, torch.Tensor] = {}
        f = x
        for name, stage in self.head.named_children():
            f = stage(f)
            if name in self.exits:
                feats[name] = f
        z = self.bottleneck.encoder(f)
        if BOTTLENECK in self.exits:
            feats[BOTTLENECK] = z
        return z, feats

    def run_head(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The head and every exit: (code z, exit logits by name)."""
        z, feats = self.exit_features(x)
        return z, {name: self.exits[name](f) for name, f in feats.items()}

    def segments(self) -> list[tuple[nn.Sequential, str | None]]:
        """The head as segments ending at exit points: [(segment, exit name or None)].

        Running the segments in order and the exit named after each gives the same numbers
        as `forward`; the last segment ends with the encoder and outputs the code z.
        """
        segments: list[tuple[nn.Sequential, str | None]] = []
        current: OrderedDict[str, nn.Module] = OrderedDict()
        for name, stage in self.head.named_children():
            current[name] = stage
            if name in self.exits:
                segments.append((nn.Sequential(current), name))
                current = OrderedDict()
        current["encoder"] = self.bottleneck.encoder
        segments.append((nn.Sequential(current), BOTTLENECK if BOTTLENECK in self.exits else None))
        for segment, _ in segments:  # a wrapper's mode must not flip the shared stages' mode
            segment.training = self.training
        return segments

    def tail_module(self) -> nn.Sequential:
        """Decoder + tail stages: zero-filled dequantized code [N, C, h, w] to logits."""
        tail = nn.Sequential(
            OrderedDict([("decoder", self.bottleneck.decoder), *self.tail.named_children()])
        )
        tail.training = self.training
        return tail
