"""Input preprocessing and image (de)coding: pixels in, normalized model input out.

    uint8 [N,H,W] | [N,H,W,C] ─ to device ─ /255 ─ gray↔RGB ─ resize ─ (x-mean)/std ─► f32 [N,C,h,w]

`Preprocess` is what a bundle's manifest stores (`to_dict` / `from_dict`), so the device, the
server's "image" input baseline and the training code all feed the model the same tensors.
Calling it gives a torch tensor; `Preprocess.numpy` is its numpy twin (the same steps, the
same antialiased bilinear weights), for a device that runs ONNX and has no torch.
`decode_image` / `encode_image` turn PNG/JPEG/WebP bytes into uint8 arrays and back; they are
what the image baseline sends on the wire. Pillow is imported only when they are called.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from splitexit.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image as PILImage

#: ITU-R 601-2 luma weights, the ones Pillow's ``convert("L")`` uses.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

#: Default cap on decoded image size (pixels): 4096 x 4096. Headers claiming more are refused
#: before any pixel is decoded.
DEFAULT_MAX_PIXELS = 4096 * 4096

ImageBatch = Any  # np.ndarray | torch.Tensor of uint8 pixels


@dataclass(frozen=True)
class Preprocess:
    """Turn a batch of uint8 images into normalized float32 model input [N, channels, *size].

    Input layout is channels-last, as images come from decoders and cameras: [N, H, W]
    (grayscale) or [N, H, W, C] with C in {1, 3}, as a numpy array or a torch tensor.
    Grayscale is repeated to RGB when `channels` is 3; RGB becomes grayscale by luminance
    (`LUMA_WEIGHTS`) when `channels` is 1. Resizing is bilinear with antialiasing
    (`align_corners=False`) and happens only when the input size differs from `size`.

    `mean` and `std` hold one value per output channel (a single value is broadcast).
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channels: int = 1
    _cache: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be two positive ints (height, width), got {self.size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"{name} must have 1 or {self.channels} values (one per channel), "
                    f"got {len(values)}"
                )
            if not all(np.isfinite(values)):
                raise ValueError(f"{name} must be finite, got {values!r}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std!r}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "_cache", {})

    def __call__(
        self, images: ImageBatch, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Preprocess a batch; `device` (e.g. "cuda") moves the uint8 pixels before the math."""
        import torch
        import torch.nn.functional as F

        if "mean_t" not in self._cache:
            self._cache["mean_t"] = torch.tensor(self.mean).view(1, -1, 1, 1)
            self._cache["std_t"] = torch.tensor(self.std).view(1, -1, 1, 1)
        x = _to_nchw_uint8(images)
        if device is not None:
            x = x.to(device)
        x = x.float().div_(255.0)
        if x.shape[1] == 3 and self.channels == 1:  # before resizing: a third of the work
            luma = torch.tensor(LUMA_WEIGHTS, device=x.device).view(1, 3, 1, 1)
            x = (x * luma).sum(dim=1, keepdim=True)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(
                x, size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
        if x.shape[1] == 1 and self.channels == 3:  # after resizing: a third of the work
            x = x.expand(-1, 3, -1, -1)
        mean: torch.Tensor = self._cache["mean_t"].to(x.device)
        std: torch.Tensor = self._cache["std_t"].to(x.device)
        return ((x - mean) / std).contiguous()

    def numpy(self, images: np.ndarray) -> np.ndarray:
        """The numpy twin of calling this: uint8 [N,H,W] | [N,H,W,C] to float32 [N,C,*size].

        The same steps in the same order; the resize uses the weights of torch's antialiased
        bilinear interpolation, so the two agree to float32 rounding.
        """
        x = _to_nchw_uint8_np(images).astype(np.float32) / np.float32(255.0)
        if x.shape[1] == 3 and self.channels == 1:
            luma = np.asarray(LUMA_WEIGHTS, dtype=np.float32).reshape(1, 3, 1, 1)
            x = (x * luma).sum(axis=1, keepdims=True, dtype=np.float32)
        if tuple(x.shape[-2:]) != self.size:
            rows = _aa_bilinear_weights(x.shape[-2], self.size[0])
            cols = _aa_bilinear_weights(x.shape[-1], self.size[1])
            x = (rows @ x @ cols.T).astype(np.float32)
        if x.shape[1] == 1 and self.channels == 3:
            x = np.repeat(x, 3, axis=1)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(1, -1, 1, 1)
        return np.ascontiguousarray((x - mean) / std)

    def one(self, image: ImageBatch, device: torch.device | str | None = None) -> torch.Tensor:
        """Preprocess a single image [H, W] or [H, W, C] into [channels, *size]."""
        if image.ndim not in (2, 3):
            raise ValueError(f"expected one image [H, W] or [H, W, C], got shape {image.shape}")
        return self(image[None], device=device)[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored in a bundle manifest."""
        return {
            "size": list(self.size),
            "mean": list(self.mean),
            "std": list(self.std),
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocess:
        """Inverse of `to_dict`; raises ConfigError on missing, unknown or invalid keys."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"preprocessing must be a mapping, got {type(d).__name__}")
        known = {"size", "mean", "std", "channels"}
        missing = {"size", "channels"} - d.keys()
        unknown = d.keys() - known
        if missing or unknown:
            raise ConfigError(
                f"preprocessing needs keys {sorted(known)} (mean/std optional); "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        try:
            return cls(
                size=tuple(d["size"]),
                mean=tuple(d.get("mean", (0.0,))),
                std=tuple(d.get("std", (1.0,))),
                channels=int(d["channels"]),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"invalid preprocessing {dict(d)!r}: {e}") from e


def _to_nchw_uint8(images: ImageBatch) -> torch.Tensor:
    """[N,H,W] or [N,H,W,C] uint8 (numpy or torch) -> uint8 tensor [N,C,H,W] (a view if it can)."""
    import torch

    x = images
    if isinstance(images, np.ndarray):
        # torch wants writable memory (we never write: the next step copies to float)
        x = torch.from_numpy(np.require(images, requirements=["C", "W"]))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a numpy array or torch tensor, got {type(images).__name__}")
    if x.dtype != torch.uint8:
        raise TypeError(f"expected uint8 pixels in [0, 255], got dtype {x.dtype}")
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x.permute(0, 3, 1, 2)
    raise ValueError(
        "expected a channels-last batch [N, H, W] or [N, H, W, C] with C in {1, 3}, "
        f"got shape {tuple(x.shape)}"
    )


def _to_nchw_uint8_np(images: np.ndarray) -> np.ndarray:
    """[N,H,W] or [N,H,W,C] uint8 numpy -> uint8 [N,C,H,W] (a view)."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"expected a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 pixels in [0, 255], got dtype {images.dtype}")
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images.transpose(0, 3, 1, 2)
    raise ValueError(
        "expected a channels-last batch [N, H, W] or [N, H, W, C] with C in {1, 3}, "
        f"got shape {tuple(images.shape)}"
    )


def _aa_bilinear_weights(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of antialiased bilinear resizing (align_corners=False).

    The triangle filter widened by the scale when shrinking, taps clipped to the image and
    normalised, as in torch's `interpolate(..., antialias=True)` (and Pillow's resize).
    """
    scale = size_in / size_out
    support = scale if scale >= 1.0 else 1.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    w = np.zeros((size_out, size_in), dtype=np.float64)
    for i in range(size_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), size_in)
        j = np.arange(lo, hi)
        taps = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) * inv))
        w[i, lo:hi] = taps / taps.sum()
    return w.astype(np.float32)


# --------------------------------------------------------------------------- image codecs


def require_pillow() -> Any:
    """Import and return `PIL.Image`, or raise an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(
            "image decoding needs Pillow: pip install pillow (or pip install 'splitexit[dev]')"
        ) from e
    return Image


def pil_to_array(img: PILImage, mode: str | None = None) -> np.ndarray:
    """A Pillow image as uint8 [H, W, C]: grayscale modes give C=1, everything else RGB (C=3).

    `mode` forces a Pillow mode instead ("L", "RGB", "RGBA"). EXIF orientation is applied.
    """
    from PIL import ImageOps

    if img.getexif().get(0x0112, 1) != 1:  # EXIF Orientation: camera JPEGs
        img = ImageOps.exif_transpose(img)
    if mode is None:
        mode = "L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    if img.mode != mode:
        img = img.convert(mode)
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    return arr[:, :, None] if arr.ndim == 2 else arr


def open_image(
    source: Any,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = None,
) -> PILImage:
    """Open a path or file object with Pillow and check its size before decoding pixels.

    `formats` (Pillow names, e.g. ("PNG", "JPEG")) limits the decoders tried; None: all.
    """
    Image = require_pillow()
    img: PILImage = Image.open(source, formats=None if formats is None else list(formats))
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ValueError(
            f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}; "
            "resize it before sending, or raise max_pixels"
        )
    img.load()
    return img


def decode_image(
    data: bytes,
    mode: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    formats: Sequence[str] | None = None,
) -> np.ndarray:
    """PNG/JPEG/WebP/... bytes -> uint8 [H, W, C] (C=1 for grayscale, else 3; see `pil_to_array`).

    Raises ValueError on bytes Pillow cannot decode (whatever its decoder raises: some
    plugins raise NotImplementedError or AttributeError on hostile bytes), on images in none
    of `formats` (when given) and on images over `max_pixels` (checked from the header,
    before decompression: a decompression-bomb guard).
    """
    require_pillow()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    try:
        with open_image(io.BytesIO(data), max_pixels=max_pixels, formats=formats) as img:
            return pil_to_array(img, mode)
    except ValueError:
        raise
    except Exception as e:  # any decoder's failure on these bytes is the input's fault
        raise ValueError(f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {e}") from e


_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}


def encode_image(array: ImageBatch, format: str = "png", quality: int = 90) -> bytes:
    """uint8 [H, W] or [H, W, C] (C in 1, 3, 4) -> image bytes.

    PNG is lossless and optimized (`quality` is ignored); JPEG and WebP are lossy at `quality`
    (1-100). JPEG has no alpha channel: a 4-channel array is refused.
    """
    Image = require_pillow()
    fmt = _FORMATS.get(format.lower())
    if fmt is None:
        raise ValueError(f"format must be one of {sorted(_FORMATS)}, got {format!r}")
    if not isinstance(array, np.ndarray) and hasattr(array, "detach"):  # a torch tensor
        array = array.detach().cpu().numpy()
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(
            f"expected an image [H, W] or [H, W, C] with C in 1, 3, 4, got {arr.shape}"
        )
    if fmt == "JPEG" and arr.ndim == 3 and arr.shape[2] == 4:
        raise ValueError("JPEG cannot store an alpha channel; drop it or use png/webp")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    img = Image.fromarray(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format=fmt, optimize=True)
    else:
        img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()
