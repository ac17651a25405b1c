"""Bytes per offloaded input for every wire format, and the accuracy each gives, offline.

    pixels ─┬─ JPEG q75 / q95, PNG, WebP q90 ─ decode ─ head ─ code at the server's point ─ tail
            └─ head ─┬─ split-point features ─ float16 raw | 8-bit frame        (no bottleneck)
                     └─ code z ─ frame at (k, bits), every operating point ─ tail

Sizes are of the payload exactly as sent (a frame includes its header and quantization
parameters); the HTTP overhead (request line, headers, inference JSON header, BYTES length
prefix) is measured on real requests of each kind and given apart. Accuracies are on the
same inputs as the live runs, computed in-process with the same TorchScript pieces.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from splitexit.bottleneck.quantize import quantize
from splitexit.bundle import Bundle
from splitexit.codec import HEADER_SIZE, QPARAM_SIZE, encode_frame
from splitexit.preprocess import decode_image, encode_image
from splitexit.runtime import HeadRunner, TailRunner
from splitexit_device.client import OffloadClient, request_wire_bytes
from splitexit_device.config import operating_points
from splitexit_device.policy import best_point

from .inputs import Inputs
from .strategies import image_request

IMAGE_CODECS = (
    ("JPEG q75", "jpeg", 75),
    ("JPEG q95", "jpeg", 95),
    ("PNG", "png", 90),
    ("WebP q90", "webp", 90),
)
CHUNK = 64


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


@torch.inference_mode()
def _head_outputs(bundle: Bundle, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The code z [N, C, h, w] and the split-point features before the encoder (or None)."""
    pre = bundle.preprocess
    zs, feats = [], []
    for rows in _chunks(len(inputs)):
        f = pre(inputs.pixels[rows])
        for segment in bundle.segments[:-1]:
            f = segment(f)
        last = dict(bundle.segments[-1].named_children())
        if list(last)[-1:] != ["encoder"]:
            zs.append(bundle.segments[-1](f))
            continue
        for name, module in last.items():
            if name == "encoder":
                feats.append(f)
            f = module(f)
        zs.append(f)
    return torch.cat(zs), (torch.cat(feats) if len(feats) == len(zs) else None)


def _accuracy(tail: TailRunner, frames: list[bytes], labels: np.ndarray) -> float:
    preds = []
    for rows in _chunks(len(frames)):
        preds += [int(a.prediction[0]) for a in tail.run_frames(frames[rows])]
    return float(np.mean(np.asarray(preds) == labels))


async def _overheads(model: str, sample: dict[str, bytes]) -> tuple[int, dict[str, int]]:
    """HTTP bytes around a frame (the agent's own estimate, deadline included) and around
    each kind of image."""
    async with OffloadClient("http://127.0.0.1:9", model) as client:
        frame = client.request_overhead()
    url = "http://127.0.0.1:9"
    images = {
        k: request_wire_bytes(image_request(url, model, v, "bench-000000")) - len(v)
        for k, v in sample.items()
    }
    return frame, images


def _row(what: str, kind: str, payload: float, http: float, **extra: Any) -> dict[str, Any]:
    return {
        "what": what,
        "kind": kind,
        "payload_bytes": round(payload, 1),
        "http_overhead_bytes": round(http, 1),
        "wire_bytes": round(payload + http, 1),
        **extra,
    }


def _points_to_score(
    bundle: Bundle, n: int, tail_ms: float, budget_s: float
) -> set[tuple[int, int]]:
    """The operating points whose accuracy is measured on the inputs: all of them if the tail
    runs fit in `budget_s`, else every bit-width at the widest, middle and narrowest k."""
    points = {(p.channels, p.bits) for p in operating_points(bundle)}
    if len(points) * n * tail_ms / 1e3 <= budget_s:
        return points
    ks = sorted({k for k, _ in points})
    keep = {ks[0], ks[len(ks) // 2], ks[-1]}
    return {(k, b) for k, b in points if k in keep}


@torch.inference_mode()
def measure_wire(
    bundle: Bundle,
    inputs: Inputs,
    *,
    tail_ms: float = 0.0,
    budget_s: float = 60.0,
    frame_http: float | None = None,
) -> dict[str, Any]:
    """Rows of (what is sent, payload bytes, HTTP overhead, accuracy), and the float-code
    accuracy (the local-only model's). Accuracy per operating point is measured on the
    inputs where the tail runs fit `budget_s` (at `tail_ms` each), see `_points_to_score`;
    every row also carries the manifest's accuracy (measured on the test set when trained).
    `frame_http`: the HTTP bytes around a frame as measured on the live requests (default:
    `OffloadClient.request_overhead()`, which assumes a deadline parameter)."""
    m = bundle.manifest
    head, tail = HeadRunner(bundle), TailRunner(bundle)
    labels = inputs.labels
    z, feats = _head_outputs(bundle, inputs)
    n = len(inputs)
    float_acc = float((bundle.tail(z).argmax(dim=1).numpy() == labels).mean())

    images = {
        label: [encode_image(inputs.pixels[i], fmt, q) for i in range(n)]
        for label, fmt, q in IMAGE_CODECS
    }
    estimate, image_http = asyncio.run(_overheads(m.name, {k: v[0] for k, v in images.items()}))
    frame_http = estimate if frame_http is None else frame_http

    rows = []
    server = best_point(operating_points(bundle))
    for label, data in images.items():
        decoded = np.stack([decode_image(d) for d in data])
        zi, _ = _head_outputs(bundle, Inputs(decoded, labels, ()))
        frames = [head.frame(zi[i : i + 1], server.bits, server.channels) for i in range(n)]
        acc = _accuracy(tail, frames, labels)
        size = float(np.mean([len(d) for d in data]))
        rows.append(
            _row(f"input {label}", "image", size, image_http[label], accuracy=round(acc, 4))
        )
    if feats is not None:
        c, h, w = (int(d) for d in feats.shape[1:])
        f8 = [len(encode_frame(quantize(feats[i : i + 1], 8), m.fingerprint)) for i in range(n)]
        header = HEADER_SIZE + QPARAM_SIZE
        what = "split-point features"
        rows.append(_row(f"{what}, float16 raw", "features", 2.0 * c * h * w, frame_http))
        rows.append(_row(f"{what}, 8-bit frame", "features", float(np.mean(f8)), frame_http))
        rows[-1]["frame_header_bytes"] = header
        rows[-2]["shape"] = rows[-1]["shape"] = [c, h, w]
    scored = _points_to_score(bundle, n, tail_ms, budget_s)
    for p in sorted(operating_points(bundle), key=lambda p: (-p.channels, p.bits)):
        frames = [head.frame(z[i : i + 1], p.bits, p.channels) for i in range(n)]
        acc = _accuracy(tail, frames, labels) if (p.channels, p.bits) in scored else None
        rows.append(
            _row(
                f"bottleneck k={p.channels}, {p.bits}-bit",
                "frame",
                float(np.mean([len(f) for f in frames])),
                frame_http,
                accuracy=None if acc is None else round(acc, 4),
                frame_header_bytes=HEADER_SIZE + QPARAM_SIZE,
                channels=p.channels,
                bits=p.bits,
                manifest_accuracy=p.accuracy,
            )
        )
    return {
        "inputs": n,
        "rows": rows,
        "float_code_accuracy": round(float_acc, 4),
        "server_point": [server.channels, server.bits],
        "code_shape": list(m.bottleneck.code_shape),
        "teacher_accuracy": m.teacher_accuracy,
    }
