"""Turn a finished run into a deployment bundle (the `export` step of the pipeline).

Re-exporting a run over its bundle keeps the fingerprint (it hashes the weights, not the
files) and, unless told otherwise, the thresholds and calibration record that
`splitexit calibrate` wrote there, so devices holding the earlier bundle keep working.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..bundle import export_bundle, read_manifest, update_manifest
from ..errors import BundleError
from ..preprocess import Preprocess
from ..splitnet import SplitExitNet
from .config import ExperimentConfig


def architecture(cfg: ExperimentConfig) -> dict:
    """What it takes to rebuild the SplitExitNet around a bundle's weights."""
    return {
        "teacher": cfg.teacher.model,
        "teacher_kwargs": dict(cfg.teacher.kwargs),
        "split": cfg.split.point,
        "channels": cfg.split.channels,
        "hidden": cfg.split.hidden,
        "downsample": cfg.split.downsample,
        "bits": list(cfg.split.bits),
        "exit_points": list(cfg.exits.points),
        "exit_conv": cfg.exits.conv,
        "exit_hidden": cfg.exits.hidden,
    }


def export_run(
    cfg: ExperimentConfig,
    net: SplitExitNet,
    pre: Preprocess,
    class_names: list[str],
    results: dict,
    provenance: Mapping[str, Any] | None = None,
    path: str | Path | None = None,
    *,
    onnx: bool = False,
    keep_calibration: bool = True,
) -> Path:
    """Write the run's bundle at `path` (default `<run>/bundle`); see the module docstring."""
    path = Path(path) if path else cfg.output_dir() / "bundle"
    try:
        previous = read_manifest(path) if (path / "manifest.json").is_file() else None
    except BundleError:
        previous = None
    manifest = export_bundle(
        net.cpu().eval(),
        path,
        name=cfg.name,
        architecture=architecture(cfg),
        preprocessing=pre.to_dict(),
        class_names=class_names,
        operating_points=results["operating_points"],
        teacher_accuracy=results["teacher_accuracy"],
        measure=cfg.exits.measure,
        metrics={"exits": results["exits"], "float_accuracy": results["float_accuracy"]},
        example_input_shape=(1, pre.channels, *pre.size),
        overwrite=True,
        onnx=onnx,
        split_point=cfg.split.point,
        provenance={**(provenance or {}), "config": cfg.to_dict()},
    )
    if previous is not None and _calibrated(previous):
        if not keep_calibration:
            print(f"dropped the calibrated thresholds of the bundle at {path}", file=sys.stderr)
        elif previous.fingerprint != manifest.fingerprint:
            print(
                f"the weights changed (fingerprint {previous.fingerprint[:12]} -> "
                f"{manifest.fingerprint[:12]}): the earlier calibration no longer applies; "
                f"run `splitexit calibrate {path}`",
                file=sys.stderr,
            )
        else:
            carried = {"calibration"} & previous.metrics.keys()
            metrics = {**manifest.metrics, **{k: previous.metrics[k] for k in carried}}
            calibrated_on = previous.provenance.get("calibrated_on")
            provenance_now = dict(manifest.provenance)
            if calibrated_on is not None:
                provenance_now["calibrated_on"] = calibrated_on
            update_manifest(
                path, exits=list(previous.exits), metrics=metrics, provenance=provenance_now
            )
            print(
                f"kept the calibrated thresholds of the bundle at {path} (same fingerprint "
                f"{manifest.fingerprint[:12]})",
                file=sys.stderr,
            )
    return path


def _calibrated(manifest: Any) -> bool:
    """Whether `splitexit calibrate` (or a user) set thresholds or recorded a calibration."""
    from ..bundle import NEVER_EXIT

    return "calibration" in manifest.metrics or any(
        e.threshold != NEVER_EXIT for e in manifest.exits
    )


def rebuild_run(run: str | Path, class_names: list[str] | None = None) -> tuple:
    """A finished run's (cfg, net, preprocess, class names, results, provenance), rebuilt
    from `config.json` (its model reference and kwargs), `data.json` and `model.pt`."""
    import json

    import torch

    from ..preprocess import Preprocess
    from .config import config_from_dict
    from .pipeline import RUN_DATA_FILE, build_student, build_teacher

    run = Path(run)
    for needed in ("config.json", "model.pt", "results.json"):
        if not (run / needed).exists():
            raise BundleError(
                f"{run} is not a finished run: {needed} is missing (run `splitexit train` first)"
            )
    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    results = json.loads((run / "results.json").read_text())
    if (run / RUN_DATA_FILE).exists():
        record = json.loads((run / RUN_DATA_FILE).read_text())
        pre = Preprocess.from_dict(record["preprocessing"])
        classes, provenance = list(record["class_names"]), dict(record["provenance"])
    else:  # a run from before data.json: load the data again
        from .experiment_data import load_data, train_preprocess

        data = load_data(cfg)
        pre, classes, provenance = train_preprocess(cfg, data), data.class_names, data.provenance
    if class_names is not None:
        if len(class_names) != len(classes):
            raise BundleError(
                f"--class-names gives {len(class_names)} names; the run has {len(classes)} classes"
            )
        classes = list(class_names)
    shape = (pre.channels, *pre.size)
    teacher = build_teacher(cfg, len(classes), shape, load_checkpoint=False)
    net = build_student(cfg, teacher, pre, len(classes))
    net.load_state_dict(torch.load(run / "model.pt", map_location="cpu", weights_only=True))
    return cfg, net, pre, classes, results, provenance
