"""Per-sample asymmetric affine quantization of bottleneck tensors.

    x ─ range per sample [min(x, 0), max(x, 0)] ─ scale, zero_point ─ q = round(x / scale) + zp
    q ─ (q - zp) * scale ─ x̂

Each sample of a batch gets its own scale and zero point, so a sample quantizes to the same
integers whatever else is in its batch (research code that takes the range over the whole
batch is only right at batch size 1). The range always contains zero, so zero (and the
zero-filled channels a device does not send) is exact and the zero point is an integer.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    channel count C; only the first k = values.shape[1] <= C are carried.
    """

    values: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    channels: int

    @property
    def sent_channels(self) -> int:
        """How many of the `channels` ordered channels this tensor carries."""
        return int(self.values.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.values.shape[0])


def quant_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (scale, zero_point) for `x` of shape [N, ...], both of shape [N], float32."""
    qmax = torch.full((x.shape[0],), float((1 << _check_bits(bits)) - 1), device=x.device)
    return _range_params(x, qmax)


def _range_params(x: torch.Tensor, qmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.detach().reshape(x.shape[0], -1).float()
    lo = flat.amin(dim=1).clamp(max=0.0)
    hi = flat.amax(dim=1).clamp(min=0.0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero_point = torch.minimum(torch.round(-lo / scale).clamp(min=0), qmax)
    return scale, zero_point


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def quantize(x: torch.Tensor, bits: int, channels: int | None = None) -> QuantizedTensor:
    """Quantize a float tensor [N, k, H, W] to `bits`-bit integers, one range per sample."""
    if x.dim() != 4:
        raise ValueError(f"expected a [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    qmax = (1 << _check_bits(bits)) - 1
    scale, zero_point = quant_params(x, bits)
    q = torch.round(x.detach().float() / _expand(scale, x)) + _expand(zero_point, x)
    q = q.clamp(0, qmax).to(torch.uint8)
    return QuantizedTensor(
        values=q,
        scale=scale.float(),
        zero_point=zero_point.to(torch.uint8),
        bits=bits,
        channels=int(x.shape[1]) if channels is None else channels,
    )


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Float32 tensor [N, k, H, W] the integers stand for."""
    v = qt.values.float()
    return (v - _expand(qt.zero_point.float(), v)) * _expand(qt.scale.float(), v)


def fake_quantize(x: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize in the forward pass; identity gradient (straight-through).

    `bits` is one bit-width for the whole batch, or a tensor [N] giving each sample its own
    (mixed-precision training in one pass). The forward value equals
    `dequantize(quantize(x, bits))` exactly, so training sees the numbers the tail will.
    """
    if isinstance(bits, torch.Tensor):
        qmax = (torch.ones_like(bits, dtype=torch.float32) * 2).pow(bits.float()) - 1
    else:
        qmax = torch.full((x.shape[0],), float((1 << _check_bits(bits)) - 1))
    qmax = qmax.to(x.device)
    scale, zero_point = _range_params(x, qmax)
    s, zp, qm = (_expand(v, x).to(x.dtype) for v in (scale, zero_point, qmax))
    xq = (torch.minimum(torch.clamp(torch.round(x.detach() / s) + zp, min=0), qm) - zp) * s
    return x + (xq - x).detach()
