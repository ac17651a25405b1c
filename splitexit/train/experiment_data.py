"""The data of an experiment: the `[data]` section turned into train / calibration / test.

    [data] ─ plan_data (cheap: class folders, image headers: classes, size, channels)
           ─ load_data ─ uint8 splits at that geometry ─ train_preprocess (mean / std)
           └─ provenance: what the run was trained and calibrated on (kept in the bundle)

Fashion-MNIST keeps its official test set and holds `calibration` images out of training.
An image folder (`root/<class>/<image>`) is carved into test (a fifth, unless `test_root`
names a folder), calibration (`calibration`, unless `val_root` names a folder) and train
(the rest), stratified and seeded. Every image is loaded at the model's input geometry:
explicit `image_size` / `channels`, else the pretrained zoo model's, else the data's own.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import (
    FASHION_MNIST_CLASSES,
    ImageFolder,
    fashion_mnist_splits,
    find_fashion_mnist,
    split_indices,
)
from ..errors import ConfigError, DatasetError
from ..models.reference import is_zoo_name
from ..preprocess import Preprocess, open_image, pil_to_array
from .batches import ArraySplit
from .config import DataConfig, ExperimentConfig

#: What `calibration` defaults to: a count for Fashion-MNIST, a fraction for folders.
DEFAULT_CALIBRATION = {"fashion-mnist": 5000, "folder": 0.2}
#: The share of an image folder carved out for the test split when `test_root` is not set.
TEST_FRACTION = 0.2
#: The augmentations a dataset gets when `augment` is not set.
DEFAULT_AUGMENT = {"fashion-mnist": ["crop", "hflip"], "folder": []}


@dataclass
class ExperimentData:
    """In-memory splits, the class names and where they came from."""

    splits: dict[str, ArraySplit]
    class_names: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)


def augmentations(cfg: ExperimentConfig) -> list[str]:
    """The named augmentations training applies: the config's, else the dataset's default."""
    d = cfg.data
    return list(d.augment) if d.augment is not None else list(DEFAULT_AUGMENT[d.dataset])


def _folders(d: DataConfig) -> dict[str, ImageFolder]:
    """The configured image folders by role ("train", "calibration", "test"); checked."""
    if not d.root:
        raise ConfigError(
            "data.root must name an image folder (root/<class>/<image>) when "
            "data.dataset = 'folder'"
        )
    roles = {"train": d.root, "calibration": d.val_root, "test": d.test_root}
    folders = {}
    for role, root in roles.items():
        if not root:
            continue
        key = {"train": "root", "calibration": "val_root", "test": "test_root"}[role]
        if not Path(root).is_dir():
            raise ConfigError(f"data.{key} = {root!r} is not a folder; give root/<class>/<image>")
        try:
            folders[role] = ImageFolder(root)
        except DatasetError as e:
            raise ConfigError(f"data.{key}: {e}") from None
    classes = folders["train"].classes
    for folder in folders.values():
        if folder.classes != classes:
            raise ConfigError(
                f"{folder.root} has class folders {folder.classes}, but data.root has "
                f"{classes}: every folder needs the same class names"
            )
    return folders


@dataclass(frozen=True)
class DataPlan:
    """What the data will be, known before any image is decoded: the class names, the
    geometry every image is loaded at, and the (validated) image folders."""

    class_names: list[str]
    size: tuple[int, int]
    channels: int
    folders: dict[str, ImageFolder] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.channels, *self.size


def plan_data(cfg: ExperimentConfig) -> DataPlan:
    """Check the `[data]` section and work out the classes and the input geometry (see the
    module docstring) from folder listings and image headers alone."""
    d = cfg.data
    folders = _folders(d) if d.dataset == "folder" else {}
    classes = folders["train"].classes if folders else list(FASHION_MNIST_CLASSES)
    spec = None
    if is_zoo_name(cfg.teacher.model) and cfg.teacher.pretrained:
        from ..models import get_spec

        spec = get_spec(cfg.teacher.model).preprocessing
    size = tuple(d.image_size) or (tuple(spec.size) if spec else ())
    channels = d.channels or (spec.channels if spec else 0)
    if not folders:  # Fashion-MNIST: 28x28 grayscale
        size, channels = size or (28, 28), channels or 1
    elif not (size and channels):
        sizes, gray = _scan(folders.values())
        if not size:
            if len(sizes) > 1:
                seen = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:4])
                raise ConfigError(
                    f"the images in data.root have {len(sizes)} different sizes ({seen}, ...): "
                    "set data.image_size = [height, width] to load them all at one size"
                )
            w, h = next(iter(sizes))
            size = (h, w)
        channels = channels or (1 if gray else 3)
    return DataPlan(list(classes), size, channels, folders)  # type: ignore[arg-type]


def _scan(folders: Any) -> tuple[set[tuple[int, int]], bool]:
    """The distinct (W, H) sizes of every image, and whether all of them are grayscale."""
    from PIL import Image

    sizes: set[tuple[int, int]] = set()
    gray = True
    for folder in folders:
        for path, _ in folder.samples:
            try:
                with Image.open(path) as img:  # reads the header only
                    sizes.add(img.size)
                    gray = gray and img.mode in ("1", "L", "LA", "I", "I;16", "F")
            except Exception as e:  # Pillow raises many types for a bad file
                raise DatasetError(f"cannot read image {path}: {e}") from e
    return sizes, gray


def load_data(cfg: ExperimentConfig, plan: DataPlan | None = None) -> ExperimentData:
    """Train / calibration / test splits as in-memory uint8 arrays, with their provenance;
    `plan` is `plan_data(cfg)` where the caller has it already."""
    d = cfg.data
    plan = plan or plan_data(cfg)
    size, channels, classes = plan.size, plan.channels, plan.class_names
    if d.dataset == "fashion-mnist":
        raw, provenance = _fashion_mnist(cfg)
    else:
        raw, provenance = _folder_splits(cfg, plan)
    splits = {k: ArraySplit.from_numpy(*v) for k, v in raw.items()}
    splits["train"] = _subset(splits["train"], d.train_subset, cfg.seed)
    splits["test"] = _subset(splits["test"], d.test_subset, cfg.seed)
    provenance.update(
        dataset=d.dataset,
        class_names=classes,
        input_shape=[channels, *size],
        seed=cfg.seed,
        sizes={k: len(v) for k, v in splits.items()},
        augment=augmentations(cfg),
    )
    return ExperimentData(splits, classes, provenance)


def calibration_count(d: DataConfig, n: int, reserved: int, where: str) -> int:
    """`calibration` (a count or a fraction of n) as a count; ConfigError with a value that
    fits when it leaves too little to train on."""
    value = DEFAULT_CALIBRATION[d.dataset] if d.calibration is None else d.calibration
    count = math.floor(value * n) if isinstance(value, float) else int(value)
    room = n - reserved - 2  # keep at least a couple of training images
    if count > room:
        suggest = max(1, min(room, math.floor(0.2 * n)))
        raise ConfigError(
            f"data.calibration = {value} asks for {count} of the {n} images in {where}"
            + (f" ({reserved} already go to the test split)" if reserved else "")
            + f": give a count up to {max(room, 0)} (e.g. calibration = {suggest}) or a "
            "fraction such as 0.2"
        )
    return count


def _fashion_mnist(cfg: ExperimentConfig) -> tuple[dict, dict]:
    d = cfg.data
    calibration = calibration_count(d, 60_000, 0, "the Fashion-MNIST training set")
    raw = fashion_mnist_splits(seed=cfg.seed, calibration=calibration, root=d.root or None)
    found = find_fashion_mnist(root=d.root or None)
    provenance = {"root": str(found.resolve()) if found else d.root, "calibration": calibration}
    return raw, provenance


def _folder_splits(cfg: ExperimentConfig, plan: DataPlan) -> tuple:
    d = cfg.data
    folders, size, channels = plan.folders, plan.size, plan.channels
    main = folders["train"]
    n = len(main)
    labels = main.targets
    n_test = 0 if "test" in folders else max(1, math.floor(TEST_FRACTION * n))
    n_cal = 0 if "calibration" in folders else calibration_count(d, n, n_test, d.root)
    counts = {"train": n - n_test - n_cal, "calibration": n_cal, "test": n_test}
    if counts["train"] < len(main.classes):
        raise ConfigError(
            f"data.root {d.root} has {n} images for {len(main.classes)} classes; after the "
            f"test ({n_test}) and calibration ({n_cal}) splits too few remain to train on: "
            "add images, or give val_root / test_root folders"
        )
    idx = split_indices(n, counts, cfg.seed, stratify=labels)
    mode = "L" if channels == 1 else "RGB"
    images = _load_images(main, size, mode, "loading " + Path(d.root).name)
    raw = {k: (images[v], labels[v]) for k, v in idx.items()}
    for role, folder in folders.items():
        if role != "train":
            raw[role] = (_load_images(folder, size, mode, f"loading {role}"), folder.targets)
    roots = {"root": d.root, "val_root": d.val_root, "test_root": d.test_root}
    provenance = {key: str(Path(r).resolve()) if r else "" for key, r in roots.items()} | {
        "files_sha256": {role: file_list_sha256(f) for role, f in folders.items()},
        "calibration": n_cal if "calibration" not in folders else "val_root",
    }
    return raw, provenance


def file_list_sha256(folder: ImageFolder) -> str:
    """sha256 of the folder's sorted `<class>/<relative path> <size>` lines."""
    h = hashlib.sha256()
    for path, label in folder.samples:
        rel = path.relative_to(folder.root / folder.classes[label]).as_posix()
        h.update(f"{folder.classes[label]}/{rel} {path.stat().st_size}\n".encode())
    return h.hexdigest()


def load_folder(
    root: str, size: tuple[int, int], channels: int, what: str = "image folder"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images at `size`, labels, class names) of an image folder, loaded as training
    loads one. Raises ConfigError for a folder that is missing or not laid out by class."""
    if not Path(root).is_dir():
        raise ConfigError(f"{what} {root} is not a folder; give root/<class>/<image>")
    try:
        folder = ImageFolder(root)
    except DatasetError as e:
        raise ConfigError(f"{what}: {e}") from None
    mode = "L" if channels == 1 else "RGB"
    return _load_images(folder, size, mode, f"loading {root}"), folder.targets, folder.classes


def data_matches(data: ExperimentData, manifest: Any, where: str, check_files: bool) -> None:
    """Refuse (ConfigError) data whose classes or input shape differ from the bundle's, or,
    with `check_files`, whose image folders changed since the bundle recorded them."""
    if tuple(data.class_names) != tuple(manifest.class_names):
        raise ConfigError(
            f"{where} has classes {data.class_names}, the bundle {list(manifest.class_names)}: "
            "calibrate on data with the bundle's classes (--images DIR)"
        )
    shape = tuple(data.provenance["input_shape"])
    if shape != tuple(manifest.input_shape):
        raise ConfigError(
            f"{where} feeds the model {list(shape)} inputs, the bundle takes "
            f"{list(manifest.input_shape)}: calibrate on the data the bundle was trained on"
        )
    recorded = manifest.provenance.get("files_sha256") or {}
    now = data.provenance.get("files_sha256") or {}
    changed = sorted(role for role in recorded if check_files and now.get(role) != recorded[role])
    if changed:
        raise ConfigError(
            f"the images of the {', '.join(changed)} folder(s) changed since training (their "
            "file list differs from the bundle's record), so the held-out split is not the one "
            "training left out: pass --images DIR and --test-images DIR"
        )


def _load_images(folder: ImageFolder, size: tuple[int, int], mode: str, desc: str) -> np.ndarray:
    """Every image of `folder` as uint8 [N, H, W(, 3)] at `size` (H, W) in Pillow `mode`."""
    from PIL import Image

    h, w = size
    out = np.empty((len(folder), h, w) + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
    for i, (path, _) in enumerate(tqdm(folder.samples, desc=desc, leave=False, disable=None)):
        try:
            img = open_image(path, max_pixels=None)
            img = img.convert(mode)
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = pil_to_array(img, mode)
        except Exception as e:  # Pillow raises a zoo of types for a bad file
            raise DatasetError(f"cannot load image {path}: {e}") from e
        out[i] = arr[..., 0] if mode == "L" else arr
    return out


def _subset(split: ArraySplit, n: int, seed: int) -> ArraySplit:
    if n <= 0 or n >= len(split):
        return split
    keep = split_indices(len(split), {"keep": n}, seed, stratify=split.labels.numpy())["keep"]
    idx = torch.from_numpy(np.sort(keep))
    return ArraySplit(split.images[idx], split.labels[idx])


def measured_stats(split: ArraySplit, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel mean and std (in [0, 1]) of a split, as the model will see it."""
    size = (split.images.shape[1], split.images.shape[2])
    x = Preprocess(size=size, channels=channels)(split.images)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def train_preprocess(cfg: ExperimentConfig, data: ExperimentData) -> Preprocess:
    """The model's preprocessing: input geometry, and `mean` / `std` from the config, else
    the pretrained zoo model's, else measured on the training images."""
    d = cfg.data
    channels, *hw = data.provenance["input_shape"]
    size = tuple(hw)
    mean, std = tuple(d.mean), tuple(d.std)
    if not mean and is_zoo_name(cfg.teacher.model) and cfg.teacher.pretrained:
        from ..models import get_spec

        spec = get_spec(cfg.teacher.model).preprocessing
        mean, std = tuple(spec.mean), tuple(spec.std)
        if channels != spec.channels:
            mean, std = mean[:1] * channels, std[:1] * channels
    if not mean:
        mean, std = measured_stats(data.splits["train"], channels)
    try:
        return Preprocess(size=size, mean=mean, std=std, channels=channels)
    except ValueError as e:
        raise ConfigError(f"data.mean / data.std: {e}") from None
