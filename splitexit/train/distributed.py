"""torchrun / DistributedDataParallel plumbing: a run is unchanged with one process or many.

`torchrun --nproc-per-node 2 -m splitexit train CONFIG` sets RANK / WORLD_SIZE; we join the
process group (gloo on CPU, nccl on GPU), shard every epoch's permutation by rank, wrap the
trainable model in DDP, and only rank 0 writes checkpoints, metrics and the bundle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun (on CUDA, each rank on the GPU of
    its LOCAL_RANK); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":  # one GPU per rank: `cuda` then means this rank's
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP-wrap a model whose trainable parameters all receive gradients."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Broadcast rank 0's buffers (BatchNorm statistics) so all ranks end an epoch equal."""
    if info.enabled:
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def state_checksum(model: nn.Module) -> float:
    """A cheap fingerprint of every parameter and buffer, equal across ranks iff they agree."""
    total = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(model.state_dict().values()):
        if t.is_floating_point():
            total += (t.detach().double().cpu().reshape(-1) * (1 + (i % 7) * 1e-3)).sum()
            total += (t.detach().double().cpu() ** 2).sum() * 1e-3
    return float(total)


def check_ranks_agree(model: nn.Module, info: DistInfo) -> list[float]:
    """Gather every rank's checksum; raise if any rank's weights differ from rank 0's."""
    mine = state_checksum(model)
    if not info.enabled:
        return [mine]
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(info.world_size)]
    dist.all_gather(gathered, torch.tensor([mine], dtype=torch.float64))
    sums = [float(g.item()) for g in gathered]
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"DDP ranks ended with different weights: checksums {sums}")
    return sums
