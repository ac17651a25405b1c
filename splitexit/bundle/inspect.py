"""A readable text rendering of a bundle's manifest (what `splitexit inspect` prints)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .load import Bundle
from .manifest import Manifest

_MAX_CLASSES = 20


def format_manifest(manifest: Manifest | Bundle, root: str | os.PathLike[str] | None = None) -> str:
    """Render a manifest as text. File sizes are shown when the bundle directory is known
    (a `Bundle`, or `root`)."""
    if isinstance(manifest, Bundle):
        root = manifest.path if root is None else root
        manifest = manifest.manifest
    m = manifest
    b = m.bottleneck
    _, h, w = b.code_shape
    lines = [
        f"bundle        {m.name}",
        f"format        {m.format} v{m.format_version}, splitexit {m.splitexit_version or '?'}, "
        f"created {m.created or '?'}",
        f"fingerprint   {m.fingerprint}",
        f"architecture  {_compact(m.architecture)}",
        f"split         after {m.split_point!r}; input {list(m.input_shape)}; "
        f"{m.segments} head segment{'s' if m.segments != 1 else ''}",
        f"bottleneck    C={b.channels}, code {list(b.code_shape)}, features "
        f"{list(b.feature_shape)}, bits {', '.join(map(str, b.bits))}",
        f"codec         zstd level {m.codec.zstd_level}, "
        + (f"dictionary {m.codec.dictionary}" if m.codec.dictionary else "no dictionary"),
        f"teacher acc.  {_num(m.teacher_accuracy)}",
        f"runtimes      {_runtimes(m)}",
        "",
        "exits",
    ]
    if m.exits:
        rows = [
            [
                e.name,
                str(e.segment),
                e.measure,
                f"{e.threshold:.4g}" + (" (never)" if e.threshold > 1 else ""),
                _num(e.accuracy),
            ]
            for e in m.exits
        ]
        lines += _table(["name", "segment", "measure", "threshold", "accuracy"], rows)
    else:
        lines.append("  (none: every input goes to the tail)")
    lines += ["", "operating points"]
    if m.operating_points:
        rows = [
            [
                str(p.channels),
                str(p.bits),
                str(math.ceil(p.channels * h * w * p.bits / 8)),
                _num(p.frame_bytes, "{:.1f}"),
                _num(p.accuracy),
            ]
            for p in m.operating_points
        ]
        lines += _table(["k", "bits", "raw payload B", "frame B (mean)", "accuracy"], rows)
    else:
        lines.append("  (none)")
    p = m.preprocessing
    pre = ", ".join(f"{k} {_compact(v)}" for k, v in p.items())
    shown = list(m.class_names[:_MAX_CLASSES])
    if len(m.class_names) > _MAX_CLASSES:
        shown.append(f"... ({len(m.class_names) - _MAX_CLASSES} more)")
    lines += [
        "",
        f"preprocessing {pre}",
        f"classes ({len(m.class_names)})  {', '.join(shown)}",
    ]
    if m.metrics:
        lines += ["", "metrics"] + [f"  {k}: {_compact(v)}" for k, v in m.metrics.items()]
    lines += ["", "files"]
    rows = []
    for rel, digest in sorted(m.files.items()):
        size = "?"
        if root is not None and (Path(root) / rel).is_file():
            size = _size((Path(root) / rel).stat().st_size)
        rows.append([rel, size, digest[:16]])
    lines += _table(["path", "size", "sha256"], rows, right={1})
    return "\n".join(lines) + "\n"


def _runtimes(m: Manifest) -> str:
    if not m.has_onnx:
        return "torch (TorchScript); no ONNX graphs (add them: splitexit onnx BUNDLE)"
    rec = m.onnx
    if not rec.get("max_abs_diff"):
        return "torch (TorchScript), onnxruntime (ONNX; parity not recorded)"
    return (
        f"torch (TorchScript), onnxruntime (ONNX opset {rec.get('opset', '?')}: max abs "
        f"difference {max(rec['max_abs_diff'].values()):.2g}, argmax agreement "
        f"{min(rec.get('argmax_agreement', {}).values() or [float('nan')]):.1%} on "
        f"{rec.get('samples', '?')} samples)"
    )


def _table(
    headers: Sequence[str], rows: list[list[str]], right: set[int] | None = None
) -> list[str]:
    widths = [max(len(r[i]) for r in [list(headers), *rows]) for i in range(len(headers))]
    right = right or set()

    def fmt(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(wd) if i in right else cell.ljust(wd)
            for i, (cell, wd) in enumerate(zip(row, widths, strict=True))
        ]
        return "  " + "  ".join(cells).rstrip()

    return [fmt(headers)] + [fmt(r) for r in rows]


def _num(v: float | None, spec: str = "{:.4f}") -> str:
    return "-" if v is None else spec.format(v)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024**2:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 1024**2:.1f} MiB"


def _compact(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, separators=(", ", ": "))
