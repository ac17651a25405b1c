"""One training stage: epochs of batches, with checkpoints, resume, progress and metrics.

    for epoch: permutation(seed, stage, epoch) ─ batches ─ objective ─ step ─ eval ─ checkpoint

A checkpoint is written after every epoch (rank 0 only) and read back with
`torch.load(weights_only=True)`; a resumed stage continues at the next epoch and, because an
epoch's permutation and augmentation depend only on (seed, stage, epoch), ends with the same
weights as an uninterrupted run. The checkpoint's `seconds` is the stage's time so far, over
every invocation (training and per-epoch validation).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..preprocess import Preprocess
from .batches import ArraySplit, epoch_generator, iterate_batches, num_batches
from .config import Optim
from .distributed import DistInfo, all_reduce_sum, barrier, sync_buffers, wrap
from .objectives import Objective
from .resume import checkpoint_path


@dataclass
class PointSampler:
    """Draws a (keep, bits) per sample while training: the sandwich rule inside one batch.

    A quarter of the samples get the widest point (C channels, most bits), a quarter the
    narrowest (`min_channels`, fewest bits), the rest a uniform random (k, bits).
    """

    channels: int
    bits: list[int]
    min_channels: int = 1

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.rand(n, generator=g)
        keep = torch.randint(self.min_channels, self.channels + 1, (n,), generator=g)
        choice = torch.tensor(self.bits)[torch.randint(0, len(self.bits), (n,), generator=g)]
        keep = torch.where(u < 0.25, self.channels, keep)
        choice = torch.where(u < 0.25, max(self.bits), choice)
        narrow = (u >= 0.25) & (u < 0.5)
        keep = torch.where(narrow, self.min_channels, keep)
        choice = torch.where(narrow, min(self.bits), choice)
        return choice, keep


@dataclass
class StageRun:
    """Everything one stage needs besides its objective."""

    name: str
    optim: Optim
    train: ArraySplit
    preprocess: Preprocess
    out_dir: Path
    seed: int
    device: torch.device
    dist: DistInfo = field(default_factory=DistInfo)
    augment: list[str] = field(default_factory=list)  # named transforms (batches.augment)
    points: PointSampler | None = None
    evaluate: Callable[[], dict[str, float]] | None = None


def epoch_batches(run: StageRun, g: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shuffled, augmented training batches for one pass, drawn from `g`."""
    return iterate_batches(
        run.train,
        run.preprocess,
        run.optim.batch_size,
        generator=g,
        augment_data=run.augment,
        rank=run.dist.rank,
        world_size=run.dist.world_size,
        device=run.device,
        drop_last=True,
    )


@torch.no_grad()
def recalibrate_batchnorm(run: StageRun, objective: Objective, epoch: int) -> None:
    """Re-estimate the running statistics of the BatchNorm layers this stage trains.

    Their statistics are reset and averaged (momentum None: a plain cumulative mean) over
    `bn_recalibration_batches` training batches, drawn and given operating points the way
    training does; frozen (eval-mode) layers are left alone.
    """
    objective.train()
    for m in objective.frozen():
        m.eval()
    layers = [
        m
        for m in objective.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    g = epoch_generator(run.seed, f"{run.name}-bn", epoch)
    batches = epoch_batches(run, g)
    for i, (x, y) in enumerate(batches):
        if i >= run.optim.bn_recalibration_batches:
            break
        bits, keep = run.points.sample(len(y), g) if run.points else (None, None)
        objective(x, y, bits, keep)
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum


def make_optimizer(params: list[nn.Parameter], optim: Optim) -> torch.optim.Optimizer:
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=optim.lr,
            momentum=optim.momentum,
            weight_decay=optim.weight_decay,
            nesterov=optim.momentum > 0,
        )
    cls = torch.optim.AdamW if optim.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=optim.lr, weight_decay=optim.weight_decay)


def lr_factor(optim: Optim, step: int, total: int) -> float:
    """Multiplier of the base learning rate at `step` of `total` (per-batch schedule)."""
    if optim.schedule == "constant" or total <= 0:
        return 1.0
    t = step / total
    warm = optim.warmup_epochs / max(optim.epochs, 1)
    if optim.schedule == "onecycle":
        warm = warm or 0.3
    if t < warm:
        return 0.1 + 0.9 * t / warm if optim.schedule == "onecycle" else (t + 1e-3) / warm
    t = (t - warm) / max(1.0 - warm, 1e-8)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def stage_done(out_dir: Path, stage: str, epochs: int) -> bool:
    path = checkpoint_path(out_dir, stage)
    if not path.exists():
        return False
    return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"]) >= epochs


def run_stage(run: StageRun, objective: Objective, model: nn.Module) -> dict[str, float]:
    """Train `objective` for the stage's epochs; `model` is what the checkpoint saves."""
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, run.optim)
    ckpt = checkpoint_path(run.out_dir, run.name)
    start, spent = 0, 0.0  # spent: this stage's seconds over every invocation
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, spent = int(state["epoch"]), float(state.get("seconds", 0.0))
    if start >= run.optim.epochs:
        return {}
    wrapped = wrap(objective, run.dist, run.device)
    steps = num_batches(len(run.train), run.optim.batch_size, run.dist.world_size, drop_last=True)
    total = steps * run.optim.epochs
    last: dict[str, float] = {}
    for epoch in range(start, run.optim.epochs):
        objective.train()
        for m in objective.frozen():
            m.eval()
        g = epoch_generator(run.seed, run.name, epoch)
        batches = epoch_batches(run, g)
        sums = [0.0, 0.0, 0.0]  # loss * n, correct, n
        began = time.perf_counter()
        bar = tqdm(
            batches,
            total=steps,
            desc=f"{run.name} {epoch + 1}/{run.optim.epochs}",
            disable=None if run.dist.is_main else True,
            leave=False,
            file=sys.stderr,
        )
        for i, (x, y) in enumerate(bar):
            factor = lr_factor(run.optim, epoch * steps + i, total)
            for group in optimizer.param_groups:
                group["lr"] = run.optim.lr * factor
            bits, keep = run.points.sample(len(y), g) if run.points else (None, None)
            loss, logits = wrapped(x, y, bits, keep)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(y)
            sums[0] += float(loss.detach()) * n
            sums[1] += float((logits.detach().argmax(1) == y).sum())
            sums[2] += n
            if i % 10 == 0:
                bar.set_postfix(loss=f"{sums[0] / sums[2]:.4f}", acc=f"{sums[1] / sums[2]:.3f}")
        bar.close()
        if run.optim.bn_recalibration_batches > 0:
            recalibrate_batchnorm(run, objective, epoch)
        sync_buffers(model, run.dist)
        loss_sum, correct, count = all_reduce_sum(sums, run.dist)
        record = {
            "stage": run.name,
            "epoch": epoch + 1,
            "loss": loss_sum / max(count, 1),
            "train_accuracy": correct / max(count, 1),
            "seconds": round(time.perf_counter() - began, 2),
            "lr": optimizer.param_groups[0]["lr"],
        }
        if run.dist.is_main:
            if run.evaluate is not None:
                record.update(run.evaluate())
            spent += time.perf_counter() - began
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "seconds": spent,
                },
                tmp,
            )
            tmp.replace(ckpt)
            append_metrics(run.out_dir / "metrics.jsonl", record)
            summary = " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
            )
            print(summary, file=sys.stderr, flush=True)
        barrier(run.dist)
        last = record
    return last
