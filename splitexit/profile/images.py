"""The input image whose encoded bytes full offload would send: the user's, the first
Fashion-MNIST test image, or a deterministic synthetic one."""

from __future__ import annotations

import numpy as np


def input_image(
    image: np.ndarray | None, fmt: str | None, shape: tuple[int, ...]
) -> tuple[np.ndarray, str, str]:
    """(image, format, note): `image` or a stand-in for input `shape` (C, H, W), the format
    full offload encodes it in (png for grayscale, jpeg for colour unless `fmt` says), and a
    note saying which stand-in was used ("" for the caller's own)."""
    channels, h, w = shape
    note = ""
    if image is None and (channels, h, w) == (1, 28, 28):
        image = _fashion_mnist_image()
        if image is not None:
            note = "full-offload bytes are for the first Fashion-MNIST test image"
    if image is None:
        image = synthetic_image(h, w, channels)
        note = (
            "full-offload bytes are for a synthetic image; pass a real one (--image) "
            "for a faithful input size"
        )
    image = np.asarray(image, dtype=np.uint8)
    if fmt is None:
        fmt = "png" if image.ndim == 2 or image.shape[-1] == 1 else "jpeg"
    return image, fmt, note


def _fashion_mnist_image() -> np.ndarray | None:
    """The first Fashion-MNIST test image if the dataset is on this machine (no download)."""
    from splitexit.data import find_fashion_mnist, load_fashion_mnist

    if find_fashion_mnist("test") is None:
        return None
    return np.asarray(load_fashion_mnist("test", download=False)[0][0])


def synthetic_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A deterministic, photo-like uint8 image (smooth shapes, mild noise) for byte counts."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    planes = []
    for c in range(channels):
        a, b, phase = rng.uniform(2, 6), rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
        base = 0.5 + 0.25 * np.sin(a * np.pi * xx + phase) * np.cos(b * np.pi * yy)
        blob = np.exp(-(((xx - 0.5) ** 2 + (yy - 0.45) ** 2) / 0.05)) * (0.3 + 0.1 * c)
        planes.append(base + blob + rng.normal(0, 0.02, (height, width)))
    img = np.clip(np.stack(planes, axis=-1) * 255, 0, 255).astype(np.uint8)
    return np.asarray(img[..., 0] if channels == 1 else img)


def load_image(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode an image file and resize it to the model input (what a device would send)."""
    from splitexit.preprocess import open_image, pil_to_array

    channels, h, w = shape
    with open_image(path) as img:
        img = img.convert("L" if channels == 1 else "RGB").resize((w, h))
        return pil_to_array(img)
