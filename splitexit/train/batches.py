"""In-memory data for training: uint8 images, seeded shuffles, batch-wise preprocessing.

    uint8 images ─ permutation(seed, stage, epoch) ─ rank shard ─ batch ─ augment ─ preprocess

The permutation of an epoch depends only on (seed, stage, epoch), so a resumed run sees the
same batches as an uninterrupted one, and every DDP rank takes its own slice of it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess import Preprocess


@dataclass
class ArraySplit:
    """One split held in memory: uint8 images [N, H, W(, C)] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray) -> ArraySplit:
        return cls(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels).long())

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def epoch_generator(seed: int, stage: str, epoch: int) -> torch.Generator:
    """A generator seeded by (seed, stage, epoch) alone."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(stage.encode()) * 101 + epoch) % 2**63)
    return g


def augment(
    x: torch.Tensor,
    g: torch.Generator,
    transforms: Sequence[str] = ("crop", "hflip"),
    pad: int = 2,
) -> torch.Tensor:
    """Per-sample random augmentation of [N, C, H, W], in this order and drawing from `g`:
    "crop" (reflect-pad `pad` pixels, crop back), "hflip", "vflip" (each with p = 1/2)."""
    n, _, h, w = x.shape
    rows = torch.arange(h).view(1, h).expand(n, h)
    cols = torch.arange(w).view(1, w).expand(n, w)
    src = x
    if "crop" in transforms:
        src = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        rows, cols = dy.view(n, 1) + rows, dx.view(n, 1) + cols
    for name, axis in (("hflip", 1), ("vflip", 0)):
        if name in transforms:
            flip = (torch.rand(n, generator=g) < 0.5).view(n, 1)
            if axis:
                cols = torch.where(flip, cols.flip(-1), cols)
            else:
                rows = torch.where(flip, rows.flip(-1), rows)
    if src is x and not any(t in transforms for t in ("hflip", "vflip")):
        return x
    index = rows.view(n, 1, h, 1) * src.shape[-1] + cols.view(n, 1, 1, w)
    flat = src.reshape(n, src.shape[1], -1)
    out = torch.gather(flat, 2, index.expand(n, x.shape[1], h, w).reshape(n, x.shape[1], -1))
    return out.view_as(x)


def iterate_batches(
    split: ArraySplit,
    preprocess: Preprocess,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    augment_data: Sequence[str] = (),
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield preprocessed (x, y) batches; shuffled when a generator is given."""
    n = len(split)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if world_size > 1:
        per_rank = n // world_size
        order = order[rank * per_rank : (rank + 1) * per_rank]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        x = preprocess(split.images[idx], device=device)
        if augment_data and generator is not None:
            x = augment(x, generator, augment_data)
        yield x, split.labels[idx].to(device)


def num_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    per_rank = n // world_size if world_size > 1 else n
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)
