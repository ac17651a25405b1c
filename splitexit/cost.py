"""The one cost model: the expected time of every action a device can take for an input.

    before the head ── send the image: image encode ─ link(image) ─ server: whole model
    head: preprocess ─ segment 0 ─ exit a ─ ... ─ segment n ─ exit b ─ bottleneck
          after exit e ── answer here (nothing more to pay); an exit may be skipped (its
          cost saved, its inputs carried on)
          at the bottleneck ─┬─ offload (k, bits): encode ─ link(frame) ─ server: tail
                             └─ finish the tail here: device tail

    link(n payload bytes) = queue + rtt + (n + overhead - base_bytes) x 8 / rate

`rtt` is the time of a request of `base_bytes` (a measured base latency: its few bytes are
already in it); `overhead` the protocol bytes around the payload, both ways. Everything is
seconds and bytes. `Compute` says what one machine takes per piece at batch size 1; the
device's and the server's go into one `CostModel`. `splitexit profile`, `splitexit
calibrate`, the device agent's policy and the benchmarks' floors all use this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Link:
    """The network: `rate_bps` each way, round trip `rtt_s` for a request of `base_bytes`,
    `overhead_bytes` around every payload (both ways; negative where the transport leaves
    part of the payload home, as the stream leaves the frame's header), `queue_s` behind
    requests in flight."""

    rate_bps: float
    rtt_s: float = 0.02
    overhead_bytes: float = 0.0
    base_bytes: float = 0.0
    queue_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.rate_bps > 0:
            raise ValueError(f"link rate must be positive (bit/s), got {self.rate_bps}")
        if self.rtt_s < 0 or self.base_bytes < 0 or not math.isfinite(self.overhead_bytes):
            raise ValueError("rtt and base bytes must be >= 0, overhead bytes finite")

    @classmethod
    def mbit(cls, rate_mbps: float, rtt_ms: float = 20.0, overhead_bytes: float = 0.0) -> Link:
        """A link in the units people say it in: Mbit/s and ms."""
        return cls(rate_mbps * 1e6, rtt_ms / 1e3, overhead_bytes)

    @classmethod
    def parse(cls, text: str, overhead_bytes: float = 0.0) -> Link:
        """A link from the emulator's spec syntax, e.g. "5mbit:20ms" (`splitexit.link`)."""
        from splitexit.link import parse_link

        spec = parse_link(text)
        if spec.rate_bps is None:
            raise ValueError(f"link {text!r} has no rate; give one, e.g. '5mbit:20ms'")
        return cls(spec.rate_bps, spec.rtt_s, overhead_bytes)

    @property
    def rate_mbps(self) -> float:
        return self.rate_bps / 1e6

    def transfer_s(self, payload_bytes: Any) -> Any:
        """Seconds from sending `payload_bytes` (a number or an array) to the answer."""
        wire = payload_bytes + self.overhead_bytes - self.base_bytes
        wire = np.maximum(wire, 0.0) if isinstance(wire, np.ndarray) else max(float(wire), 0.0)
        return self.queue_s + self.rtt_s + wire * 8.0 / self.rate_bps


@dataclass(frozen=True)
class Compute:
    """Seconds one machine takes per piece, at batch size 1.

    `encode_s` quantizes and frames the code, `tail_s` runs the tail (on the server: from the
    frame's bytes to the answer), `image_encode_s` compresses the input image (device),
    `model_s` answers an image with the whole model (server; None: the sum of its pieces).
    """

    segment_s: tuple[float, ...] = ()
    exit_s: tuple[float, ...] = ()
    preprocess_s: float = 0.0
    encode_s: float = 0.0
    tail_s: float = 0.0
    image_encode_s: float = 0.0
    model_s: float | None = None

    def scaled(self, factor: float) -> Compute:
        """Every time multiplied by `factor` (e.g. 8.0: a device 8x slower than this one)."""
        if not factor > 0:
            raise ValueError(f"a speed factor must be positive, got {factor}")
        return Compute(
            tuple(t * factor for t in self.segment_s),
            tuple(t * factor for t in self.exit_s),
            self.preprocess_s * factor,
            self.encode_s * factor,
            self.tail_s * factor,
            self.image_encode_s * factor,
            None if self.model_s is None else self.model_s * factor,
        )

    @property
    def head_s(self) -> float:
        """Preprocessing and every head segment, no exits."""
        return self.preprocess_s + sum(self.segment_s)

    @property
    def whole_s(self) -> float:
        """The whole model from an image (`model_s`, or preprocess + head + tail)."""
        return self.model_s if self.model_s is not None else self.head_s + self.tail_s


ACTIONS = ("image", "exit", "offload", "tail", "local")
"""What a device can do with an input: send the image, answer at an exit (its threshold
passed), offload at (k, bits), finish the tail here, or answer with the best exit now."""


@dataclass(frozen=True)
class CostModel:
    """A link between two machines and what each computes; `exit_segments[e]` is the head
    segment exit e reads (exits in the order the head reaches them)."""

    link: Link
    device: Compute
    server: Compute
    exit_segments: tuple[int, ...] = ()

    def exit_s(self, e: int, run: Sequence[bool] | None = None) -> float:
        """From the start to exit e's answer: preprocess, segments up to e's, the exits up to
        e (those `run` marks, default all)."""
        seg = self.device.segment_s[: self.exit_segments[e] + 1]
        exits = self.device.exit_s[: e + 1]
        if run is not None:
            exits = tuple(t for t, r in zip(exits, run, strict=False) if r)
        return self.device.preprocess_s + sum(seg) + sum(exits)

    def bottleneck_s(self, exits: bool | Sequence[bool] = True) -> float:
        """From the start to the code z: the whole head and every exit run (True: all,
        False: none, or a flag per exit)."""
        if isinstance(exits, bool):
            return self.device.head_s + (sum(self.device.exit_s) if exits else 0.0)
        ran = (t for t, r in zip(self.device.exit_s, exits, strict=False) if r)
        return self.device.head_s + sum(ran)

    def offload_s(self, frame_bytes: Any) -> Any:
        """From z to the server's answer for a frame of `frame_bytes`."""
        return self.device.encode_s + self.link.transfer_s(frame_bytes) + self.server.tail_s

    def tail_here_s(self) -> float:
        """From z to the answer, finishing the tail on the device."""
        return self.device.tail_s

    def image_s(self, image_bytes: Any, encode_s: float | None = None) -> Any:
        """From the pixels to the answer, sending the image (encoded in `encode_s`, default
        the device's `image_encode_s`) to the server's whole model."""
        enc = self.device.image_encode_s if encode_s is None else encode_s
        return enc + self.link.transfer_s(image_bytes) + self.server.whole_s

    def local_s(self) -> float:
        """The whole model on the device, no exits."""
        return self.device.head_s + self.device.tail_s

    def head_path_s(
        self, leave: Sequence[float], after_s: float, run: Sequence[bool] | None = None
    ) -> float:
        """Expected seconds running the head, where `leave[e]` is the chance an input leaves
        at exit e, `after_s` what one that reaches the bottleneck then pays, and `run` marks
        the exits run (default all; a skipped exit's inputs are taken to leave at none)."""
        on = [True] * len(leave) if run is None else list(run)
        taken = [p if r else 0.0 for p, r in zip(leave, on, strict=False)]
        stay = 1.0 - sum(taken)
        out = sum(p * self.exit_s(e, on) for e, p in enumerate(taken) if p)
        return out + max(0.0, stay) * (self.bottleneck_s(on) + after_s)
