"""Writing a selection into a bundle: its thresholds and measure, a summary of what it
achieved under `metrics["calibration"]`, and what it was calibrated on under
`provenance["calibrated_on"]`. The fingerprint does not change."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .promise import PromiseCheck
from .table import CalibrationTable
from .thresholds import Selection


def write_selection(
    bundle_path: str | Path,
    selection: Selection,
    check: PromiseCheck | None = None,
    *,
    calibrated_on: dict[str, Any] | None = None,
) -> None:
    """Write a selection's thresholds and measure into a bundle directory's manifest, plus
    a summary under `metrics["calibration"]` and, if given, what it was calibrated on under
    `provenance["calibrated_on"]`; the fingerprint does not change."""
    from splitexit.bundle import read_manifest, update_manifest, write_thresholds

    write_thresholds(bundle_path, selection.thresholds, selection.measure)
    o = selection.outcome
    summary: dict[str, Any] = {
        "goal": selection.goal.to_dict(),
        "conservative": selection.conservative,
        "confidence": selection.confidence,
        "measure": selection.measure,
        "point": {"channels": o.point.channels, "bits": o.point.bits},
        "thresholds": selection.thresholds,
        "exit_samples": {name: e.to_dict() for name, e in selection.exit_samples.items()},
        "calibration": {
            "samples": o.n,
            "accuracy": o.accuracy,
            "tail_accuracy": o.tail_accuracy,
            "offload_rate": o.offload_rate,
            "exit_rates": o.exit_rates,
            "expected_bytes": o.expected_bytes,
            "expected_latency_ms": o.expected_latency_ms,
        },
    }
    if check is not None:
        summary["test"] = {
            "samples": check.test.n,
            "accuracy": check.test.accuracy,
            "offload_rate": check.test.offload_rate,
            "promises": [p.to_dict() for p in check.promises],
        }
    manifest = read_manifest(bundle_path)
    metrics = dict(manifest.metrics)
    metrics["calibration"] = json.loads(json.dumps(summary, default=jsonable))
    provenance = dict(manifest.provenance)
    if calibrated_on is not None:
        provenance["calibrated_on"] = calibrated_on
    update_manifest(bundle_path, metrics=metrics, provenance=provenance)


def calibrated_on(cal: CalibrationTable, test: CalibrationTable | None) -> dict[str, Any]:
    """Where each table's samples came from, and how many."""
    tables = {"calibration": cal, "test": test}
    return {
        name: {"source": t.info.get("source", "recorded tables"), "samples": t.n}
        for name, t in tables.items()
        if t is not None
    }


def jsonable(v: Any) -> Any:
    """`json.dumps(default=...)` for numpy scalars and tuples."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(f"not JSON serializable: {type(v).__name__}")
