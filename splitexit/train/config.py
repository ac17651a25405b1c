"""The experiment config: one TOML file describes a whole run and reproduces it.

    [data] ─ [teacher] ─ [split] ─ [stage1] head distillation ─ [stage2] KD fine-tune ─ [exits]

Every section is a typed dataclass; unknown keys and wrong types are refused with a
`ConfigError` that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Optim:
    """How one stage optimises: epochs, optimizer, learning-rate schedule."""

    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adamw"  # "sgd" | "adam" | "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"  # "cosine" | "onecycle" | "constant"
    warmup_epochs: float = 0.0
    batch_size: int = 128
    label_smoothing: float = 0.0
    # After each epoch, re-estimate BatchNorm statistics over this many training batches
    # (0: off). Needed where BN momentum is low (TF-ported models such as EfficientNet:
    # 0.01) and the bottleneck shifts what the tail's BN layers see.
    bn_recalibration_batches: int = 0


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # or "folder"
    root: str = ""  # image-folder root (dataset = "folder"); IDX folder override otherwise
    calibration: int = 5000  # samples held out of the training set for calibration
    train_subset: int = 0  # 0 = the whole training split
    test_subset: int = 0  # 0 = the whole test split
    image_size: list[int] = field(default_factory=list)  # [] = the model's own
    channels: int = 0  # 0 = the model's own
    augment: bool = True  # random crop (pad 2) + horizontal flip


@dataclass
class TeacherConfig:
    model: str = "small_resnet"
    pretrained: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str = ""  # a trained teacher's state_dict: skips teacher training
    optim: Optim = field(default_factory=lambda: Optim(epochs=10, lr=0.1, optimizer="sgd"))


@dataclass
class SplitConfig:
    point: str = "layer1"
    channels: int = 8
    hidden: int = 64
    downsample: int = 1
    bits: list[int] = field(default_factory=lambda: [2, 4, 8])
    min_channels: int = 1  # narrowest prefix trained and offered


@dataclass
class Stage1Config:
    """Head distillation: the student head + bottleneck reproduce the teacher's features."""

    optim: Optim = field(default_factory=lambda: Optim(epochs=3, lr=2e-3))
    later_stages: bool = True  # also match the outputs of the (frozen) tail's stages
    quantize: bool = True  # straight-through quantization in the loop
    sandwich: bool = True  # per-sample (k, bits) operating points


@dataclass
class Stage2Config:
    """Fine-tuning with knowledge distillation and quantization in the loop."""

    optim: Optim = field(default_factory=lambda: Optim(epochs=3, lr=1e-3))
    alpha: float = 0.5  # alpha * CE + (1 - alpha) * T^2 * KL
    temperature: float = 4.0
    freeze_encoder: bool = False
    freeze_head: bool = False
    sandwich: bool = True


@dataclass
class ExitsConfig:
    points: list[str] = field(default_factory=lambda: ["layer1", "bottleneck"])
    conv: bool = True
    hidden: int = 0  # 0 = linear classifier
    measure: str = "max_prob"
    freeze_backbone: bool = True
    alpha: float = 0.5
    temperature: float = 4.0
    optim: Optim = field(default_factory=lambda: Optim(epochs=2, lr=2e-3))


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    output: str = ""  # default: runs/<name>
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    eval_batch_size: int = 512
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    exits: ExitsConfig = field(default_factory=ExitsConfig)

    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(
            f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {sorted(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in table.items()}
    return cls(**kwargs)


def _validate(cfg: ExperimentConfig) -> None:
    choices = {
        "data.dataset": (cfg.data.dataset, ("fashion-mnist", "folder")),
        "device": (cfg.device, ("auto", "cpu", "cuda")),
        "exits.measure": (cfg.exits.measure, ("max_prob", "margin", "entropy")),
    }
    for optim_where, optim in (
        ("teacher.optim", cfg.teacher.optim),
        ("stage1.optim", cfg.stage1.optim),
        ("stage2.optim", cfg.stage2.optim),
        ("exits.optim", cfg.exits.optim),
    ):
        choices[f"{optim_where}.optimizer"] = (optim.optimizer, ("sgd", "adam", "adamw"))
        choices[f"{optim_where}.schedule"] = (optim.schedule, ("cosine", "onecycle", "constant"))
        if optim.epochs < 0 or optim.batch_size < 1 or optim.lr <= 0:
            raise ConfigError(f"{optim_where}: epochs >= 0, batch_size >= 1 and lr > 0 required")
    for where, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
    bad_bits = [b for b in cfg.split.bits if b not in (2, 4, 8)]
    if bad_bits or not cfg.split.bits:
        raise ConfigError(
            f"split.bits: must be a non-empty subset of [2, 4, 8], got {cfg.split.bits}"
        )
    if not 1 <= cfg.split.min_channels <= cfg.split.channels:
        raise ConfigError("split.min_channels must be in 1..split.channels")
    if not 0.0 <= cfg.stage2.alpha <= 1.0 or not 0.0 <= cfg.exits.alpha <= 1.0:
        raise ConfigError("alpha must be in [0, 1]")
    if cfg.data.image_size and len(cfg.data.image_size) != 2:
        raise ConfigError("data.image_size must be [height, width]")


def config_from_dict(table: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a parsed TOML table."""
    cfg = _build(ExperimentConfig, table, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path) -> ExperimentConfig:
    """Read a TOML experiment config; relative `output` is taken from the working directory."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return config_from_dict(table)
