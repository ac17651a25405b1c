"""The data a bundle is calibrated and checked on: by default, the run's own held-out split.

    provenance["config"] (or a given one) ─ load_data ─ classes, input, files same? ─┐
                                                                                      ├─ splits
    an image folder ─ load_folder at the bundle's input geometry ─ classes same? ────┘

Used by `splitexit calibrate` and the notebooks, so both take the same samples. A bundle that
records no data is taken to be Fashion-MNIST's only when its classes are Fashion-MNIST's;
otherwise a folder must be named.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .table import CalibrationError


def held_out_splits(
    manifest: Any, config: Any = None, *, seed: int = 0, calibration_size: int = 5000
) -> tuple[dict[str, tuple[Any, np.ndarray]], str]:
    """({"calibration", "test"}: (images, labels), a description of where they came from).

    `config` (an ExperimentConfig) replaces the one the bundle recorded. Raises ConfigError
    for data of other classes or input shape, or whose folders changed since training.
    """
    from splitexit.train.config import config_from_dict
    from splitexit.train.experiment_data import data_matches, load_data

    recorded = manifest.provenance.get("config")
    if config is not None or recorded is not None:
        cfg = config if config is not None else config_from_dict(recorded)
        where = "the given config" if config is not None else "the run's own held-out split"
        data = load_data(cfg)
        data_matches(data, manifest, where, check_files=config is None)
        root = data.provenance.get("root") or ""
        where = f"{where} ({data.provenance['dataset']} {root}, seed {cfg.seed})"
        print(f"data: {where}", file=sys.stderr)
        out = {
            name: (data.splits[name].images.numpy(), data.splits[name].labels.numpy())
            for name in ("calibration", "test")
            if len(data.splits[name])
        }
        return out, where
    from splitexit.data import FASHION_MNIST_CLASSES, fashion_mnist_splits

    if tuple(manifest.class_names) != FASHION_MNIST_CLASSES:
        raise CalibrationError(
            f"bundle {manifest.name!r} does not record the data it was trained on: pass "
            "--images DIR (and --test-images DIR) with its classes, or --config RUN_DIR"
        )
    where = f"Fashion-MNIST, {calibration_size} training images held out with seed {seed}"
    print(f"data: {where} (the bundle records no data; --config names a run's)", file=sys.stderr)
    raw = fashion_mnist_splits(seed=seed, calibration=calibration_size)
    return {"calibration": raw["calibration"], "test": raw["test"]}, where


def folder_split(root: str, manifest: Any, flag: str) -> tuple[np.ndarray, np.ndarray]:
    """An image folder loaded as training loads one, at the bundle's input geometry; its
    class folders must be the bundle's classes."""
    from splitexit.train.experiment_data import load_folder

    channels, h, w = manifest.input_shape
    images, labels, classes = load_folder(root, (h, w), channels, flag)
    if tuple(classes) != tuple(manifest.class_names):
        raise CalibrationError(
            f"{flag} {root} has classes {classes}, the bundle {list(manifest.class_names)}: "
            "give a folder with the bundle's class folders"
        )
    return images, labels
