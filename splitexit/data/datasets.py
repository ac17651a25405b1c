"""torch Datasets over images: class folders on disk (`ImageFolder`) and in-memory uint8
arrays (`ArrayDataset`, batched through a `Preprocess`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from splitexit.errors import DatasetError
from splitexit.preprocess import Preprocess, open_image, pil_to_array, require_pillow

from .splits import random_order

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageFolder(Dataset):
    """Images under `root/<class name>/**`, labelled by class folder (classes sorted by name).

    Files are found recursively, filtered by extension (case-insensitive) and sorted, so the
    sample order is the same on every machine. Items are (uint8 [H, W, C] array, label), or
    (PIL image, label) with `as_pil=True`; `mode` forces a Pillow mode ("RGB", "L"), by
    default grayscale stays 1-channel and everything else becomes RGB. `transform`, if given,
    is applied to the image.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        transform: Callable[[Any], Any] | None = None,
        mode: str | None = None,
        as_pil: bool = False,
    ) -> None:
        require_pillow()
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder {self.root} does not exist or is not a directory")
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.classes: list[str] = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.classes:
            raise DatasetError(
                f"{self.root} has no class folders; lay it out as {self.root}/<class>/<image>"
            )
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            class_dir = self.root / name
            files = sorted(
                (p for p in class_dir.rglob("*") if p.suffix.lower() in exts and p.is_file()),
                key=lambda p: p.relative_to(class_dir).as_posix(),
            )
            if not files:
                raise DatasetError(f"class folder {class_dir} has no images with {exts}")
            self.samples += [(p, label) for p in files]
        self.targets = np.array([label for _, label in self.samples], dtype=np.int64)
        self.transform = transform
        self.mode = mode
        self.as_pil = as_pil

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            img = open_image(path, max_pixels=None)  # Pillow's MAX_IMAGE_PIXELS still applies
            if self.as_pil:
                sample: Any = img.convert(self.mode) if self.mode else img
            else:
                sample = pil_to_array(img, self.mode)
                img.close()
        except Exception as e:  # Pillow raises a zoo of types for a bad file
            raise DatasetError(f"cannot load image {path}: {e}") from e
        if self.transform is not None:
            sample = self.transform(sample)
        return sample, label


class ArrayDataset(Dataset):
    """A dataset over in-memory uint8 images [N, H, W] or [N, H, W, C] and labels [N].

    Items are (transform(image), label). `transform` takes a batch, like `Preprocess`, and is
    applied per batch by `__getitems__` (which `DataLoader` uses) and `batches`. Without one,
    images become float32 [C, H, W] in [0, 1].
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | Sequence[int],
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    ) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}"
            )
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be {len(images)} integers, got {labels.dtype} {labels.shape}"
            )
        if transform is None:
            channels = 1 if images.ndim == 3 else images.shape[3]
            transform = Preprocess(size=images.shape[1:3], channels=channels)
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index][None])[0], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        x = self.transform(self.images[np.asarray(indices, dtype=np.int64)])
        return list(zip(x.unbind(0), self.labels[indices].tolist(), strict=True))

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (inputs, int64 labels) batches; with `shuffle`, the order is drawn from `seed`."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = len(self)
        order = random_order(n, np.random.default_rng(seed)) if shuffle else np.arange(n)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield self.transform(self.images[idx]), torch.from_numpy(self.labels[idx])
