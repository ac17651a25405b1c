"""`splitexit export RUN_DIR`: turn a finished run into a deployment bundle."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from splitexit.errors import SplitexitError

from .onnx import require_onnx

HELP = "write a bundle from a finished run directory"
DESCRIPTION: str | None = (
    "Rebuild a finished run's model from its config.json (model reference and "
    "kwargs) and model.pt, and write its bundle. Exporting over the run's bundle keeps "
    "its fingerprint and its calibrated thresholds (same weights, same fingerprint), "
    "so deployed devices keep working."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory holding config.json, model.pt and results.json")
    parser.add_argument("--output", help="bundle directory (default: RUN/bundle)")
    parser.add_argument("--class-names", nargs="+", help="class names (default: the dataset's)")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write ONNX graphs of head, exits and tail into the bundle (export extra)",
    )
    parser.add_argument(
        "--triton",
        metavar="DIR",
        help="with --onnx: also write a Triton model repository for the tail to DIR",
    )
    parser.add_argument(
        "--reset-thresholds",
        action="store_true",
        help="drop the calibrated exit thresholds of the bundle being replaced",
    )


def run(args: argparse.Namespace) -> int:
    from splitexit.train.export import export_run, rebuild_run

    if args.triton and not args.onnx:
        raise SplitexitError("--triton goes with --onnx (the Triton model is the ONNX tail)")
    if args.onnx:
        require_onnx()
    cfg, net, pre, classes, results, provenance = rebuild_run(args.run, args.class_names)
    path = export_run(
        cfg,
        net,
        pre,
        classes,
        results,
        provenance,
        args.output or Path(args.run) / "bundle",
        onnx=args.onnx,
        keep_calibration=not args.reset_thresholds,
    )
    if args.triton:
        for model in sorted((path / "onnx" / "triton").iterdir()):  # written by onnx=True
            shutil.copytree(model, Path(args.triton) / model.name, dirs_exist_ok=True)
            print(f"Triton model written to {Path(args.triton) / model.name}")
    print(f"bundle written to {path}")
    return 0
