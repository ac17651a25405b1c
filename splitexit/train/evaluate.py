"""Accuracy of a teacher, of every (channels, bits) operating point, and of every exit.

The head runs once per batch; each operating point then only costs the decoder and the tail,
so the whole grid is cheap enough to measure on the full test set.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..bottleneck import quantize
from ..codec import encode_frame
from ..preprocess import Preprocess
from ..splitnet import SplitExitNet
from .batches import ArraySplit, iterate_batches


@torch.no_grad()
def accuracy(
    model: nn.Module,
    split: ArraySplit,
    preprocess: Preprocess,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> float:
    """Top-1 accuracy of a plain classifier."""
    was = model.training
    model.eval()
    correct = 0
    for x, y in iterate_batches(split, preprocess, batch_size, device=device):
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was)
    return correct / max(len(split), 1)


@torch.no_grad()
def evaluate_split(
    net: SplitExitNet,
    split: ArraySplit,
    preprocess: Preprocess,
    points: Iterable[tuple[int, int]],
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> dict:
    """Accuracy at each (keep, bits) point and of each exit, plus the float (unquantized) code.

    Returns {"grid": [{"channels", "bits", "accuracy"}], "float_accuracy", "exits": {name: acc}}.
    """
    points = list(points)
    was = net.training
    net.eval()
    hits = dict.fromkeys(points, 0)
    exit_hits = dict.fromkeys(net.exit_names, 0)
    float_hits = 0
    tail = net.tail_module()[1:]
    for x, y in iterate_batches(split, preprocess, batch_size, device=device):
        z, exits = net.run_head(x)
        for name, logits in exits.items():
            exit_hits[name] += int((logits.argmax(1) == y).sum())
        float_hits += int((tail(net.bottleneck.decoder(z)).argmax(1) == y).sum())
        for keep, bits in points:
            logits = tail(net.bottleneck.decoder(net.bottleneck.code(z, bits, keep)))
            hits[(keep, bits)] += int((logits.argmax(1) == y).sum())
    net.train(was)
    n = max(len(split), 1)
    return {
        "grid": [{"channels": k, "bits": b, "accuracy": hits[(k, b)] / n} for k, b in points],
        "float_accuracy": float_hits / n,
        "exits": {name: h / n for name, h in exit_hits.items()},
    }


@torch.no_grad()
def mean_frame_bytes(
    net: SplitExitNet,
    split: ArraySplit,
    preprocess: Preprocess,
    points: Iterable[tuple[int, int]],
    *,
    samples: int = 256,
    zstd_level: int = 3,
) -> dict[tuple[int, int], float]:
    """Mean size of one-sample frames (header included) at each (keep, bits) point."""
    was = net.training
    net.eval()
    sub = ArraySplit(split.images[:samples], split.labels[:samples])
    x, _ = next(iterate_batches(sub, preprocess, samples))
    z, _ = net.run_head(x)
    fingerprint = "0" * 64
    sizes = {}
    for keep, bits in points:
        total = 0
        for i in range(z.shape[0]):
            q = quantize(z[i : i + 1, :keep], bits, channels=net.bottleneck.channels)
            total += len(encode_frame(q, fingerprint, level=zstd_level))
        sizes[(keep, bits)] = total / z.shape[0]
    net.train(was)
    return sizes
