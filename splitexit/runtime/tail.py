"""The server side: frames in, answers out, many frames in one tail call.

    frame_1 ─ decode + check ─ dequantize ─ zero-fill to C ─┐
    frame_2 ─ decode + check ─ dequantize ─ zero-fill to C ─┼─ cat ─ tail (decoder + stages)
    ...                                                     ┘      ─ split by frame ─► answers

Frames may mix operating points (k channels, bits): after dequantizing and zero-filling they
all have the code shape [n_i, C, h, w], so they batch into one call. The tail runs on a
backend (`runtime=`, see `backends`); dequantization is the bottleneck's `dequantize`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from splitexit.bottleneck.quantize import QuantizedTensor
from splitexit.bundle.load import Bundle
from splitexit.codec import decode_frame
from splitexit.codec.frame import DEFAULT_MAX_RAW_BYTES, DEFAULT_MAX_SAMPLES
from splitexit.errors import FrameError

from .backends import RuntimeOptions, open_backend


@dataclass(frozen=True)
class TailAnswer:
    """The tail's answer for one frame of n samples, on the CPU: torch tensors from the torch
    backend, numpy arrays from onnxruntime (`numpy.asarray` reads either)."""

    logits: Any  # [n, K] float32
    prediction: Any  # [n] int64, argmax class
    probability: Any  # [n] float32, softmax probability of that class

    @property
    def batch_size(self) -> int:
        return int(self.logits.shape[0])


class TailRunner:
    """Runs a bundle's tail (loaded with part "tail") on frames or decoded codes.

    One call runs at a time per runner (a lock serialises callers), so a server may call it
    from a worker thread. `max_samples` / `max_raw_bytes` bound what a frame may claim.
    `runtime`: `RuntimeOptions` or a runtime name (default "torch", as `HeadRunner`).
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES,
        runtime: RuntimeOptions | str | None = None,
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.backend = open_backend(bundle, ("tail",), runtime)
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
        be = self.backend
        with self._lock:
            logits = be.tail(be.codes(codes, self.manifest.bottleneck.channels))
            logits, prediction, probability = be.answers(logits)
        answers, row = [], 0
        for qt in codes:
            rows = slice(row, row + qt.batch_size)
            row += qt.batch_size
            answers.append(TailAnswer(logits[rows], prediction[rows], probability[rows]))
        return answers

    def run_code(self, z: Any) -> TailAnswer:
        """The tail on an unquantized code z [n, C, h, w] from a head on the same runtime: the
        device finishing the inference itself (decoder + stages, nothing quantized)."""
        be = self.backend
        with self._lock:
            logits, prediction, probability = be.answers(be.tail(be.input(z)))
        return TailAnswer(logits, prediction, probability)

    def warmup(self, batch_size: int = 1) -> None:
        """Run the tail once on zeros so the first real request is not the slow one."""
        with self._lock:
            self.backend.tail(
                self.backend.zeros((batch_size, *self.manifest.bottleneck.code_shape))
            )
