"""A model as an ordered chain of named stages, and the cut that splits it in two.

    x ─ stem ─ layer1 ─ layer2 ─ ... ─ classifier ─ logits
                      ▲
                cut("layer1"):  head = stem..layer1  (device)
                                tail = layer2..classifier  (server)

A :class:`StagedModel` is an ``nn.Sequential`` whose children are the stages, so its forward
is the chain and its ``state_dict`` keys read ``<stage>.<layer>.<param>``. Cutting it never
copies weights: head and tail hold the very same module objects as the whole model.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, overload

import torch
from torch import nn

from splitexit.errors import SplitPointError

__all__ = ["ClassifierHead", "StagedModel"]


def _point_error(kind: str, point: str, valid: Sequence[str]) -> SplitPointError:
    return SplitPointError(
        f"unknown {kind} point {point!r}; valid {kind} points are: {', '.join(valid) or '(none)'}"
    )


class ClassifierHead(nn.Sequential):
    """The last stage of a classifier: global average pool, flatten, (dropout,) linear.

    ``(N, C, H, W) ─ pool ─ flatten ─ [dropout] ─ fc ─ (N, num_classes)`` logits.
    """

    if TYPE_CHECKING:  # for mypy only: TorchScript cannot read a class-level annotation
        fc: nn.Linear

    def __init__(self, fc: nn.Linear, *, dropout: float = 0.0) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1)
        )
        if dropout > 0:
            layers["dropout"] = nn.Dropout(dropout)
        layers["fc"] = fc
        super().__init__(layers)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def reset(self, num_classes: int) -> None:
        """Replace the linear layer by a freshly initialised one with ``num_classes`` outputs."""
        old = self.fc
        self.fc = nn.Linear(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)


class StagedModel(nn.Sequential):
    """An ordered chain of named stages; forward runs them in turn.

    Args:
        stages: stage name -> module, in execution order. Names must be unique and free of
            dots; each stage takes exactly one tensor and returns exactly one tensor.
        input_shape: the per-sample input shape ``(C, H, W)`` the model expects, if known;
            :meth:`feature_shapes` uses it when no shape is given.

    A cut is allowed after every stage but the last (:attr:`split_points`). The final stage
    of a classifier is named ``"classifier"`` and returns logits.
    """

    # TorchScript compiles properties by default; these are Python-only conveniences.
    __jit_unused_properties__ = ["stage_names", "split_points"]  # noqa: RUF012

    def __init__(
        self,
        stages: Mapping[str, nn.Module],
        *,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a StagedModel needs at least one stage")
        super().__init__(OrderedDict(stages))
        self.input_shape: tuple[int, ...] | None = (
            tuple(int(d) for d in input_shape) if input_shape is not None else None
        )

    @property
    def stage_names(self) -> tuple[str, ...]:
        """All stage names, in execution order."""
        return tuple(self._modules)

    @property
    def split_points(self) -> tuple[str, ...]:
        """Stage names after which the model may be cut: every stage but the last."""
        return self.stage_names[:-1]

    @overload
    def __getitem__(self, key: slice) -> nn.Sequential: ...
    @overload
    def __getitem__(self, key: str | int) -> nn.Module: ...
    def __getitem__(self, key: str | int | slice) -> nn.Module:
        """A stage by name (``model["layer1"]``), or by position / slice as in nn.Sequential."""
        if isinstance(key, str):
            if key not in self._modules:
                raise _point_error("stage", key, self.stage_names)
            return self._modules[key]
        return super().__getitem__(key)

    def _index(self, point: str) -> int:
        if point not in self.split_points:
            raise _point_error("split", point, self.split_points)
        return self.stage_names.index(point)

    def head_stages(self, point: str) -> tuple[str, ...]:
        """Names of the stages that run on the device when cutting after ``point``."""
        return self.stage_names[: self._index(point) + 1]

    def tail_stages(self, point: str) -> tuple[str, ...]:
        """Names of the stages that run on the server when cutting after ``point``."""
        return self.stage_names[self._index(point) + 1 :]

    def cut(self, point: str) -> tuple[StagedModel, StagedModel]:
        """Split after stage ``point`` into ``(head, tail)`` with ``tail(head(x)) == self(x)``.

        Both halves share this model's modules (and so its weights) and its train/eval mode.
        Raises :class:`~splitexit.errors.SplitPointError` listing the valid points.
        """
        index = self._index(point)
        items = list(self._modules.items())
        head = StagedModel(OrderedDict(items[: index + 1]), input_shape=self.input_shape)
        tail = StagedModel(OrderedDict(items[index + 1 :]))
        head.training = tail.training = self.training
        return head, tail

    def forward_features(self, x: torch.Tensor, points: Iterable[str]) -> dict[str, torch.Tensor]:
        """Run the chain as far as needed and return the outputs of the named stages."""
        wanted = set(points)
        unknown = wanted - set(self.stage_names)
        if unknown:
            raise _point_error("stage", sorted(unknown)[0], self.stage_names)
        features: dict[str, torch.Tensor] = {}
        for name, stage in self._modules.items():
            if len(features) == len(wanted):
                break
            x = stage(x)
            if name in wanted:
                features[name] = x
        return features

    @torch.no_grad()
    def feature_shapes(
        self, input_shape: Sequence[int] | None = None
    ) -> dict[str, tuple[int, ...]]:
        """Per-sample output shape of every stage (``(C, H, W)``; ``(K,)`` for logits).

        ``input_shape`` is ``(C, H, W)`` or ``(N, C, H, W)``; it defaults to
        :attr:`input_shape`. Runs one zero-filled sample in eval mode, then restores each
        module's train/eval mode (so batch-norm statistics are left untouched).
        """
        shape = tuple(input_shape) if input_shape is not None else self.input_shape
        if shape is None:
            raise ValueError("feature_shapes needs an input_shape: this model does not record one")
        if len(shape) == 4:
            shape = shape[1:]
        reference = next(self.parameters(), None)
        device = reference.device if reference is not None else None
        dtype = reference.dtype if reference is not None else None
        x = torch.zeros((1, *shape), device=device, dtype=dtype)
        modes = {module: module.training for module in self.modules()}
        self.eval()
        try:
            shapes: dict[str, tuple[int, ...]] = {}
            for name, stage in self._modules.items():
                x = stage(x)
                shapes[name] = tuple(x.shape[1:])
        finally:
            for module, training in modes.items():
                module.training = training
        return shapes
