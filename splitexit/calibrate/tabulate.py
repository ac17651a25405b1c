"""Tabulate what a bundle does on a split: run it once, batched, into a calibration table.

    images ─ preprocess ─ segment 0 ─┬─ ... ─ last segment ─ z ─┬─ quantize(k, bits) ─ tail
                                     │                          │    (every operating point)
                                 exit e: confidence under every measure, predicted class
                                                                └─ one-sample frame: its bytes

It uses the bundle's own TorchScript pieces and the deployment quantization, so the table
holds what a device and a server running this bundle would compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from splitexit.bottleneck import QuantizedTensor, dequantize, quantize, zero_fill
from splitexit.bundle.manifest import OperatingPoint
from splitexit.exits import CONFIDENCE_MEASURES, confidence

from .table import CalibrationError, CalibrationTable, Point


@torch.inference_mode()
def record_table(
    bundle: Any,
    images: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[int],
    *,
    points: Iterable[Sequence[int]] | None = None,
    batch_size: int = 256,
    measure_bytes: bool = True,
    info: Mapping[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationTable:
    """Run a bundle (loaded with all parts) over a split once and record its table.

    Args:
        bundle: a `splitexit.bundle.Bundle` with "head", "exits" and "tail" loaded.
        images: uint8 images [N, H, W] or [N, H, W, C] (or a list of [H, W(, C)] arrays of
            any sizes), preprocessed with the bundle's own preprocessing, as a device would.
        labels: [N] true classes.
        points: operating points (k, bits); default the manifest's (or all C channels at
            every bit-width when it lists none).
        measure_bytes: encode each sample's frame at each point to count its bytes (with the
            bundle's zstd level and dictionary); otherwise the uncompressed frame size.
        progress: called as progress(done, total) after each batch.
    """
    manifest = bundle.manifest
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise CalibrationError(f"got {len(images)} images but {len(labels)} labels")
    b = manifest.bottleneck
    pts = _points(points, manifest)
    exits = list(manifest.exits)
    exit_at = {e.segment: i for i, e in enumerate(exits)}
    n, n_exits = len(labels), len(exits)
    conf = {m: np.zeros((n, n_exits), np.float32) for m in CONFIDENCE_MEASURES}
    exit_pred = np.zeros((n, n_exits), np.int64)
    tail_pred = np.zeros((n, len(pts)), np.int64)
    frame_bytes = np.zeros((n, len(pts)), np.int64)
    device = bundle.device
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        f = _preprocess(bundle, images[rows], device)
        for i, segment in enumerate(bundle.segments):
            f = segment(f)
            if i in exit_at:
                e = exit_at[i]
                logits = bundle.exits[exits[e].name](f).float()
                exit_pred[rows, e] = logits.argmax(1).cpu().numpy()
                for m in CONFIDENCE_MEASURES:
                    conf[m][rows, e] = confidence(logits, m).cpu().numpy()
        for j, (k, bits) in enumerate(p.key for p in pts):
            qt = quantize(f[:, :k], bits, channels=b.channels)
            logits = bundle.tail(zero_fill(dequantize(qt), b.channels))
            tail_pred[rows, j] = logits.argmax(1).cpu().numpy()
            frame_bytes[rows, j] = _frame_sizes(qt, bundle) if measure_bytes else _raw_size(qt)
        if progress is not None:
            progress(rows.stop, n)
    meta = {
        "bundle": manifest.name,
        "fingerprint": manifest.fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "frame_bytes": "encoded" if measure_bytes else "uncompressed",
        "class_names": list(manifest.class_names),
        **dict(info or {}),
    }
    return CalibrationTable(
        labels=labels,
        exit_names=tuple(e.name for e in exits),
        exit_segments=tuple(e.segment for e in exits),
        segments=manifest.segments,
        confidence=conf,
        exit_prediction=exit_pred,
        points=pts,
        tail_prediction=tail_pred,
        frame_bytes=frame_bytes,
        info=meta,
    )


def _preprocess(bundle: Any, images: Any, device: Any) -> torch.Tensor:
    """A batch of uint8 images (an array, or a list of arrays of any sizes) to model input."""
    if isinstance(images, list | tuple):
        return torch.cat(
            [bundle.preprocess(np.asarray(img)[None], device=device) for img in images]
        )
    x: torch.Tensor = bundle.preprocess(images, device=device)
    return x


def _points(points: Iterable[Sequence[int]] | None, manifest: Any) -> tuple[Point, ...]:
    b = manifest.bottleneck
    if points is None:
        listed = [(p.channels, p.bits) for p in manifest.operating_points]
        pts = listed or [(b.channels, bits) for bits in b.bits]
    else:
        pts = [(int(p[0]), int(p[1])) for p in points]
    for k, bits in pts:
        if not 1 <= k <= b.channels or bits not in b.bits:
            raise CalibrationError(
                f"operating point (k={k}, bits={bits}) is outside the bundle's bottleneck "
                f"(k in 1..{b.channels}, bits in {list(b.bits)})"
            )
    return tuple(OperatingPoint(k, bits) for k, bits in dict.fromkeys(pts))


def _frame_sizes(qt: QuantizedTensor, bundle: Any) -> np.ndarray:
    from splitexit.codec import encode_frame

    level = bundle.manifest.codec.zstd_level
    dictionary = bundle.dictionary
    values, scale, zp = qt.values.cpu(), qt.scale.cpu(), qt.zero_point.cpu()
    sizes = np.empty(qt.batch_size, np.int64)
    for i in range(qt.batch_size):
        one = QuantizedTensor(
            values[i : i + 1], scale[i : i + 1], zp[i : i + 1], qt.bits, qt.channels
        )
        sizes[i] = len(encode_frame(one, bundle.fingerprint, level=level, dictionary=dictionary))
    return sizes


def _raw_size(qt: QuantizedTensor) -> int:
    from splitexit.codec import HEADER_SIZE, QPARAM_SIZE, packed_size

    return HEADER_SIZE + QPARAM_SIZE + packed_size(int(np.prod(qt.values.shape[1:])), qt.bits)
