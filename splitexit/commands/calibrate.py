"""`splitexit calibrate BUNDLE`: record tables, choose thresholds, check, write.

    bundle + calibration split ─ record_table ─┐
    bundle + test split ──────── record_table ─┤ (or --load-tables DIR)
                                               ├─ select_thresholds(goal) ─ check_promise(test)
                                               └─ report ─ write_selection ─► bundle

The work is `splitexit.calibrate`'s; this module turns the arguments into its calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitexit.cost import Compute, CostModel, Link

if TYPE_CHECKING:  # the library imports torch: on first use, not to build the parser
    from splitexit.calibrate import CalibrationTable, Goal

HELP = "choose exit thresholds for a goal, check them on held-out data, write them"
DESCRIPTION: str | None = None

# the same as goals.GOALS and exits.CONFIDENCE_MEASURES (a test keeps them in sync), written
# out so that building the parser imports no torch
GOAL_CHOICES = ("accuracy", "offload", "latency")
MEASURE_CHOICES = ("max_prob", "margin", "entropy", "auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `calibrate` command's arguments to `parser`."""
    parser.add_argument("bundle", help="bundle directory (its manifest is rewritten in place)")
    data = parser.add_argument_group("data (default: Fashion-MNIST, held out as training does)")
    data.add_argument(
        "--config",
        help="experiment config (TOML, shipped name, or a run's "
        "config.json): use exactly its calibration and test splits",
    )
    data.add_argument("--images", help="image folder (root/<class>/<image>) to calibrate on")
    data.add_argument("--test-images", help="image folder to check the promise on")
    data.add_argument("--seed", type=int, default=0, help="Fashion-MNIST split seed (0)")
    data.add_argument(
        "--calibration-size",
        type=int,
        default=5000,
        help="Fashion-MNIST images held out of training for calibration (5000)",
    )
    data.add_argument("--subset", type=int, help="use at most this many samples per split")
    data.add_argument(
        "--load-tables",
        metavar="DIR",
        help="read DIR/calibration.npz (and DIR/test.npz) instead of running",
    )
    data.add_argument("--save-tables", metavar="DIR", help="write the recorded tables to DIR")
    data.add_argument("--batch-size", type=int, default=256)
    data.add_argument("--device", default="cpu", help="torch device to run the bundle on")

    goal = parser.add_argument_group("goal")
    goal.add_argument(
        "--goal",
        choices=GOAL_CHOICES,
        default="accuracy",
        help="accuracy: stay within --max-drop of the tail, offload least; "
        "offload: offload at most --offload-rate, most accurate; "
        "latency: least expected latency with an accuracy floor",
    )
    goal.add_argument(
        "--max-drop",
        type=float,
        default=None,
        help="accuracy floor in points below the tail's (default 1.0; none for the offload goal)",
    )
    goal.add_argument("--min-accuracy", type=float, help="absolute accuracy floor, percent")
    goal.add_argument("--offload-rate", type=float, help="offload goal: at most this, percent")
    goal.add_argument(
        "--measure",
        choices=MEASURE_CHOICES,
        default="auto",
        help="confidence measure of the exits; auto tries each (default)",
    )
    goal.add_argument(
        "--point",
        help="operating point K,BITS offloads are sent at (default "
        "the widest; the latency goal searches all)",
    )
    goal.add_argument(
        "--conservative",
        action="store_true",
        help="hold the floor with Clopper-Pearson lower bounds on exit accuracy",
    )
    goal.add_argument(
        "--confidence", type=float, default=0.95, help="confidence level of the bounds (0.95)"
    )
    goal.add_argument(
        "--candidates",
        type=int,
        default=100,
        help="candidate thresholds per exit (confidence quantiles, 100)",
    )
    goal.add_argument(
        "--sweep",
        action="store_true",
        help="also report target vs achieved for X = 0.5, 1, 2, plain and conservative",
    )

    link = parser.add_argument_group("latency goal: link and timings")
    link.add_argument(
        "--link",
        metavar="SPEC",
        help="the link as RATE:RTT, e.g. 5mbit:20ms (overrides --bandwidth-mbps/--rtt-ms)",
    )
    link.add_argument("--bandwidth-mbps", type=float, default=5.0, help="uplink Mbit/s (5)")
    link.add_argument("--rtt-ms", type=float, default=20.0, help="round trip ms (20)")
    link.add_argument(
        "--overhead-bytes",
        type=float,
        default=0.0,
        help="per-request bytes on top of the frame (HTTP, protocol header)",
    )
    link.add_argument("--segment-ms", type=float, nargs="+", help="device ms per head segment")
    link.add_argument("--exit-ms", type=float, nargs="+", help="device ms per exit")
    link.add_argument("--encode-ms", type=float, default=None, help="device ms to frame")
    link.add_argument("--tail-ms", type=float, help="server ms for the tail")
    link.add_argument(
        "--device-speed",
        type=float,
        default=1.0,
        help="device slowdown vs this machine for measured head times (1.0)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--dry-run", action="store_true", help="do not rewrite the manifest")
    out.add_argument(
        "--force",
        action="store_true",
        help="write thresholds even if the goal is not met on the calibration split or the "
        "promise is missed on the test split (exit status 1 either way)",
    )
    out.add_argument("--json", metavar="PATH", help="write the selection and check as JSON")


def run(args: argparse.Namespace) -> int:
    """0: the thresholds meet the goal and, when a test split is given, keep the promise
    there; 1 otherwise (written only with --force)."""
    from splitexit.bundle import load_bundle
    from splitexit.calibrate import (
        CalibrationError,
        calibrated_on,
        check_promise,
        format_selection,
        format_sweep,
        format_table_summary,
        jsonable,
        promise_sweep,
        select_thresholds,
        write_selection,
    )
    from splitexit.calibrate.samples import warnings as sample_warnings

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
        Path(args.json).write_text(json.dumps(payload, indent=2, default=jsonable) + "\n")
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
        write_selection(args.bundle, selection, check, calibrated_on=calibrated_on(cal, test))
        print(f"\nthresholds written to {Path(args.bundle) / 'manifest.json'}")
    if problem is not None:
        return 1
    return 0


# -------------------------------------------------------------------------------- helpers


def _tables(
    args: argparse.Namespace, bundle: Any
) -> tuple[CalibrationTable, CalibrationTable | None]:
    from splitexit.calibrate import CalibrationError, CalibrationTable, record_table

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
    for recorded in (cal, test):
        if recorded is None:
            continue
        fp = recorded.info.get("fingerprint")
        if fp is not None and fp != bundle.fingerprint:
            raise CalibrationError(
                f"the tables were recorded from a bundle with fingerprint {fp[:16]}, not "
                f"{bundle.fingerprint[:16]}: record them again from this bundle"
            )
        if list(recorded.exit_names) != bundle.manifest.exit_names:
            raise CalibrationError(
                f"the tables have exits {list(recorded.exit_names)}, the bundle "
                f"{bundle.manifest.exit_names}: record them again from this bundle"
            )
    return cal, test


def _splits(args: argparse.Namespace, bundle: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The calibration and test splits: the run's own held-out splits as the bundle records
    them (or `--config`'s), with `--images` / `--test-images` in their place where given."""
    from splitexit.calibrate import CalibrationError, folder_split, held_out_splits

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
    from splitexit.calibrate import CalibrationError
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
    from splitexit.calibrate import CalibrationError, Goal

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
    from splitexit.calibrate import CalibrationError, check_compute, measure_compute

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
    from splitexit.calibrate import CalibrationError

    if text is None:
        return None
    try:
        k, bits = (int(v) for v in text.split(","))
    except ValueError:
        raise CalibrationError(f"--point must be K,BITS (e.g. 12,4), got {text!r}") from None
    return k, bits
