"""The model zoo: what each model is, how to build it, and how to feed it.

    register_model(ModelSpec(...))       at import of each zoo module
    get_spec("small_resnet")             metadata: preprocessing, split/exit points, weights
    build_model("small_resnet", ...)     a StagedModel, ready to cut

A :class:`ModelSpec` carries the same kind of metadata as torchvision's weight enums (what
the weights were trained on, how well they do, how to preprocess), so that a bundle can
record it and a device can preprocess without guessing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from splitexit.models.staged import StagedModel

__all__ = [
    "ModelSpec",
    "Preprocessing",
    "WeightsInfo",
    "build_model",
    "get_spec",
    "list_models",
    "register_model",
    "register_unavailable",
]


@dataclass(frozen=True)
class Preprocessing:
    """How to turn an image into the model's input tensor.

    Resize/crop to ``size`` (H, W), scale pixels to [0, 1], then ``(x - mean) / std`` per
    channel. ``channels`` is 1 (grayscale) or 3 (RGB).
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int

    def __post_init__(self) -> None:
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(
                f"mean {self.mean} and std {self.std} need one value per channel "
                f"({self.channels} channels)"
            )
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")


@dataclass(frozen=True)
class WeightsInfo:
    """Where pretrained weights come from and how good they are."""

    source: str  # who trained / published them, e.g. "torchvision ResNet18_Weights.IMAGENET1K_V1"
    dataset: str  # what they were trained on, e.g. "ImageNet-1K"
    top1: float | None = None  # reported top-1 accuracy (%) on that dataset's validation set
    num_params: int | None = None
    license: str = ""
    url: str = ""
    notes: str = ""


Builder = Callable[..., StagedModel]


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its builder and the metadata everything downstream relies on.

    ``builder(*, pretrained: bool, num_classes: int, **kwargs) -> StagedModel``.
    ``split_points`` are the stage names where a cut is allowed; ``exit_points`` the stage
    outputs an early-exit branch may read (those at or before the chosen split run on the
    device); ``default_split`` is where the bottleneck goes unless told otherwise.
    """

    name: str
    builder: Builder
    preprocessing: Preprocessing
    split_points: tuple[str, ...]
    default_split: str
    exit_points: tuple[str, ...]
    num_classes: int
    description: str
    weights: WeightsInfo | None = None

    def __post_init__(self) -> None:
        if self.default_split not in self.split_points:
            raise ValueError(
                f"{self.name}: default_split {self.default_split!r} is not one of "
                f"its split points {self.split_points}"
            )
        stray = [p for p in self.exit_points if p not in self.split_points]
        if stray:
            raise ValueError(
                f"{self.name}: exit points {stray} are not among its split points "
                f"{self.split_points}"
            )


_REGISTRY: dict[str, ModelSpec] = {}
_UNAVAILABLE: dict[str, str] = {}


def register_model(spec: ModelSpec, *, overwrite: bool = False) -> ModelSpec:
    """Add ``spec`` to the zoo; refuses a name already taken unless ``overwrite``."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"model {spec.name!r} is already registered (pass overwrite=True)")
    _REGISTRY[spec.name] = spec
    _UNAVAILABLE.pop(spec.name, None)
    return spec


def register_unavailable(name: str, reason: str) -> None:
    """Record a zoo entry that cannot be offered here (e.g. an optional package is missing)."""
    if name not in _REGISTRY:
        _UNAVAILABLE[name] = reason


def list_models() -> list[str]:
    """Names of the models that can be built in this environment, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec registered under ``name``; ``ValueError`` naming the available ones if none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        if name in _UNAVAILABLE:
            raise ValueError(f"model {name!r} is not available: {_UNAVAILABLE[name]}") from None
        raise ValueError(
            f"unknown model {name!r}; available models: {', '.join(list_models())}"
        ) from None


def build_model(
    name: str, *, pretrained: bool = False, num_classes: int | None = None, **kwargs: Any
) -> StagedModel:
    """Build the registered model ``name`` as a :class:`StagedModel`.

    ``pretrained`` loads the spec's weights (never downloads: they must be local).
    ``num_classes`` other than the spec's replaces the classifier's linear layer (for
    fine-tuning; pretrained weights still load for every other stage). Other keyword
    arguments go to the builder (e.g. ``width=`` for small_resnet, ``weights_path=``).
    """
    spec = get_spec(name)
    classes = spec.num_classes if num_classes is None else num_classes
    if classes < 1:
        raise ValueError(f"num_classes must be positive, got {classes}")
    return spec.builder(pretrained=pretrained, num_classes=classes, **kwargs)
