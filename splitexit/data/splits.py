"""Seeded, disjoint, optionally stratified splits of a dataset's indices, stable across
machines and numpy versions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

_DEFAULT_SPLIT_NAMES = {2: ("train", "test"), 3: ("train", "val", "test")}


def _split_counts(n: int, fractions: Mapping[str, float] | Sequence[float]) -> dict[str, int]:
    if not isinstance(fractions, Mapping):
        names = _DEFAULT_SPLIT_NAMES.get(len(fractions))
        if names is None:
            raise ValueError("a tuple of fractions must have 2 or 3 entries; name more in a dict")
        fractions = dict(zip(names, fractions, strict=True))
    if not fractions:
        raise ValueError("fractions is empty")
    counts: dict[str, int] = {}
    remainders: dict[str, float] = {}
    for name, f in fractions.items():
        if isinstance(f, bool) or not isinstance(f, int | float | np.integer | np.floating):
            raise TypeError(f"split {name!r}: expected a fraction (float) or a count (int)")
        if isinstance(f, int | np.integer):
            if f < 0:
                raise ValueError(f"split {name!r}: count {f} is negative")
            counts[name] = int(f)
        else:
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"split {name!r}: fraction {f} is outside [0, 1]")
            counts[name] = math.floor(f * n)
            remainders[name] = f * n - counts[name]
    # Fractions that add up to 1 cover all n samples: hand out the rounding leftovers.
    if len(remainders) == len(counts) and math.isclose(sum(fractions.values()), 1.0):
        leftover = n - sum(counts.values())
        for name in sorted(remainders, key=lambda k: -remainders[k])[:leftover]:
            counts[name] += 1
    if sum(counts.values()) > n:
        raise ValueError(f"splits {counts} need {sum(counts.values())} samples, only {n} exist")
    return counts


def random_order(n: int, rng: np.random.Generator) -> np.ndarray:
    # argsort of uniform draws rather than rng.permutation: it depends only on the PCG64 bit
    # stream, which numpy keeps stable across versions, so a seed means the same split forever.
    return np.argsort(rng.random(n), kind="stable")


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of the samples in which every prefix has (almost) the class balance."""
    n = len(labels)
    perm = random_order(n, rng)
    _, cls, sizes = np.unique(labels[perm], return_inverse=True, return_counts=True)
    by_class = np.argsort(cls, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank = np.empty(n, dtype=np.int64)
    rank[by_class] = np.arange(n) - starts[cls[by_class]]
    # The k-th of a class's n_c samples lands in [k / n_c, (k + 1) / n_c).
    key = (rank + rng.random(n)) / sizes[cls]
    return perm[np.argsort(key, kind="stable")]


def split_indices(
    n: int,
    fractions: Mapping[str, float] | Sequence[float],
    seed: int,
    stratify: np.ndarray | Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """Disjoint, seeded random splits of range(n): {name: sorted int64 indices}.

    Each value of `fractions` is a fraction of n (float) or a number of samples (int).
    Fractions summing to 1 use every sample; otherwise the rest is left out. A tuple
    names its 2 or 3 splits ("train", "test") or ("train", "val", "test"). With `stratify`
    (one label per sample) each split keeps the class balance to within a sample per class.
    The same arguments give the same splits on every machine and numpy version.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    counts = _split_counts(n, fractions)
    rng = np.random.default_rng(seed)
    if stratify is None:
        order = random_order(n, rng)
    else:
        labels = np.asarray(stratify)
        if labels.shape != (n,):
            raise ValueError(f"stratify must hold one label per sample ({n}), got {labels.shape}")
        order = _stratified_order(labels, rng)
    out, start = {}, 0
    for name, count in counts.items():
        out[name] = np.sort(order[start : start + count]).astype(np.int64)
        start += count
    return out
