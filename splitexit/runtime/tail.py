"""The server side: frames in, answers out, many frames in one tail call.

    frame_1 ─ decode + check ─ dequantize ─ zero-fill to C ─┐
    frame_2 ─ decode + check ─ dequantize ─ zero-fill to C ─┼─ cat ─ tail (decoder + stages)
    ...                                                     ┘      ─ split by frame ─► answers

Frames may mix operating points (k channels, bits): after dequantizing and zero-filling they
all have the code shape [n_i, C, h, w], so they batch into one call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splitexit.bottleneck.module import zero_fill
from splitexit.bottleneck.quantize import QuantizedTensor
from splitexit.bundle.load import Bundle
from splitexit.codec import decode_frame
from splitexit.codec.frame import DEFAULT_MAX_RAW_BYTES, DEFAULT_MAX_SAMPLES
from splitexit.errors import FrameError


@dataclass(frozen=True)
class TailAnswer:
    """The tail's answer for one frame of n samples (CPU tensors)."""

    logits: torch.Tensor  # [n, K] float32
    prediction: torch.Tensor  # [n] int64, argmax class
    probability: torch.Tensor  # [n] float32, softmax probability of that class

    @property
    def batch_size(self) -> int:
        return int(self.logits.shape[0])


class TailRunner:
    """Runs a bundle's tail (loaded with part "tail") on frames or decoded codes.

    One call runs at a time per runner (a lock serialises callers), so a server may call it
    from a worker thread. `max_samples` / `max_raw_bytes` bound what a frame may claim.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES,
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.tail = bundle.tail
        self.device = bundle.device
        self.max_samples = max_samples
        self.max_raw_bytes = max_raw_bytes
        self._lock = threading.Lock()

    def decode(self, data: bytes | bytearray | memoryview) -> QuantizedTensor:
        """Decode one frame and check it fits this bundle.

        Raises FingerprintMismatch for a frame from another bundle, FrameError otherwise.
        """
        frame = decode_frame(
            data,
            expected_fingerprint=self.bundle.fingerprint,
            dictionary=self.bundle.dictionary,
            max_raw_bytes=self.max_raw_bytes,
            max_samples=self.max_samples,
        )
        self.check(frame.tensor)
        return frame.tensor

    def check(self, qt: QuantizedTensor) -> None:
        """Raise FrameError unless `qt` has this bundle's C, code shape and a supported bits."""
        b = self.manifest.bottleneck
        c, h, w = b.code_shape
        shape = tuple(qt.values.shape)
        fix = "the device runs another model or bundle; deploy the same bundle to both"
        if qt.channels != c or len(shape) != 4 or shape[2:] != (h, w) or not 1 <= shape[1] <= c:
            raise FrameError(
                f"code of shape {list(shape)} with C={qt.channels} does not fit this bundle's "
                f"code [n, k<={c}, {h}, {w}] with C={c}: {fix}"
            )
        if qt.bits not in b.bits:
            raise FrameError(
                f"code uses {qt.bits} bits; bundle {self.manifest.name!r} supports "
                f"{list(b.bits)}: send one of its operating points"
            )

    def run_frames(self, frames: Sequence[bytes | bytearray | memoryview]) -> list[TailAnswer]:
        """Decode and check every frame, then answer all of them in one tail call, in order."""
        return self.run_codes([self.decode(f) for f in frames])

    def run_codes(self, codes: Sequence[QuantizedTensor]) -> list[TailAnswer]:
        """Answer already decoded codes (one tail call for all); one TailAnswer per code."""
        if not codes:
            return []
        for qt in codes:
            self.check(qt)
        channels = self.manifest.bottleneck.channels
        with self._lock, torch.inference_mode():
            x = torch.cat([zero_fill(_dequantize(qt, self.device), channels) for qt in codes])
            logits = self.tail(x).float()
            probability, prediction = torch.softmax(logits, dim=1).max(dim=1)
            logits, probability, prediction = (t.cpu() for t in (logits, probability, prediction))
        sizes = [qt.batch_size for qt in codes]
        return [
            TailAnswer(*parts)
            for parts in zip(
                logits.split(sizes), prediction.split(sizes), probability.split(sizes), strict=True
            )
        ]

    def warmup(self, batch_size: int = 1) -> None:
        """Run the tail once on zeros so the first real request is not the slow one."""
        with self._lock, torch.inference_mode():
            self.tail(
                torch.zeros((batch_size, *self.manifest.bottleneck.code_shape), device=self.device)
            )


def _dequantize(qt: QuantizedTensor, device: torch.device) -> torch.Tensor:
    """Dequantize on `device` (moving the uint8 values, not the 4x larger floats)."""
    v = qt.values.to(device).float()
    zp = qt.zero_point.to(device).float().view(-1, 1, 1, 1)
    scale = qt.scale.to(device).float().view(-1, 1, 1, 1)
    return (v - zp) * scale
