"""Split-point profiling: where to cut a model, measured on this machine (Neurosurgeon style).

    for each split point p:  head_p ─ [encoder] ══ bottleneck frame ══ [decoder] ─ tail_p
        head, encoder ........ timed here at batch 1, times a device-speed factor
        decoder, tail ........ timed here at batch 1 (the server)
        bytes ................ split-point features raw (float32) and at 8 bits, and the
                               frame of a C-channel bottleneck at 1/2**d resolution and b bits
    predicted end-to-end latency per link rate (RTT added once per request):
        local only    = full model on the device
        full offload  = send the input image (PNG/JPEG bytes) + full model on the server
        split at p    = head + encoder on the device + send the frame + decoder + tail

The bottleneck is a fresh, untrained `splitexit.bottleneck.Bottleneck` of the configured
shape: its timing and size do not depend on training. Times are medians after a warm-up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from splitexit.cost import Compute, CostModel, Link
from splitexit.errors import SplitexitError

if TYPE_CHECKING:  # torch is imported when profiling starts, not to build the CLI parser
    import torch
    from torch import nn

DEFAULT_LINKS = (1.0, 5.0, 20.0, 100.0)


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
        cost = _split_cost(link, self.head_ms, self.encoder_ms, self.decoder_ms + self.tail_ms)
        return 1e3 * (cost.bottleneck_s() + cost.offload_s(self.bottleneck_bytes))


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


# -------------------------------------------------------------------------------- profile


def profile_model(
    model: nn.Module,
    *,
    input_shape: Sequence[int],
    name: str = "model",
    points: Sequence[str] | None = None,
    device_speed: float = 1.0,
    channels: int = 12,
    hidden: int = 48,
    downsample: int = 2,
    bits: int = 4,
    links: Sequence[float] = DEFAULT_LINKS,
    rtt_ms: float = 20.0,
    target_mbps: float = 5.0,
    image: np.ndarray | None = None,
    image_format: str | None = None,
    repeats: int = 20,
    warmup: int = 3,
) -> ModelProfile:
    """Profile every candidate split point of `model` (a StagedModel or any cuttable module).

    Args:
        input_shape: per-sample input (C, H, W).
        points: split points to try (default every valid one, `valid_split_points`).
        device_speed: how much slower the device is than this machine (head times x this).
        channels, hidden, downsample, bits: the bottleneck to size and time at each point.
        links: uplink rates in Mbit/s; `rtt_ms` is added once per offloaded request.
        target_mbps: the link rate the recommendation is made for.
        image: a uint8 input image [H, W(, C)] whose encoded bytes full offload would send
            (default a deterministic synthetic image); `image_format` png or jpeg (default
            png for grayscale, jpeg for colour).
    """
    import torch

    from splitexit.calibrate.policy import median_ms
    from splitexit.models import valid_split_points

    if not device_speed > 0:
        raise SplitexitError(f"device_speed must be positive, got {device_speed}")
    links = tuple(sorted(float(r) for r in links))
    if not links:
        raise SplitexitError("give at least one link rate (Mbit/s)")
    model = model.eval()
    shape = tuple(int(s) for s in input_shape)
    points = tuple(points) if points is not None else valid_split_points(model)
    if not points:
        raise SplitexitError(f"{name} has no valid split points")
    bottleneck = {"channels": channels, "hidden": hidden, "downsample": downsample, "bits": bits}
    notes: list[str] = []
    splits = []
    with torch.inference_mode():
        x = torch.zeros((1, *shape))
        full_ms = median_ms(lambda: model(x), repeats=repeats, warmup=warmup)
        for point in points:
            split = _measure_point(model, point, x, bottleneck, notes, repeats, warmup)
            if split is None:
                continue
            slowed = {
                **split,
                "head_ms": split["head_ms"] * device_speed,
                "encoder_ms": split["encoder_ms"] * device_speed,
            }
            int8_bytes = split["int8_bytes"] + _frame_overhead()

            def int8(r: float, s: dict[str, Any] = slowed, n: int = int8_bytes) -> float:
                cost = _split_cost(Link.mbit(r, rtt_ms), s["head_ms"], 0.0, s["tail_ms"])
                return 1e3 * (cost.bottleneck_s() + cost.offload_s(n))

            profile = SplitProfile(**slowed, latency_ms={}, int8_latency_ms={})
            profile.latency_ms.update({r: profile.predict(Link.mbit(r, rtt_ms)) for r in links})
            profile.int8_latency_ms.update({r: int8(r) for r in links})
            splits.append(profile)
    image, fmt, what = _input_image(image, image_format, shape)
    if what:
        notes.append(what)
    from splitexit.preprocess import encode_image

    input_bytes = len(encode_image(image, fmt))
    local_ms = full_ms * device_speed
    offload = {r: _offload_ms(Link.mbit(r, rtt_ms), input_bytes, full_ms) for r in links}
    best = {r: _best(Link.mbit(r, rtt_ms), local_ms, offload[r], splits)[0] for r in links}
    recommendation, reason = _recommend(
        target_mbps, rtt_ms, local_ms, full_ms, input_bytes, fmt, splits, best
    )
    return ModelProfile(
        model=name,
        input_shape=shape,
        device_speed=device_speed,
        full_ms=full_ms,
        input_bytes=input_bytes,
        input_format=fmt,
        links=links,
        rtt_ms=rtt_ms,
        bits=bits,
        splits=tuple(splits),
        local_ms=local_ms,
        offload_ms=offload,
        best=best,
        target_mbps=target_mbps,
        recommendation=recommendation,
        reason=reason,
        notes=tuple(notes),
    )


def profile_zoo(name: str, **kwargs: Any) -> ModelProfile:
    """Profile a model-zoo entry (random weights: timing and sizes do not need trained ones)
    at its own input size and over its own split points."""
    from splitexit.models import build_model, get_spec

    spec = get_spec(name)
    model_kwargs = kwargs.pop("model_kwargs", {}) or {}
    model = build_model(name, **model_kwargs)
    pre = spec.preprocessing
    kwargs.setdefault("points", spec.split_points)
    return profile_model(model, input_shape=(pre.channels, *pre.size), name=name, **kwargs)


def _measure_point(
    model: nn.Module,
    point: str,
    x: torch.Tensor,
    bottleneck: dict[str, int],
    notes: list[str],
    repeats: int,
    warmup: int,
) -> dict[str, Any] | None:
    """Times (ms, this machine) and sizes (bytes) of one cut; None if it cannot be profiled."""
    import torch

    from splitexit.bottleneck import Bottleneck
    from splitexit.calibrate.policy import median_ms
    from splitexit.codec import packed_size
    from splitexit.models import cut_model

    head, tail = cut_model(model, point)
    head.eval()
    tail.eval()
    f = head(x)
    if not isinstance(f, torch.Tensor) or f.dim() != 4:
        notes.append(f"skipped {point}: its output is not a [N, C, H, W] feature map")
        return None
    shape = tuple(int(s) for s in f.shape[1:])
    d = _fit_downsample(shape, bottleneck["downsample"])
    if d != bottleneck["downsample"]:
        notes.append(f"{point}: {shape[1]}x{shape[2]} features allow downsample {d} only")
    bits = bottleneck["bits"]
    codec = Bottleneck(
        shape, bottleneck["channels"], hidden=bottleneck["hidden"], downsample=d, bits=(bits,)
    ).eval()
    z = codec.encoder(f)
    code = tuple(int(s) for s in z.shape[1:])
    count = math.prod(shape)
    return {
        "point": point,
        "feature_shape": shape,
        "head_ms": median_ms(lambda: head(x), repeats=repeats, warmup=warmup),
        "tail_ms": median_ms(lambda: tail(f), repeats=repeats, warmup=warmup),
        "encoder_ms": median_ms(lambda: codec.encoder(f), repeats=repeats, warmup=warmup),
        "decoder_ms": median_ms(lambda: codec.decoder(z), repeats=repeats, warmup=warmup),
        "raw_bytes": 4 * count,
        "int8_bytes": count,
        "bottleneck_shape": code,
        "bottleneck_bytes": _frame_overhead() + packed_size(math.prod(code), bits),
    }


def _frame_overhead() -> int:
    """Bytes a one-sample frame adds to its payload: the header and one sample's qparams."""
    from splitexit.codec import HEADER_SIZE, QPARAM_SIZE

    return HEADER_SIZE + QPARAM_SIZE


def _fit_downsample(shape: tuple[int, ...], downsample: int) -> int:
    d = max(downsample, 0)
    while d > 0 and (shape[1] >> d < 1 or shape[2] >> d < 1):
        d -= 1
    return d


def _split_cost(link: Link, head_ms: float, encoder_ms: float, server_ms: float) -> CostModel:
    """The cost model of a split: the head and encoder on the device, the rest served."""
    device = Compute(segment_s=(head_ms / 1e3,), encode_s=encoder_ms / 1e3)
    return CostModel(link, device, Compute(tail_s=server_ms / 1e3))


def _offload_ms(link: Link, input_bytes: int, full_ms: float) -> float:
    """Full offload: the encoded input over `link`, the whole model on the server."""
    return 1e3 * CostModel(link, Compute(), Compute(model_s=full_ms / 1e3)).image_s(input_bytes)


def _best(
    link: Link, local: float, offload: float, splits: Sequence[SplitProfile]
) -> tuple[str, float]:
    """The fastest option over `link`: "local", "offload" or "split:<point>", and its ms."""
    options = {"local": local, "offload": offload}
    options.update({f"split:{s.point}": s.predict(link) for s in splits})
    name = min(options, key=lambda k: options[k])
    return name, options[name]


def _recommend(
    rate: float,
    rtt_ms: float,
    local: float,
    full_ms: float,
    input_bytes: int,
    fmt: str,
    splits: Sequence[SplitProfile],
    best: dict[float, str],
) -> tuple[str, str]:
    link = Link.mbit(rate, rtt_ms)
    offload = _offload_ms(link, input_bytes, full_ms)
    choice, latency = _best(link, local, offload, splits)
    wins = [f"{r:g}" for r, b in best.items() if b == choice]
    where = f"; of the rates profiled it wins at {', '.join(wins)} Mbit/s" if wins else ""
    if choice.startswith("split:"):
        s = next(s for s in splits if f"split:{s.point}" == choice)
        others = sorted((x.predict(link), x.point) for x in splits if x.point != s.point)
        runner = f", the next best split ({others[0][1]}) {others[0][0]:.2f} ms" if others else ""
        text = f"split after {s.point!r} at {rate:g} Mbit/s"
        reason = (
            f"it predicts {latency:.2f} ms end to end vs {local:.2f} ms local-only and "
            f"{offload:.2f} ms full offload{runner}; it sends a {s.bottleneck_bytes} B frame "
            f"instead of the {input_bytes} B {fmt.upper()} input"
            f"{where}"
        )
    elif choice == "local":
        text = f"run locally at {rate:g} Mbit/s (no split pays off)"
        fastest = min(splits, key=lambda s: s.predict(link), default=None)
        split_part = (
            f" and {fastest.predict(link):.2f} ms for the best split ({fastest.point})"
            if fastest
            else ""
        )
        reason = (
            f"the whole model takes {local:.2f} ms on the device, while any offload pays the "
            f"{rtt_ms:g} ms RTT and more: {offload:.2f} ms full offload{split_part}{where}"
        )
    else:
        text = f"offload the whole input at {rate:g} Mbit/s"
        reason = (
            f"sending the {input_bytes} B {fmt.upper()} input and running the full model "
            f"on the server ({offload:.2f} ms) beats {local:.2f} ms local-only and every split"
            f"{where}"
        )
    return text, reason


def _input_image(
    image: np.ndarray | None, fmt: str | None, shape: tuple[int, ...]
) -> tuple[np.ndarray, str, str]:
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
    return load_fashion_mnist("test", download=False)[0][0]


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
    return img[..., 0] if channels == 1 else img


def load_image(path: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode an image file and resize it to the model input (what a device would send)."""
    from splitexit.preprocess import open_image, pil_to_array

    channels, h, w = shape
    with open_image(path) as img:
        img = img.convert("L" if channels == 1 else "RGB").resize((w, h))
        return pil_to_array(img)
