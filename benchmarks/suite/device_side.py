"""The device's compute, timed per input and piece, and slowed down to model a slower device.

    agent ─ BenchHead.preprocess ─ .run (segments, exits) ─ .frame (quantize, frame)
                 │                    │                        │   TimedTail, timed_image
                 └── DeviceClock: ms per piece per input; sleeps (F - 1) x each piece ──┘

`--device-speed F` is emulated by sleeping: every device-side piece that took t seconds is
followed by a sleep of (F - 1) t (`splitexit.link.sleep_until`, on time within tens of
microseconds where a plain sleep wakes up 0.1-0.5 ms late on a virtual machine), so measured
latencies are those of a device F times slower at compute (the network, the server and the
agent's own Python are not slowed). F < 1 cannot be emulated this way; the report's
projections scale the analytic model instead.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any

import torch

from splitexit.bundle import Bundle
from splitexit.codec import encode_frame
from splitexit.link import sleep_until
from splitexit.runtime import HeadResult, HeadRunner


class DeviceClock:
    """Per-input device compute (ms by piece, unslowed) and the sleep that slows it by F."""

    def __init__(self, speed: float = 1.0) -> None:
        if not speed >= 1.0:
            raise ValueError(f"device speed must be >= 1 (a slower device), got {speed}")
        self.speed = speed
        self.entries: list[dict[str, float]] = []

    def begin(self) -> None:
        """A new input starts (its preprocessing)."""
        self.entries.append({})

    def add(self, piece: str, seconds: float) -> None:
        """Count `seconds` of compute for `piece` of the current input, then slow down."""
        if not self.entries:
            self.begin()
        entry = self.entries[-1]
        entry[piece] = entry.get(piece, 0.0) + seconds * 1e3
        self.slow(seconds)

    def slow(self, seconds: float) -> None:
        if self.speed > 1.0 and seconds > 0:
            sleep_until(time.monotonic() + (self.speed - 1.0) * seconds)

    def timed(self, piece: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs), counted as `piece`."""
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.add(piece, time.perf_counter() - start)
        return out


class TimedPreprocess:
    """The bundle's preprocessing for local-only, timed; each call starts a new input in the
    clock (the agent's inputs are started by whoever feeds them: an input sent as an image
    is not preprocessed on the device)."""

    def __init__(self, pre: Any, clock: DeviceClock) -> None:
        self.pre = pre
        self.clock = clock

    def __call__(self, images: Any, device: Any = None) -> torch.Tensor:
        self.clock.begin()
        return self.clock.timed("preprocess", self.pre, images, device)


class BenchHead(HeadRunner):
    """`HeadRunner` that times its pieces into a `DeviceClock` (each piece slowed right after
    it ran, and its timing in the result the slowed one, so the agent measures the device it
    models); `exits=False` never runs the exit branches (split-only: a deployment without
    exits pays nothing for them)."""

    def __init__(
        self,
        bundle: Bundle,
        clock: DeviceClock,
        *,
        exits: bool = True,
        thresholds: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(bundle, thresholds=thresholds)
        self.clock = clock
        self.use_exits = exits

    def preprocess(self, images: Any) -> Any:
        """As `HeadRunner.preprocess`, timed and slowed (the agent preprocesses through it)."""
        return self.clock.timed("preprocess", super().preprocess, images)

    def run(
        self,
        x: torch.Tensor,
        *,
        thresholds: Mapping[str, float] | None = None,
        exits: bool | Collection[str] = True,
    ) -> HeadResult:
        return super().run(x, thresholds=thresholds, exits=exits if self.use_exits else False)

    def _timed(self, result: HeadResult, key: str, call: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = call(*args)
        self.clock.add(
            "head" if key.startswith("segment_") else "exits", time.perf_counter() - start
        )
        result.timings[key] = time.perf_counter() - start
        return out

    def frame(
        self, z: torch.Tensor, bits: int, keep: int | None = None, *, compress: bool = True
    ) -> bytes:
        """As `HeadRunner.frame`, with quantizing and framing (pack + zstd) timed apart."""
        qt = self.clock.timed("quantize", self.encode, z, bits, keep)
        return self.clock.timed(
            "frame",
            encode_frame,
            qt,
            self.bundle.fingerprint,
            level=self.manifest.codec.zstd_level,
            dictionary=self.bundle.dictionary,
            compress=compress,
        )


class TimedTail:
    """The agent's `TailRunner` ("finish the tail here") with `run_code` timed and slowed."""

    def __init__(self, tail: Any, clock: DeviceClock) -> None:
        self.tail = tail
        self.clock = clock

    def run_code(self, z: Any) -> Any:
        return self.clock.timed("tail", self.tail.run_code, z)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tail, name)


def timed_image(clock: DeviceClock, quality: int = 95) -> Any:
    """The agent's image encode (for "send the image"), timed and slowed."""
    from splitexit.preprocess import encode_image

    return lambda pixels, fmt: clock.timed("image_encode", encode_image, pixels, fmt, quality)
