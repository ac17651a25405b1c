"""Per-sample asymmetric affine quantization of bottleneck tensors, in torch and in numpy.

    x ─ range per sample [min(x, 0), max(x, 0)] ─ scale, zero_point ─ q = round(x / scale) + zp
    q ─ (q - zp) * scale ─ x̂

Each sample of a batch gets its own scale and zero point, so a sample quantizes to the same
integers whatever else is in its batch (research code that takes the range over the whole
batch is only right at batch size 1). The range always contains zero, so zero (and the
zero-filled channels a device does not send) is exact and the zero point is an integer.

`quantize` / `dequantize` take a torch tensor or a numpy array and answer in the same kind:
the numpy twin does the same float32 arithmetic step by step (round half to even), so both
give the same integers bit for bit, and a device without torch sends the frames a torch
head would. torch is imported only when a torch tensor comes in (or for `fake_quantize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

SUPPORTED_BITS = (2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return bits


@dataclass(frozen=True)
class QuantizedTensor:
    """Integers and the per-sample parameters needed to undo them.

    `values` is uint8 of shape [N, k, H, W] with every entry in [0, 2**bits - 1]; `scale`
    (float32) and `zero_point` (uint8) have shape [N]. `channels` is the bottleneck's full
    channel count C; only the first k = values.shape[1] <= C are carried. The three arrays
    are torch tensors or numpy arrays (all of one kind), as `quantize` was given.
    """

    values: Any
    scale: Any
    zero_point: Any
    bits: int
    channels: int

    @property
    def sent_channels(self) -> int:
        """How many of the `channels` ordered channels this tensor carries."""
        return int(self.values.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[0])

    def numpy(self) -> QuantizedTensor:
        """The same integers and parameters as numpy arrays (CPU; no copy when possible)."""
        if isinstance(self.values, np.ndarray):
            return self
        v, s, zp = (t.detach().cpu().numpy() for t in (self.values, self.scale, self.zero_point))
        return QuantizedTensor(v, s, zp, self.bits, self.channels)


def quant_params(x: Any, bits: int) -> tuple[Any, Any]:
    """Per-sample (scale, zero_point) for `x` of shape [N, ...], both of shape [N], float32."""
    qmax = float((1 << _check_bits(bits)) - 1)
    if isinstance(x, np.ndarray):
        return _range_params_np(x, np.full((x.shape[0],), qmax, dtype=np.float32))
    import torch

    return _range_params(x, torch.full((x.shape[0],), qmax, device=x.device))


def _range_params(x: torch.Tensor, qmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    flat = x.detach().reshape(x.shape[0], -1).float()
    lo = flat.amin(dim=1).clamp(max=0.0)
    hi = flat.amax(dim=1).clamp(min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.minimum(torch.round(-lo / scale).clamp(min=0), qmax)
    return scale, zero_point


def _range_params_np(x: np.ndarray, qmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The numpy twin of `_range_params`: the same float32 operations in the same order."""
    flat = x.reshape(x.shape[0], -1).astype(np.float32, copy=False)
    lo = np.minimum(flat.min(axis=1), np.float32(0.0))
    hi = np.maximum(flat.max(axis=1), np.float32(0.0))
    scale = (hi - lo) / qmax
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    zero_point = np.minimum(np.maximum(np.round(-lo / scale), np.float32(0.0)), qmax)
    return scale, zero_point


def _expand(v: Any, like: Any) -> Any:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def quantize(x: Any, bits: int, channels: int | None = None) -> QuantizedTensor:
    """Quantize a float tensor or array [N, k, H, W] to `bits`-bit integers, one range per
    sample; a numpy array gives numpy integers, a torch tensor torch ones."""
    if x.ndim != 4:
        raise ValueError(f"expected a [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    qmax = (1 << _check_bits(bits)) - 1
    scale, zero_point = quant_params(x, bits)
    channels = int(x.shape[1]) if channels is None else channels
    if isinstance(x, np.ndarray):
        xf = x.astype(np.float32, copy=False)
        q = np.round(xf / _expand(scale, xf)) + _expand(zero_point, xf)
        q = np.clip(q, 0, qmax).astype(np.uint8)
        return QuantizedTensor(q, scale, zero_point.astype(np.uint8), bits, channels)
    import torch

    q = torch.round(x.detach().float() / _expand(scale, x)) + _expand(zero_point, x)
    q = q.clamp(0, qmax).to(torch.uint8)
    return QuantizedTensor(
        values=q,
        scale=scale.float(),
        zero_point=zero_point.to(torch.uint8),
        bits=bits,
        channels=channels,
    )


def dequantize(qt: QuantizedTensor) -> Any:
    """Float32 [N, k, H, W] the integers stand for (a numpy array or a tensor, like `qt`)."""
    if isinstance(qt.values, np.ndarray):
        v = qt.values.astype(np.float32)
        zp = qt.zero_point.astype(np.float32)
        return (v - _expand(zp, v)) * _expand(qt.scale.astype(np.float32, copy=False), v)
    v = qt.values.float()
    return (v - _expand(qt.zero_point.float(), v)) * _expand(qt.scale.float(), v)


def fake_quantize(x: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize in the forward pass; identity gradient (straight-through).

    `bits` is one bit-width for the whole batch, or a tensor [N] giving each sample its own
    (mixed-precision training in one pass). The forward value equals
    `dequantize(quantize(x, bits))` exactly, so training sees the numbers the tail will.
    """
    import torch

    if isinstance(bits, torch.Tensor):
        qmax = (torch.ones_like(bits, dtype=torch.float32) * 2).pow(bits.float()) - 1
    else:
        qmax = torch.full((x.shape[0],), float((1 << _check_bits(bits)) - 1))
    qmax = qmax.to(x.device)
    scale, zero_point = _range_params(x, qmax)
    s, zp, qm = (_expand(v, x).to(x.dtype) for v in (scale, zero_point, qmax))
    xq: torch.Tensor = (
        torch.minimum(torch.clamp(torch.round(x.detach() / s) + zp, min=0), qm) - zp
    ) * s
    return x + (xq - x).detach()
