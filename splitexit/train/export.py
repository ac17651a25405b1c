"""Turn a finished run into a deployment bundle (the `export` step of the pipeline)."""

from __future__ import annotations

from pathlib import Path

from ..bundle import export_bundle
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
    path: str | Path | None = None,
) -> Path:
    path = Path(path) if path else cfg.output_dir() / "bundle"
    export_bundle(
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
    )
    return path
