"""Profiling: time every candidate cut of a model here at batch 1 and size what it sends.

The bottleneck is a fresh, untrained `splitexit.bottleneck.Bottleneck` of the configured
shape: its timing and size do not depend on training. Times are medians after a warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from splitexit.cost import Link
from splitexit.errors import SplitexitError

from .images import input_image
from .recommend import best_option, offload_ms, recommend, split_cost
from .result import ModelProfile, SplitProfile

if TYPE_CHECKING:  # torch is imported when profiling starts, not to build the CLI parser
    import torch
    from torch import nn

DEFAULT_LINKS = (1.0, 5.0, 20.0, 100.0)


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

    from splitexit.calibrate.replay import median_ms
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
                cost = split_cost(Link.mbit(r, rtt_ms), s["head_ms"], 0.0, s["tail_ms"])
                return float(1e3 * (cost.bottleneck_s() + cost.offload_s(n)))

            profile = SplitProfile(**slowed, latency_ms={}, int8_latency_ms={})
            profile.latency_ms.update({r: profile.predict(Link.mbit(r, rtt_ms)) for r in links})
            profile.int8_latency_ms.update({r: int8(r) for r in links})
            splits.append(profile)
    image, fmt, what = input_image(image, image_format, shape)
    if what:
        notes.append(what)
    from splitexit.preprocess import encode_image

    input_bytes = len(encode_image(image, fmt))
    local_ms = full_ms * device_speed
    offload = {r: offload_ms(Link.mbit(r, rtt_ms), input_bytes, full_ms) for r in links}
    best = {r: best_option(Link.mbit(r, rtt_ms), local_ms, offload[r], splits)[0] for r in links}
    recommendation, reason = recommend(
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
    from splitexit.calibrate.replay import median_ms
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
