"""`splitexit calibrate BUNDLE`, the work: record tables, choose thresholds, check, write.

    bundle + calibration split ─ record_table ─┐
    bundle + test split ──────── record_table ─┤ (or --load-tables DIR)
                                               ├─ select_thresholds(goal) ─ check_promise(test)
                                               └─ report ─ write_thresholds + metrics ─► bundle

The arguments are defined in `arguments.py` (no torch import there).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.cost import Compute, CostModel, Link

from .data import folder_split, held_out_splits
from .goals import Goal
from .policy import check_compute, measure_compute
from .promise import PromiseCheck, check_promise, promise_sweep
from .report import format_selection, format_sweep, format_table_summary
from .samples import warnings as sample_warnings
from .table import CalibrationError, CalibrationTable
from .tabulate import record_table
from .thresholds import Selection, select_thresholds


def run(args: argparse.Namespace) -> int:
    """Run `splitexit calibrate` with arguments parsed by `arguments.add_arguments`."""
    from splitexit.bundle import load_bundle

    bundle = load_bundle(args.bundle, device=args.device)
    cal, test = _tables(args, bundle)
    print(format_table_summary(cal, "calibration"))
    if test is not None:
        print(format_table_summary(test, "test"))
    goal = _goal(args, cal, bundle)
    options: dict[str, Any] = {
        "measure": args.measure,
        "point": parse_point(args.point),
        "confidence": args.confidence,
        "candidates": args.candidates,
    }
    selection = select_thresholds(cal, goal, conservative=args.conservative, **options)
    check = None if test is None else check_promise(selection, test)
    print()
    print(format_selection(selection, check))
    for line in sample_warnings(selection.exit_samples):
        print(line, file=sys.stderr)
    if args.sweep:
        if test is None:
            raise CalibrationError("--sweep needs a test split to check the promises on")
        print()
        print(format_sweep(promise_sweep(cal, test, **options)))
    if args.json:
        payload = {"selection": selection.to_dict(), "check": check and check.to_dict()}
        Path(args.json).write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    problem = None
    if not selection.feasible:
        problem = "the goal is not met on the calibration split"
    elif check is not None and not check.kept:
        problem = "the promise is missed on the held-out split" + (
            "" if selection.conservative else " (--conservative adds a statistical margin)"
        )
    if problem is not None and not args.force:
        print(
            f"splitexit: thresholds NOT written: {problem}; --force writes them anyway",
            file=sys.stderr,
        )
        return 1
    if not args.dry_run:
        write_selection(args.bundle, selection, check, calibrated_on=_calibrated_on(cal, test))
        print(f"\nthresholds written to {Path(args.bundle) / 'manifest.json'}")
    if problem is not None:
        return 1
    return 0


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
    metrics["calibration"] = json.loads(json.dumps(summary, default=_jsonable))
    provenance = dict(manifest.provenance)
    if calibrated_on is not None:
        provenance["calibrated_on"] = calibrated_on
    update_manifest(bundle_path, metrics=metrics, provenance=provenance)


def _calibrated_on(cal: CalibrationTable, test: CalibrationTable | None) -> dict[str, Any]:
    """Where each table's samples came from, and how many."""
    tables = {"calibration": cal, "test": test}
    return {
        name: {"source": t.info.get("source", "recorded tables"), "samples": t.n}
        for name, t in tables.items()
        if t is not None
    }


# -------------------------------------------------------------------------------- helpers


def _tables(
    args: argparse.Namespace, bundle: Any
) -> tuple[CalibrationTable, CalibrationTable | None]:
    if args.load_tables:
        root = Path(args.load_tables)
        cal = CalibrationTable.load(root / "calibration.npz")
        test = CalibrationTable.load(root / "test.npz") if (root / "test.npz").exists() else None
    else:
        splits, sources = _splits(args, bundle)
        tables = {}
        for name, (images, labels) in splits.items():
            print(f"recording the {name} table on {len(labels)} samples ...", file=sys.stderr)
            tables[name] = record_table(
                bundle,
                images,
                labels,
                batch_size=args.batch_size,
                info={"split": name, "source": sources[name]},
            )
        cal, test = tables["calibration"], tables.get("test")
        if args.save_tables:
            for name, table in tables.items():
                table.save(Path(args.save_tables) / f"{name}.npz")
    for table in (cal, test):
        if table is None:
            continue
        fp = table.info.get("fingerprint")
        if fp is not None and fp != bundle.fingerprint:
            raise CalibrationError(
                f"the tables were recorded from a bundle with fingerprint {fp[:16]}, not "
                f"{bundle.fingerprint[:16]}: record them again from this bundle"
            )
        if list(table.exit_names) != bundle.manifest.exit_names:
            raise CalibrationError(
                f"the tables have exits {list(table.exit_names)}, the bundle "
                f"{bundle.manifest.exit_names}: record them again from this bundle"
            )
    return cal, test


def _splits(args: argparse.Namespace, bundle: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The calibration and test splits: the run's own held-out splits as the bundle records
    them (or `--config`'s), with `--images` / `--test-images` in their place where given."""
    manifest = bundle.manifest
    out: dict[str, tuple[Any, np.ndarray]] = {}
    sources: dict[str, str] = {}
    if args.images:  # the user's folders first: a wrong one fails before anything loads
        out["calibration"] = folder_split(args.images, manifest, "--images")
        sources["calibration"] = str(Path(args.images).resolve())
    if args.test_images:
        out["test"] = folder_split(args.test_images, manifest, "--test-images")
        sources["test"] = str(Path(args.test_images).resolve())
    recorded = args.config or manifest.provenance.get("config") is not None
    if not (args.images and args.test_images) and (recorded or not args.images):
        config = _config(args.config) if args.config else None
        held_out, where = held_out_splits(
            manifest, config, seed=args.seed, calibration_size=args.calibration_size
        )
        if "calibration" not in held_out and not args.images:
            raise CalibrationError(
                f"{where} holds out no calibration split: pass --images DIR, or retrain with "
                "data.calibration > 0 or data.val_root"
            )
        for name, split in held_out.items():
            if name not in out:
                out[name], sources[name] = split, where
    if args.subset:
        out = {k: _subset(x, y, args.subset, args.seed) for k, (x, y) in out.items()}
    return out, sources


def _subset(images: Any, labels: np.ndarray, n: int, seed: int) -> tuple[Any, np.ndarray]:
    """A seeded random subset of at most n samples, in the original order."""
    if n >= len(labels):
        return images, labels
    idx = np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    picked = [images[i] for i in idx] if isinstance(images, list) else images[idx]
    return picked, labels[idx]


def _config(name: str) -> Any:
    from splitexit.train.config import load_config

    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json":
        try:
            return _config_dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise CalibrationError(f"--config {name}: cannot read {path} ({e})") from None
    from splitexit.train.config import resolve_config

    return load_config(resolve_config(name))


def _config_dict(table: Any) -> Any:
    from splitexit.train.config import config_from_dict

    return config_from_dict(table)


def _goal(args: argparse.Namespace, table: CalibrationTable, bundle: Any) -> Goal:
    min_acc = None if args.min_accuracy is None else args.min_accuracy / 100.0
    if args.goal == "offload":
        if args.offload_rate is None:
            raise CalibrationError("--goal offload needs --offload-rate PERCENT")
        return Goal.offload(args.offload_rate / 100.0, max_drop=args.max_drop, min_accuracy=min_acc)
    drop = 1.0 if args.max_drop is None else args.max_drop
    if args.goal == "accuracy":
        return Goal.accuracy(drop, min_accuracy=min_acc)
    try:
        link = (
            Link.parse(args.link, args.overhead_bytes)
            if args.link
            else Link.mbit(args.bandwidth_mbps, args.rtt_ms, args.overhead_bytes)
        )
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    device, server = _compute(args, table, bundle)
    cost = CostModel(link, device, server, table.exit_segments)
    return Goal.latency(cost, max_drop=drop, min_accuracy=min_acc)


def _compute(
    args: argparse.Namespace, table: CalibrationTable, bundle: Any
) -> tuple[Compute, Compute]:
    """The device's and the server's compute: given in ms, or measured here (the device
    side times `--device-speed`)."""
    given = (args.segment_ms, args.exit_ms, args.tail_ms)
    if all(v is not None for v in given):
        device = Compute(
            tuple(t / 1e3 for t in args.segment_ms),
            tuple(t / 1e3 for t in args.exit_ms),
            encode_s=(args.encode_ms or 0.0) / 1e3,
        )
        check_compute(device, table)
        return device, Compute(tail_s=args.tail_ms / 1e3)
    if any(v is not None for v in given):
        raise CalibrationError(
            "give all of --segment-ms, --exit-ms and --tail-ms, or none "
            "(then they are measured on this machine)"
        )
    here = measure_compute(bundle)
    device = here.scaled(args.device_speed)
    if args.encode_ms is not None:
        device = replace(device, encode_s=args.encode_ms / 1e3)
    print(
        "timings measured here (device x{:g}): segments {} ms, exits {} ms, encode {:.3f} ms, "
        "tail {:.3f} ms".format(
            args.device_speed,
            ", ".join(f"{t * 1e3:.3f}" for t in device.segment_s),
            ", ".join(f"{t * 1e3:.3f}" for t in device.exit_s),
            device.encode_s * 1e3,
            here.tail_s * 1e3,
        ),
        file=sys.stderr,
    )
    return device, Compute(tail_s=here.tail_s)


def parse_point(text: str | None) -> tuple[int, int] | None:
    """ "K,BITS" -> (K, BITS); None stays None. Raises CalibrationError (a ValueError)."""
    if text is None:
        return None
    try:
        k, bits = (int(v) for v in text.split(","))
    except ValueError:
        raise CalibrationError(f"--point must be K,BITS (e.g. 12,4), got {text!r}") from None
    return k, bits


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(f"not JSON serializable: {type(v).__name__}")
