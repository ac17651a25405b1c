"""What a profile holds: one `SplitProfile` per candidate cut, and the `ModelProfile` that
adds local-only, full offload and the recommendation, with its table and JSON forms."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from splitexit.cost import Link

from .recommend import split_cost


@dataclass(frozen=True)
class SplitProfile:
    """One candidate split point: times (ms), sizes (bytes) and predicted latency by link."""

    point: str
    feature_shape: tuple[int, ...]
    head_ms: float  # on the device (measured here x device_speed)
    tail_ms: float  # on the server
    encoder_ms: float  # on the device
    decoder_ms: float  # on the server
    raw_bytes: int  # float32 features
    int8_bytes: int  # features at 8 bits, payload only
    bottleneck_shape: tuple[int, int, int]
    bottleneck_bytes: int  # one-sample frame: header + qparams + packed payload (no zstd)
    latency_ms: dict[float, float]  # split with the bottleneck, by Mbit/s
    int8_latency_ms: dict[float, float]  # split sending 8-bit features, no bottleneck

    def predict(self, link: Link) -> float:
        """End-to-end ms over `link`: head + encoder, the frame, decoder + tail."""
        cost = split_cost(link, self.head_ms, self.encoder_ms, self.decoder_ms + self.tail_ms)
        return float(1e3 * (cost.bottleneck_s() + cost.offload_s(self.bottleneck_bytes)))


@dataclass(frozen=True)
class ModelProfile:
    """A model's split-point profile and the recommendation drawn from it."""

    model: str
    input_shape: tuple[int, ...]
    device_speed: float
    full_ms: float  # the whole model, measured here (the server's time)
    input_bytes: int
    input_format: str
    links: tuple[float, ...]
    rtt_ms: float
    bits: int
    splits: tuple[SplitProfile, ...]
    local_ms: float  # the whole model on the device
    offload_ms: dict[float, float]
    best: dict[float, str]  # Mbit/s -> "local", "offload" or "split:<point>"
    target_mbps: float
    recommendation: str
    reason: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("offload_ms", "best"):
            d[key] = {f"{k:g}": v for k, v in d[key].items()}
        for s in d["splits"]:
            for key in ("latency_ms", "int8_latency_ms"):
                s[key] = {f"{k:g}": v for k, v in s[key].items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def format(self) -> str:
        """A readable table: one row per split point, then local-only and full offload."""
        rates = "".join(f"{f'@{r:g}Mb/s':>11}" for r in self.links)
        head = (
            f"{'option':<16}{'shape':>14}{'dev ms':>9}{'srv ms':>9}{'raw B':>9}{'8-bit B':>9}"
            f"{'frame B':>9}{rates}"
        )
        lines = [
            f"{self.model}: input {'x'.join(map(str, self.input_shape))}, full model "
            f"{self.full_ms:.2f} ms here, device x{self.device_speed:g}, RTT {self.rtt_ms:g} ms, "
            f"bottleneck {self.splits[0].bottleneck_shape[0] if self.splits else '-'} ch at "
            f"{self.bits} bits",
            head,
            "-" * len(head),
        ]
        for s in self.splits:
            lat = "".join(f"{s.latency_ms[r]:>11.2f}" for r in self.links)
            lines.append(
                f"{'split:' + s.point:<16}{'x'.join(map(str, s.feature_shape)):>14}"
                f"{s.head_ms + s.encoder_ms:>9.2f}{s.decoder_ms + s.tail_ms:>9.2f}"
                f"{s.raw_bytes:>9}{s.int8_bytes:>9}{s.bottleneck_bytes:>9}{lat}"
            )
        lines.append(
            f"{'local':<16}{'':>14}{self.local_ms:>9.2f}{'':>9}{'':>27}"
            + "".join(f"{self.local_ms:>11.2f}" for _ in self.links)
        )
        lines.append(
            f"{'offload':<16}{self.input_format:>14}{'':>9}{self.full_ms:>9.2f}"
            f"{self.input_bytes:>9}{'':>18}"
            + "".join(f"{self.offload_ms[r]:>11.2f}" for r in self.links)
        )
        lines.append(
            "(dev ms: head + bottleneck encoder on the device; srv ms: decoder + tail on the "
            "server; frame B: one-sample bottleneck frame, before zstd; latencies in ms)"
        )
        lines.append("best: " + ", ".join(f"{r:g} Mbit/s {self.best[r]}" for r in self.links))
        lines.append(f"recommendation: {self.recommendation}")
        lines.append(f"  because {self.reason}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
