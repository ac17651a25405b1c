"""The whole experiment from one config: teacher → stage 1 → stage 2 → exits → results → bundle.

    teacher ─ SplitExitNet.from_teacher(split) ─ head distillation ─ KD fine-tune ─ exits
                                                                         │
                                     test-set grid of (channels, bits) ──┴─ results.json, bundle/

Every stage checkpoints per epoch under `<output>/checkpoints/`; running the same config
again resumes where it stopped (finished stages are loaded, not retrained). A changed config
is refused unless told which stage to restart from (`resume.py`).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, SplitPointError
from ..models import StagedModel, build_model, get_spec
from ..models.cut import stage_name, staged_at
from ..models.reference import build_reference, is_zoo_name, resolve_reference
from ..preprocess import Preprocess
from ..splitnet import BOTTLENECK, SplitExitNet
from .batches import ArraySplit
from .config import ExperimentConfig, Optim
from .distributed import DistInfo, barrier, check_ranks_agree, init_distributed, shutdown
from .evaluate import accuracy, evaluate_split, mean_frame_bytes
from .experiment_data import (
    ExperimentData,
    augmentations,
    load_data,
    plan_data,
    train_preprocess,
)
from .loop import PointSampler, StageRun, checkpoint_path, run_stage, stage_done
from .objectives import ExitObjective, FinetuneObjective, HeadDistillObjective, TeacherObjective
from .resume import apply_resume, plan_resume, running_stages, stage_seconds


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def build_teacher(
    cfg: ExperimentConfig,
    num_classes: int,
    input_shape: tuple[int, int, int],
    *,
    load_checkpoint: bool = True,
) -> StagedModel:
    """The teacher `teacher.model` names (zoo name or the user's factory), with the weights of
    `teacher.checkpoint` if set, as a StagedModel cut at the split and exit points."""
    t = cfg.teacher
    channels, h, w = input_shape
    if is_zoo_name(t.model):
        try:
            spec = get_spec(t.model)
        except ValueError as e:
            raise ConfigError(
                f"teacher.model: {e}; or name your own model as package.module:factory or "
                "path/to/file.py:factory"
            ) from None
        kwargs = dict(t.kwargs)
        if t.model.startswith("small_resnet"):
            kwargs.setdefault("in_channels", channels)
            kwargs.setdefault("input_size", (h, w))
        nc = num_classes if num_classes != spec.num_classes or not t.pretrained else None
        try:
            model: torch.nn.Module = build_model(
                t.model, pretrained=t.pretrained, num_classes=nc, **kwargs
            )
        except TypeError as e:
            raise ConfigError(f"teacher.kwargs {kwargs} do not fit {t.model}: {e}") from None
    else:
        if t.pretrained:
            raise ConfigError(
                "teacher.pretrained is for zoo models; load your model's weights with "
                "teacher.checkpoint (or inside its factory)"
            )
        model = build_reference(t.model, t.kwargs, num_classes=num_classes)
    if t.checkpoint and load_checkpoint:
        _load_teacher_checkpoint(model, t.checkpoint)
    points = [cfg.split.point, *(p for p in cfg.exits.points if p != BOTTLENECK)]
    teacher = staged_at(model, points)
    split = stage_name(cfg.split.point)
    if split not in teacher.split_points:
        raise SplitPointError(
            f"split.point {cfg.split.point!r} is not a split point of {t.model}; valid: "
            f"{', '.join(teacher.split_points)} (`splitexit models {t.model}` lists them)"
        )
    head = teacher.head_stages(split)
    stray = [p for p in cfg.exits.points if p != BOTTLENECK and stage_name(p) not in head]
    if stray:
        raise SplitPointError(
            f"exits.points {stray} are not in the head of {t.model} cut at {cfg.split.point!r}; "
            f"valid: {', '.join([*head, BOTTLENECK])}"
        )
    try:
        out = teacher.feature_shapes(input_shape)[teacher.stage_names[-1]]
    except Exception as e:  # the user's model meets an input it was not built for
        raise ConfigError(
            f"teacher {t.model} fails on a {channels}x{h}x{w} input ({type(e).__name__}: {e}); "
            "set data.image_size / data.channels to what the model takes"
        ) from None
    if out != (num_classes,):
        raise ConfigError(
            f"teacher {t.model} outputs shape {out} per input, but the data has {num_classes} "
            "classes: give the factory a num_classes argument (it is passed the data's count) "
            "or set it in teacher.kwargs"
        )
    return teacher


def _load_teacher_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load a state_dict (or {"model": ...} / {"state_dict": ...}) saved with torch.save."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"teacher.checkpoint {path} does not exist") from None
    except Exception as e:  # not a torch file, or a pickle that is not plain weights
        raise ConfigError(
            f"teacher.checkpoint {path} is not a weights file torch.load(weights_only=True) "
            f"reads ({type(e).__name__}: {e}); save it with torch.save(model.state_dict(), ...)"
        ) from None
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0:2]
        raise ConfigError(
            f"teacher.checkpoint {path} does not fit {type(model).__name__}: {' '.join(first)}"
        ) from None


def build_student(
    cfg: ExperimentConfig, teacher: StagedModel, pre: Preprocess, num_classes: int
) -> SplitExitNet:
    """The SplitExitNet the config describes, cut from (a copy of) the teacher."""
    s = cfg.split
    return SplitExitNet.from_teacher(
        teacher,
        stage_name(s.point),
        input_shape=(pre.channels, *pre.size),
        channels=s.channels,
        hidden=s.hidden,
        downsample=s.downsample,
        bits=s.bits,
        exit_points=[p if p == BOTTLENECK else stage_name(p) for p in cfg.exits.points],
        exit_conv=cfg.exits.conv,
        exit_hidden=cfg.exits.hidden or None,
        num_classes=num_classes,
    )


def operating_grid(cfg: ExperimentConfig) -> list[tuple[int, int]]:
    s = cfg.split
    return [(k, b) for k in range(s.channels, s.min_channels - 1, -1) for b in sorted(s.bits)]


def resolved(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with its file paths (data folders, a model file, a checkpoint) made absolute, so
    that the run's record rebuilds the same data and model from any working directory."""
    d, t = cfg.data, cfg.teacher
    folders: dict[str, Any] = {
        k: str(Path(v).resolve()) for k in ("root", "val_root", "test_root") if (v := getattr(d, k))
    }
    teacher = dataclasses.replace(
        t,
        model=resolve_reference(t.model),
        checkpoint=str(Path(t.checkpoint).resolve()) if t.checkpoint else "",
    )
    return dataclasses.replace(cfg, data=dataclasses.replace(d, **folders), teacher=teacher)


def run_experiment(
    cfg: ExperimentConfig,
    *,
    export: bool = True,
    log: Callable[..., object] = print,
    restart_from: str | None = None,
) -> dict:
    """Run (or resume) every stage of `cfg`; returns the results written to results.json.

    `restart_from` (a stage name) retrains that stage and every later one; a config that
    changed since the run's last invocation is refused without it (`resume.plan_resume`).
    """
    cfg = resolved(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    try:
        results = _run(cfg, device, dist, export=export, log=log, restart_from=restart_from)
        barrier(dist)  # rank 0 evaluates and exports last: every rank leaves together
        return results
    finally:
        shutdown(dist)


def _run(
    cfg: ExperimentConfig,
    device: torch.device,
    dist: DistInfo,
    *,
    export: bool,
    log: Callable[..., object],
    restart_from: str | None,
) -> dict:
    out = cfg.output_dir()
    plan = plan_data(cfg)  # the cheap checks first: folders, model, shapes
    input_shape = plan.input_shape
    torch.manual_seed(cfg.seed)
    teacher = build_teacher(cfg, len(plan.class_names), input_shape).to(device)
    resume = plan_resume(cfg, restart_from)  # every rank refuses alike, before rank 0 writes
    barrier(dist)
    if dist.is_main:
        apply_resume(resume)
    barrier(dist)
    data = load_data(cfg, plan)
    pre = train_preprocess(cfg, data)
    if dist.is_main:
        write_run_data(out, data, pre, cfg)
    splits = data.splits
    calib = splits["calibration"] if len(splits["calibration"]) else splits["test"]
    say = log if dist.is_main else (lambda *a, **k: None)
    say(
        f"[{cfg.name}] train={len(splits['train'])} calibration={len(splits['calibration'])} "
        f"test={len(splits['test'])} input={input_shape} device={device} world={dist.world_size}"
    )
    aug = augmentations(cfg)

    def stage_run(name: str, optim: Optim, **kw: Any) -> StageRun:
        return StageRun(
            name=name,
            optim=optim,
            train=splits["train"],
            preprocess=pre,
            out_dir=out,
            seed=cfg.seed,
            device=device,
            dist=dist,
            **kw,
        )

    began = time.perf_counter()
    if not cfg.teacher.checkpoint and cfg.teacher.optim.epochs > 0:

        def eval_teacher() -> dict[str, float]:
            return {
                "val_accuracy": accuracy(
                    teacher, calib, pre, batch_size=cfg.eval_batch_size, device=device
                )
            }

        run_stage(
            stage_run("teacher", cfg.teacher.optim, augment=aug, evaluate=eval_teacher),
            TeacherObjective(teacher, cfg.teacher.optim.label_smoothing),
            teacher,
        )
        _load_final(teacher, out, "teacher", cfg.teacher.optim.epochs)
    teacher.eval()

    torch.manual_seed(cfg.seed + 1)
    s = cfg.split
    net = build_student(cfg, teacher, pre, len(data.class_names)).to(device)
    points = PointSampler(s.channels, list(s.bits), s.min_channels)
    widest, narrowest = (s.channels, max(s.bits)), (s.min_channels, min(s.bits))

    def eval_split() -> dict[str, float]:
        r = evaluate_split(
            net, calib, pre, [widest, narrowest], batch_size=cfg.eval_batch_size, device=device
        )
        return {"val_accuracy": r["grid"][0]["accuracy"], "val_narrow": r["grid"][1]["accuracy"]}

    def eval_exits() -> dict[str, float]:
        r = evaluate_split(net, calib, pre, [widest], batch_size=cfg.eval_batch_size, device=device)
        return {f"val_exit_{k}": v for k, v in r["exits"].items()}

    stages = [
        (
            "stage1",
            cfg.stage1.optim,
            cfg.stage1.sandwich,
            eval_split,
            lambda: HeadDistillObjective(
                net, teacher, stage_name(s.point), cfg.stage1.later_stages
            ),
        ),
        (
            "stage2",
            cfg.stage2.optim,
            cfg.stage2.sandwich,
            eval_split,
            lambda: FinetuneObjective(
                net,
                teacher,
                alpha=cfg.stage2.alpha,
                temperature=cfg.stage2.temperature,
                freeze_encoder=cfg.stage2.freeze_encoder,
                freeze_head=cfg.stage2.freeze_head,
            ),
        ),
        (
            "exits",
            cfg.exits.optim,
            not cfg.exits.freeze_backbone,
            eval_exits,
            lambda: ExitObjective(
                net,
                teacher,
                alpha=cfg.exits.alpha,
                temperature=cfg.exits.temperature,
                freeze_backbone=cfg.exits.freeze_backbone,
            ),
        ),
    ]
    for name, optim, sandwich, evaluate, objective in stages:
        if optim.epochs <= 0:
            continue
        quantized = name != "stage1" or cfg.stage1.quantize
        run_stage(
            stage_run(
                name,
                optim,
                augment=aug,
                evaluate=evaluate,
                points=points if (sandwich and quantized) else None,
            ),
            objective(),
            net,
        )
        _load_final(net, out, name, optim.epochs)
    net.eval()
    if dist.enabled:
        sums = check_ranks_agree(net, dist)
        say(f"all {dist.world_size} ranks agree on the final weights (checksum {sums[0]:.6f})")
    results: dict = {}
    if dist.is_main:
        results = final_results(cfg, net, teacher, splits["test"], pre, device)
        results["stage_seconds"] = stage_seconds(out, running_stages(cfg))
        results["train_seconds"] = round(sum(results["stage_seconds"].values()), 1)
        results["wall_seconds"] = round(time.perf_counter() - began, 1)  # this invocation
        (out / "results.json").write_text(json.dumps(results, indent=2))
        torch.save(net.state_dict(), out / "model.pt")
        say(format_results(results))
        if export:
            from .export import export_run

            path = export_run(cfg, net, pre, data.class_names, results, data.provenance)
            say(f"bundle written to {path}")
            results["bundle"] = str(path)
    return results


RUN_DATA_FILE = "data.json"


def write_run_data(out: Path, data: ExperimentData, pre: Preprocess, cfg: ExperimentConfig) -> None:
    """What `export` needs without reloading the data: classes, preprocessing, provenance."""
    record = {
        "class_names": data.class_names,
        "preprocessing": pre.to_dict(),
        "provenance": data.provenance,
    }
    (out / RUN_DATA_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _load_final(model: torch.nn.Module, out: Path, stage: str, epochs: int) -> None:
    path = checkpoint_path(out, stage)
    if stage_done(out, stage, epochs):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])


def final_results(
    cfg: ExperimentConfig,
    net: SplitExitNet,
    teacher: StagedModel,
    test: ArraySplit,
    pre: Preprocess,
    device: torch.device,
) -> dict[str, Any]:
    """Test-set accuracy of the teacher, every operating point and every exit, with bytes."""
    grid_points = operating_grid(cfg)
    teacher_acc = accuracy(teacher, test, pre, batch_size=cfg.eval_batch_size, device=device)
    r = evaluate_split(net, test, pre, grid_points, batch_size=cfg.eval_batch_size, device=device)
    sizes = mean_frame_bytes(net.cpu(), test, pre, grid_points)
    net.to(device)
    for row in r["grid"]:
        row["frame_bytes"] = round(sizes[(row["channels"], row["bits"])], 1)
    return {
        "name": cfg.name,
        "test_samples": len(test),
        "teacher_accuracy": teacher_acc,
        "float_accuracy": r["float_accuracy"],
        "operating_points": r["grid"],
        "exits": r["exits"],
    }


def format_results(results: dict) -> str:
    lines = [
        f"teacher accuracy {results['teacher_accuracy']:.4f}   "
        f"split (float code) {results['float_accuracy']:.4f}",
        "channels  bits  accuracy  frame bytes",
    ]
    for row in results["operating_points"]:
        k, b, acc, size = row["channels"], row["bits"], row["accuracy"], row["frame_bytes"]
        lines.append(f"{k:>8}  {b:>4}  {acc:.4f}  {size:>11}")
    for name, acc in results["exits"].items():
        lines.append(f"exit {name}: {acc:.4f}")
    return "\n".join(lines)


def main_train(path: str) -> int:  # pragma: no cover - thin CLI shim
    from .config import load_config

    run_experiment(load_config(path))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_train(sys.argv[1]))
