"""Confidence of a classifier's logits: the scores that decide whether an exit answers.

    logits [N, K] ─ softmax ─┬─ max_prob: the largest probability
                             ├─ margin:   top-1 minus top-2 probability
                             └─ entropy:  1 - H(p) / log(K)          ─► confidence [N] in [0, 1]

Higher means more confident. Torch tensors and numpy arrays both work, each in its own
library (float32 in, float32 out), so a device without torch scores its exits the same way;
`splitexit.exits` re-exports these for training code.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CONFIDENCE_MEASURES = ("max_prob", "margin", "entropy")


def confidence(logits: Any, measure: str = "max_prob") -> Any:
    """Per-sample confidence of logits [N, K] ([N] of the same array type, in [0, 1])."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected logits of shape [N, K>=2], got {tuple(logits.shape)}")
    if measure not in CONFIDENCE_MEASURES:
        raise ValueError(
            f"unknown confidence measure {measure!r}; choose one of {CONFIDENCE_MEASURES}"
        )
    if isinstance(logits, np.ndarray):
        return _numpy(logits.astype(np.float32, copy=False), measure)
    return _torch(logits.float(), measure)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of a float32 numpy array (max-subtracted)."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return p


def _numpy(logits: np.ndarray, measure: str) -> np.ndarray:
    p = softmax(logits)
    if measure == "max_prob":
        top: np.ndarray = p.max(axis=1)
        return top
    if measure == "margin":
        top2 = np.sort(p, axis=1)[:, -2:]
        margin: np.ndarray = top2[:, 1] - top2[:, 0]
        return margin
    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    h: np.ndarray = -(np.exp(logp) * logp).sum(axis=1)
    return np.clip(1.0 - h / np.float32(math.log(logits.shape[1])), 0.0, 1.0).astype(np.float32)


def _torch(logits: Any, measure: str) -> Any:
    import torch.nn.functional as F

    if measure == "max_prob":
        return F.softmax(logits, dim=1).amax(dim=1)
    if measure == "margin":
        top2 = F.softmax(logits, dim=1).topk(2, dim=1).values
        return top2[:, 0] - top2[:, 1]
    logp = F.log_softmax(logits, dim=1)
    h = -(logp.exp() * logp).sum(dim=1)
    return (1.0 - h / math.log(logits.shape[1])).clamp(0.0, 1.0)
