"""Datasets: Fashion-MNIST from IDX files, image folders, in-memory arrays, seeded splits.

    IDX files ─ read_idx ─ load_fashion_mnist ─┬─ fashion_mnist_splits ─ train / calibration / test
    class folders of images ─ ImageFolder      │
                                               └─ ArrayDataset(images, labels, Preprocess) ─► model

`idx` reads the IDX format; `download` fetches a file, checked; `fashion_mnist` finds,
downloads and splits Fashion-MNIST (the search order is in its docstring); `splits` draws
seeded index splits; `datasets` holds the torch Datasets.
"""

from __future__ import annotations

from .datasets import IMAGE_EXTENSIONS, ArrayDataset, ImageFolder
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MD5,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FASHION_MNIST_URL,
    SYSTEM_DATA_DIR,
    cache_dir,
    fashion_mnist_splits,
    find_fashion_mnist,
    load_fashion_mnist,
)
from .idx import read_idx
from .splits import split_indices

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MD5",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FASHION_MNIST_URL",
    "IMAGE_EXTENSIONS",
    "SYSTEM_DATA_DIR",
    "ArrayDataset",
    "ImageFolder",
    "cache_dir",
    "fashion_mnist_splits",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "split_indices",
]
