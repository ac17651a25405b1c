"""The inputs every strategy sees: the first N Fashion-MNIST test images, as sent.

An input is uint8 pixels at the bundle's input resolution and channel count (what a camera
would hand the device; `track_report.input_as_sent`), so the image codecs, the device's
preprocessing and the server's all start from the same pixels.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from track_report import input_as_sent

from splitexit.bundle import Bundle
from splitexit.data import load_fashion_mnist
from splitexit_device.sources import Input


@dataclass(frozen=True)
class Inputs:
    """N images (uint8 [N, H, W] or [N, H, W, 3]) with their labels and the class names;
    `first` is the test-set index of image 0 (a part of a larger set keeps its ids)."""

    pixels: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    first: int = 0

    def __len__(self) -> int:
        return len(self.labels)

    def id(self, i: int) -> str:
        return f"{self.first + i:05d}"

    def parts(self, n: int) -> list[Inputs]:
        """The images in `n` consecutive parts as even as can be (fewer if there are fewer
        images), each keeping its ids: the suite's rounds."""
        bounds = np.linspace(0, len(self), min(n, len(self)) + 1).round().astype(int)
        return [
            replace(self, pixels=self.pixels[a:b], labels=self.labels[a:b], first=self.first + a)
            for a, b in itertools.pairwise(bounds)
        ]

    def agent_inputs(self) -> Iterator[Input]:
        """The same images as device-agent inputs, in memory, labelled by class name."""
        for i in range(len(self)):
            yield Input(self.id(i), label=self.class_names[self.labels[i]], image=self.pixels[i])


def load_inputs(bundle: Bundle, n: int) -> Inputs:
    """The first `n` test images at the bundle's input size; ValueError if it is not a
    10-class model (the suite runs on Fashion-MNIST)."""
    names = tuple(bundle.manifest.class_names)
    if len(names) != 10:
        raise ValueError(
            f"bundle {bundle.manifest.name!r} has {len(names)} classes; the suite measures on "
            "Fashion-MNIST (10 classes)"
        )
    images, labels = load_fashion_mnist("test")
    n = min(n, len(labels))
    pre = bundle.preprocess
    sent = input_as_sent(torch.as_tensor(images[:n]), pre.size, pre.channels)
    return Inputs(np.ascontiguousarray(sent), np.asarray(labels[:n], dtype=np.int64), names)
