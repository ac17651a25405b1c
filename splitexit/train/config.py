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
from importlib import resources
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
    """Where the images come from and how they are split, sized and augmented.

    dataset      "fashion-mnist" or "folder" (root/<class>/<image>, class names = folder names)
    root         the image folder (folder); an IDX folder instead of the search order (fmnist)
    val_root     optional folder for the calibration split (instead of carving it from root)
    test_root    optional folder for the test split (instead of carving a fifth of root)
    calibration  held out of training for calibration: a count, or a fraction in (0, 1)
                 of root (default 5000 for Fashion-MNIST, 0.2 for folders)
    train_subset / test_subset   cap those splits (0: all)
    image_size   [H, W] every image is loaded at (default: a pretrained model's, else the
                 images' own, which must then all be one size)
    channels     1 (grayscale) or 3 (RGB) (default: a pretrained model's, else the data's)
    mean / std   per-channel normalisation (default: a pretrained model's, else measured
                 on the training images); recorded in the bundle
    augment      named training augmentations from AUGMENTATIONS (default: none for
                 folders, ["crop", "hflip"] for Fashion-MNIST)
    """

    dataset: str = "fashion-mnist"  # or "folder"
    root: str = ""
    val_root: str = ""
    test_root: str = ""
    calibration: int | float | None = None
    train_subset: int = 0
    test_subset: int = 0
    image_size: list[int] = field(default_factory=list)
    channels: int = 0
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    augment: list[str] | None = None


#: The training augmentations `data.augment` may name.
AUGMENTATIONS = {
    "crop": "random crop after reflect-padding 2 pixels",
    "hflip": "horizontal flip with probability 1/2",
    "vflip": "vertical flip with probability 1/2",
}


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
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp))
        raise ConfigError(f"{where}: {value!r} is not a {names}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: unexpected {value!r}")
        return None
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
    _validate_data(cfg.data)


def _validate_data(d: DataConfig) -> None:
    if d.image_size and (len(d.image_size) != 2 or min(d.image_size) < 1):
        raise ConfigError(f"data.image_size must be [height, width], got {d.image_size}")
    if d.channels not in (0, 1, 3):
        raise ConfigError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {d.channels}")
    c = d.calibration
    if c is not None and (isinstance(c, bool) or (isinstance(c, int) and c < 0)):
        raise ConfigError(f"data.calibration must be a count >= 0 or a fraction, got {c!r}")
    if isinstance(c, float) and not 0.0 < c < 1.0:
        raise ConfigError(f"data.calibration as a fraction must be in (0, 1), got {c}")
    if bool(d.mean) != bool(d.std) or (d.mean and len(d.mean) != len(d.std)):
        raise ConfigError("data.mean and data.std go together, one value per channel each")
    if isinstance(d.augment, bool) or (d.augment is not None and not isinstance(d.augment, list)):
        raise ConfigError(
            f"data.augment must be a list of transforms from {sorted(AUGMENTATIONS)} "
            f'(e.g. ["crop", "hflip"], or [] for none), got {d.augment!r}'
        )
    unknown = sorted(set(d.augment or []) - set(AUGMENTATIONS))
    if unknown:
        raise ConfigError(
            f"data.augment: unknown transform(s) {unknown}; choose from "
            + ", ".join(f"{k} ({v})" for k, v in AUGMENTATIONS.items())
        )
    for key in ("val_root", "test_root"):
        if getattr(d, key) and d.dataset != "folder":
            raise ConfigError(f"data.{key} needs data.dataset = 'folder'")


def shipped_configs() -> dict[str, Path]:
    """The experiment configs that ship with splitexit, by name."""
    root = resources.files("splitexit") / "configs"
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".toml")}


def resolve_config(name_or_path: str) -> Path:
    """A config file path, or the name of a shipped config (e.g. `fmnist-small`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = shipped_configs()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise ConfigError(
        f"no config file {name_or_path!r}; give a path to a TOML file or one of the shipped "
        f"configs: {', '.join(sorted(shipped))}"
    )


def config_from_dict(table: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a parsed TOML table."""
    augment = table.get("data", {}).get("augment") if isinstance(table.get("data"), dict) else None
    if isinstance(augment, bool):
        raise ConfigError(
            f"data.augment = {str(augment).lower()}: give a list of transforms from "
            f'{sorted(AUGMENTATIONS)} instead (e.g. ["crop", "hflip"], or [] for none)'
        )
    cfg: ExperimentConfig = _build(ExperimentConfig, table, "")
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
