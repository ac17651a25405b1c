"""Fashion-MNIST: where it is looked for, its download, its official and held-out splits.

Looked for, in order, in `$SPLITEXIT_DATA` (the IDX files directly in it or in its
`fashion-mnist/` subdirectory), in `/usr/share/datasets/fashion-mnist` (Debian package
`dataset-fashion-mnist`) and in the user cache (`$XDG_CACHE_HOME/splitexit/fashion-mnist`, by
default `~/.cache/...`). Only when none has it is it downloaded, into the cache, from the
official Zalando Research bucket (or `$SPLITEXIT_FASHION_MNIST_URL`), checked against the
published MD5 sums.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.errors import DatasetError

from .download import download_file
from .idx import read_idx
from .splits import split_indices

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Pixel mean and standard deviation of the 60k training images, scaled to [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

#: The download links of the Fashion-MNIST README (github.com/zalandoresearch/fashion-mnist).
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
#: Debian/Ubuntu: `apt-get install dataset-fashion-mnist`.
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: MD5 of the official .gz files, as published in the Fashion-MNIST README.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def cache_dir() -> Path:
    """Where downloads go: `$XDG_CACHE_HOME/splitexit/fashion-mnist` or `~/.cache/...`."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "splitexit" / "fashion-mnist"


def _search_dirs(root: str | os.PathLike[str] | None) -> list[Path]:
    if root is not None:
        return [Path(root), Path(root) / "fashion-mnist"]
    dirs = []
    env = os.environ.get("SPLITEXIT_DATA")
    if env:
        dirs += [Path(env), Path(env) / "fashion-mnist"]
    return [*dirs, SYSTEM_DATA_DIR, cache_dir()]


def _split_files(directory: Path, split: str) -> tuple[Path, Path] | None:
    """The (images, labels) files of `split` in `directory`, uncompressed preferred."""
    found = []
    for name in _SPLIT_FILES[split]:
        candidates = [directory / name, directory / f"{name}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found.append(path)
    return found[0], found[1]


def find_fashion_mnist(
    split: str | None = None, root: str | os.PathLike[str] | None = None
) -> Path | None:
    """The first directory of the search order holding `split` (both splits if None), or None."""
    splits = list(_SPLIT_FILES) if split is None else [_check_split(split)]
    for d in _search_dirs(root):
        if all(_split_files(d, s) is not None for s in splits):
            return d
    return None


def _check_split(split: str) -> str:
    if split not in _SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_FILES)}, got {split!r}")
    return split


def _not_found_message(split: str, searched: list[Path], reason: str, root: Any) -> str:
    unset = root is None and not os.environ.get("SPLITEXIT_DATA")
    looked = (["$SPLITEXIT_DATA (not set)"] if unset else []) + [str(d) for d in searched]
    files = " and ".join(f"{n}.gz" for n in _SPLIT_FILES[split])
    return (
        f"Fashion-MNIST ({split} split) not found; looked in: {', '.join(looked)}. {reason}\n"
        "To get it: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put "
        f"{files} (gzipped or not) in a directory and set SPLITEXIT_DATA to it, "
        "or retry with network access and download=True."
    )


def load_fashion_mnist(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    url: str | None = None,
    timeout: float = 60.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` ("train": 60k, "test": 10k) as uint8 [N, 28, 28] and int64 [N].

    `root` replaces the search order with that one directory (and its `fashion-mnist/`),
    which is then also where a download goes. `url` (or `$SPLITEXIT_FASHION_MNIST_URL`)
    replaces the official download location. Raises DatasetError, saying where it looked
    and how to get the data, when the files are missing and cannot be downloaded.
    """
    _check_split(split)
    searched = _search_dirs(root)
    files = next((f for d in searched if (f := _split_files(d, split)) is not None), None)
    if files is None:
        if not download:
            raise DatasetError(_not_found_message(split, searched, "download=False.", root))
        import httpx

        base = url or os.environ.get("SPLITEXIT_FASHION_MNIST_URL") or FASHION_MNIST_URL
        target = Path(root) if root is not None else cache_dir()
        try:
            for name in _SPLIT_FILES[split]:
                gz = f"{name}.gz"
                if (target / name).is_file() or (target / gz).is_file():
                    continue  # half a split is already there
                download_file(
                    f"{base.rstrip('/')}/{gz}", target / gz, FASHION_MNIST_MD5[gz], timeout
                )
        except (OSError, DatasetError, httpx.HTTPError) as e:
            reason = f"Downloading from {base} failed: {type(e).__name__}: {e}."
            raise DatasetError(_not_found_message(split, searched, reason, root)) from e
        files = _split_files(target, split)
        assert files is not None
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(
            f"{files[0]} holds {images.dtype} {images.shape}, not uint8 [N, 28, 28] images"
        )
    if labels.dtype != np.uint8 or labels.shape != (len(images),):
        raise DatasetError(
            f"{files[1]} holds {labels.dtype} {labels.shape}, not {len(images)} uint8 labels"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"{files[1]} has label {labels.max()}; Fashion-MNIST has 10 classes")
    return images, labels.astype(np.int64)


def fashion_mnist_splits(
    seed: int = 0,
    calibration: int = 5000,
    subset: int | None = None,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST as {"train", "calibration", "test"} -> (images, labels).

    "calibration" is `calibration` images held out of the official training set (stratified
    by class, drawn with `seed`), "train" is the rest, "test" the official 10k. `subset` caps
    every split at that many samples (a stratified, seeded draw) for quick experiments.
    """
    x, y = load_fashion_mnist("train", root=root, download=download)
    if not 0 <= calibration < len(y):
        raise ValueError(f"calibration must be in [0, {len(y)}), got {calibration}")
    idx = split_indices(
        len(y), {"train": len(y) - calibration, "calibration": calibration}, seed, stratify=y
    )
    splits = {name: (x[i], y[i]) for name, i in idx.items()}
    splits["test"] = load_fashion_mnist("test", root=root, download=download)
    if subset is not None:
        if subset < 0:
            raise ValueError(f"subset must be non-negative, got {subset}")
        for name, (xs, ys) in splits.items():
            if subset < len(ys):
                keep = split_indices(len(ys), {"keep": subset}, seed, stratify=ys)["keep"]
                splits[name] = (xs[keep], ys[keep])
    return splits
