"""The whole experiment from one config: teacher → stage 1 → stage 2 → exits → results → bundle.

    teacher ─ SplitExitNet.from_teacher(split) ─ head distillation ─ KD fine-tune ─ exits
                                                                         │
                                     test-set grid of (channels, bits) ──┴─ results.json, bundle/

Every stage checkpoints per epoch under `<output>/checkpoints/`; running the same config
again resumes where it stopped (finished stages are loaded, not retrained). A changed config
is refused unless told which stage to restart from (`resume.py`).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import FASHION_MNIST_CLASSES, ImageFolder, fashion_mnist_splits, split_indices
from ..errors import ConfigError
from ..models import build_model, get_spec
from ..preprocess import Preprocess
from ..splitnet import SplitExitNet
from .batches import ArraySplit
from .config import ExperimentConfig
from .distributed import DistInfo, barrier, check_ranks_agree, init_distributed, shutdown
from .evaluate import accuracy, evaluate_split, mean_frame_bytes
from .loop import OperatingPoints, StageRun, checkpoint_path, run_stage, stage_done
from .objectives import ExitObjective, FinetuneObjective, HeadDistillObjective, TeacherObjective
from .resume import apply_resume, plan_resume, running_stages, stage_seconds


@dataclass
class ExperimentData:
    splits: dict[str, ArraySplit]
    class_names: list[str]


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


def _subset(split: ArraySplit, n: int, seed: int) -> ArraySplit:
    if n <= 0 or n >= len(split):
        return split
    idx = split_indices(len(split), {"keep": n}, seed, stratify=split.labels.numpy())["keep"]
    idx = torch.from_numpy(np.sort(idx))
    return ArraySplit(split.images[idx], split.labels[idx])


def load_data(cfg: ExperimentConfig) -> ExperimentData:
    """Train / calibration / test splits as in-memory uint8 arrays."""
    d = cfg.data
    if d.dataset == "fashion-mnist":
        raw = fashion_mnist_splits(seed=cfg.seed, calibration=d.calibration, root=d.root or None)
        classes = list(FASHION_MNIST_CLASSES)
    else:
        if not d.root:
            raise ConfigError("data.root must name an image folder when data.dataset = 'folder'")
        folder = ImageFolder(d.root)
        images = np.stack([np.asarray(folder[i][0]) for i in range(len(folder))])
        labels = np.asarray([folder[i][1] for i in range(len(folder))], dtype=np.int64)
        n = len(labels)
        n_test = max(n // 5, 1)
        idx = split_indices(
            n,
            {"train": n - n_test - d.calibration, "calibration": d.calibration, "test": n_test},
            cfg.seed,
            stratify=labels,
        )
        raw = {k: (images[v], labels[v]) for k, v in idx.items()}
        classes = list(folder.classes)
    splits = {k: ArraySplit.from_numpy(*v) for k, v in raw.items()}
    splits["train"] = _subset(splits["train"], d.train_subset, cfg.seed)
    splits["test"] = _subset(splits["test"], d.test_subset, cfg.seed)
    return ExperimentData(splits, classes)


def make_preprocess(cfg: ExperimentConfig) -> Preprocess:
    spec = get_spec(cfg.teacher.model).preprocessing
    channels = cfg.data.channels or spec.channels
    mean, std = tuple(spec.mean), tuple(spec.std)
    if channels != spec.channels:
        mean, std = mean[:1] * channels, std[:1] * channels
    size = tuple(cfg.data.image_size) or tuple(spec.size)
    return Preprocess(size=size, mean=mean, std=std, channels=channels)


def build_teacher(cfg: ExperimentConfig, num_classes: int, preprocess: Preprocess):
    kwargs = dict(cfg.teacher.kwargs)
    spec = get_spec(cfg.teacher.model)
    if cfg.teacher.model.startswith("small_resnet"):
        kwargs.setdefault("in_channels", preprocess.channels)
        kwargs.setdefault("input_size", tuple(preprocess.size))
    nc = num_classes if num_classes != spec.num_classes or not cfg.teacher.pretrained else None
    return build_model(
        cfg.teacher.model, pretrained=cfg.teacher.pretrained, num_classes=nc, **kwargs
    )


def build_student(
    cfg: ExperimentConfig, teacher: torch.nn.Module, pre: Preprocess, num_classes: int
) -> SplitExitNet:
    """The SplitExitNet the config describes, cut from (a copy of) the teacher."""
    s = cfg.split
    return SplitExitNet.from_teacher(
        teacher,
        s.point,
        input_shape=(pre.channels, *pre.size),
        channels=s.channels,
        hidden=s.hidden,
        downsample=s.downsample,
        bits=s.bits,
        exit_points=cfg.exits.points,
        exit_conv=cfg.exits.conv,
        exit_hidden=cfg.exits.hidden or None,
        num_classes=num_classes,
    )


def operating_grid(cfg: ExperimentConfig) -> list[tuple[int, int]]:
    s = cfg.split
    return [(k, b) for k in range(s.channels, s.min_channels - 1, -1) for b in sorted(s.bits)]


def run_experiment(
    cfg: ExperimentConfig, *, export: bool = True, log=print, restart_from: str | None = None
) -> dict:
    """Run (or resume) every stage of `cfg`; returns the results written to results.json.

    `restart_from` (a stage name) retrains that stage and every later one; a config that
    changed since the run's last invocation is refused without it (`resume.plan_resume`).
    """
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
    log,
    restart_from: str | None,
) -> dict:
    out = cfg.output_dir()
    plan = plan_resume(cfg, restart_from)  # every rank refuses alike, before rank 0 writes
    barrier(dist)
    if dist.is_main:
        apply_resume(plan)
    barrier(dist)
    data = load_data(cfg)
    pre = make_preprocess(cfg)
    input_shape = (pre.channels, *pre.size)
    splits = data.splits
    calib = splits["calibration"] if len(splits["calibration"]) else splits["test"]
    say = log if dist.is_main else (lambda *a, **k: None)
    say(
        f"[{cfg.name}] train={len(splits['train'])} calibration={len(splits['calibration'])} "
        f"test={len(splits['test'])} input={input_shape} device={device} world={dist.world_size}"
    )

    def stage_run(name: str, optim, **kw) -> StageRun:
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
    torch.manual_seed(cfg.seed)
    teacher = build_teacher(cfg, len(data.class_names), pre).to(device)
    if cfg.teacher.checkpoint:
        state = torch.load(cfg.teacher.checkpoint, map_location="cpu", weights_only=True)
        teacher.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    elif cfg.teacher.optim.epochs > 0:

        def eval_teacher() -> dict[str, float]:
            return {"val_accuracy": accuracy(teacher, calib, pre, device=device)}

        run_stage(
            stage_run(
                "teacher", cfg.teacher.optim, augment=cfg.data.augment, evaluate=eval_teacher
            ),
            TeacherObjective(teacher, cfg.teacher.optim.label_smoothing),
            teacher,
        )
        _load_final(teacher, out, "teacher", cfg.teacher.optim.epochs)
    teacher.eval()

    torch.manual_seed(cfg.seed + 1)
    s = cfg.split
    net = build_student(cfg, teacher, pre, len(data.class_names)).to(device)
    points = OperatingPoints(s.channels, list(s.bits), s.min_channels)
    widest, narrowest = (s.channels, max(s.bits)), (s.min_channels, min(s.bits))

    def eval_split() -> dict[str, float]:
        r = evaluate_split(net, calib, pre, [widest, narrowest], device=device)
        return {"val_accuracy": r["grid"][0]["accuracy"], "val_narrow": r["grid"][1]["accuracy"]}

    def eval_exits() -> dict[str, float]:
        r = evaluate_split(net, calib, pre, [widest], device=device)
        return {f"val_exit_{k}": v for k, v in r["exits"].items()}

    stages = [
        (
            "stage1",
            cfg.stage1.optim,
            cfg.stage1.sandwich,
            eval_split,
            lambda: HeadDistillObjective(net, teacher, s.point, cfg.stage1.later_stages),
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
                augment=cfg.data.augment,
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

            path = export_run(cfg, net, pre, data.class_names, results)
            say(f"bundle written to {path}")
            results["bundle"] = str(path)
    return results


def _load_final(model: torch.nn.Module, out: Path, stage: str, epochs: int) -> None:
    path = checkpoint_path(out, stage)
    if stage_done(out, stage, epochs):
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])


def final_results(cfg, net, teacher, test: ArraySplit, pre: Preprocess, device) -> dict:
    """Test-set accuracy of the teacher, every operating point and every exit, with bytes."""
    grid_points = operating_grid(cfg)
    teacher_acc = accuracy(teacher, test, pre, device=device)
    r = evaluate_split(net, test, pre, grid_points, device=device)
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
