"""The learned bottleneck: an encoder on the head side, a decoder on the tail side.

    head side                                              tail side
    f ─ encoder ─ z[:, :k] ─ quantize(bits) ══ frame ══ dequantize ─ zero-fill to C ─ decoder ─ f̂

`f` is the split-point feature map (shape `feature_shape`), `z` has `channels` = C ordered
channels at a lower resolution, and `f̂` has the split-point shape again so the original tail
resumes unchanged (BottleFit / head network distillation). A device may send only the
first k channels on a slow link; the decoder sees the missing ones as zeros, which is how
ordered-dropout training fills them.

`forward()` is the training face (differentiable, straight-through quantization);
`encode()` / `decode()` are the deployment face (real integers in, real integers out).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import SUPPORTED_BITS, QuantizedTensor, dequantize, fake_quantize, quantize


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def keep_channels(z: torch.Tensor, keep: int | None) -> torch.Tensor:
    """The first `keep` channels of z (all when keep is None), validated."""
    if keep is None or keep == z.shape[1]:
        return z
    if not 1 <= keep <= z.shape[1]:
        raise ValueError(f"keep must be in 1..{z.shape[1]}, got {keep}")
    return z[:, :keep]


def zero_fill(z: torch.Tensor, channels: int) -> torch.Tensor:
    """Pad [N, k, H, W] with zero channels up to [N, channels, H, W]."""
    k = z.shape[1]
    if k == channels:
        return z
    if k > channels:
        raise ValueError(f"got {k} channels, more than the bottleneck's {channels}")
    return F.pad(z, (0, 0, 0, 0, 0, channels - k))


class Encoder(nn.Module):
    """Strided convs from the split-point features down to C channels (head side)."""

    def __init__(self, in_channels: int, channels: int, hidden: int, downsample: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for _ in range(downsample):
            layers.append(_conv_bn_relu(cin, hidden, stride=2))
            cin = hidden
        if not layers:
            layers.append(_conv_bn_relu(cin, hidden))
            cin = hidden
        layers.append(nn.Conv2d(cin, channels, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.layers(f)
        return z


class Decoder(nn.Module):
    """Upsampling convs from C channels back to the split-point shape (tail side)."""

    def __init__(
        self,
        channels: int,
        feature_shape: tuple[int, int, int],
        hidden: int,
        upsample: int,
    ) -> None:
        super().__init__()
        out_channels, self.out_h, self.out_w = feature_shape
        layers: list[nn.Module] = [_conv_bn_relu(channels, hidden)]
        for _ in range(upsample):
            layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), _conv_bn_relu(hidden, hidden)]
        self.layers = nn.Sequential(*layers)
        self.project = nn.Sequential(
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.layers(z)
        if y.shape[-2] != self.out_h or y.shape[-1] != self.out_w:
            y = F.interpolate(
                y, size=(self.out_h, self.out_w), mode="bilinear", align_corners=False
            )
        f: torch.Tensor = self.project(y)
        return f


class Bottleneck(nn.Module):
    """Encoder + per-sample quantization + decoder, with ordered channels.

    Args:
        feature_shape: (C, H, W) of the split-point features it replaces.
        channels: C, the number of ordered bottleneck channels.
        hidden: width of the encoder/decoder convs.
        downsample: number of stride-2 convs in the encoder (and 2x upsamplings in the
            decoder); the code is about `H / 2**downsample` high.
        bits: the bit-widths this bottleneck is trained for and may be sent at.
    """

    def __init__(
        self,
        feature_shape: Sequence[int],
        channels: int,
        *,
        hidden: int = 64,
        downsample: int = 1,
        bits: Sequence[int] = SUPPORTED_BITS,
    ) -> None:
        super().__init__()
        fc, fh, fw = (int(v) for v in feature_shape)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if downsample < 0 or fh >> downsample < 1 or fw >> downsample < 1:
            raise ValueError(f"downsample={downsample} is too deep for {fh}x{fw} features")
        for b in bits:
            if b not in SUPPORTED_BITS:
                raise ValueError(f"bits must be a subset of {SUPPORTED_BITS}, got {tuple(bits)}")
        self.feature_shape = (fc, fh, fw)
        self.channels = channels
        self.bits = tuple(sorted(set(bits)))
        self.encoder = Encoder(fc, channels, hidden, downsample)
        self.decoder = Decoder(channels, self.feature_shape, hidden, downsample)

    def code_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the code for the configured feature shape."""
        with torch.no_grad():
            was = self.encoder.training
            self.encoder.eval()
            z = self.encoder(torch.zeros((1, *self.feature_shape)))
            self.encoder.train(was)
        return tuple(int(v) for v in z.shape[1:])  # type: ignore[return-value]

    def forward(
        self,
        f: torch.Tensor,
        bits: int | torch.Tensor | None = None,
        keep: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training path: f ─ encoder ─ first `keep` channels ─ fake-quantize ─ decoder.

        `bits=None` skips quantization (float code), `keep=None` keeps all channels. Either
        may be a tensor [N] giving every sample its own operating point, so one pass trains
        a mix of (k, bits) (the ordered-dropout / sandwich rule without extra passes).
        """
        f_hat: torch.Tensor = self.decoder(self.code(self.encoder(f), bits, keep))
        return f_hat

    def code(
        self,
        z: torch.Tensor,
        bits: int | torch.Tensor | None = None,
        keep: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the decoder sees for encoder output z: kept channels, quantized, zero-filled."""
        if isinstance(keep, torch.Tensor):
            index = torch.arange(z.shape[1], device=z.device).view(1, -1, 1, 1)
            z = z * (index < keep.to(z.device).view(-1, 1, 1, 1)).to(z.dtype)
        else:
            z = keep_channels(z, keep)
        if bits is not None:
            z = fake_quantize(z, bits)
        return zero_fill(z, self.channels)

    @torch.no_grad()
    def encode(self, f: torch.Tensor, bits: int, keep: int | None = None) -> QuantizedTensor:
        """Deployment path, head side: features to integers (first `keep` channels)."""
        z = keep_channels(self.encoder(f), keep)
        return quantize(z, bits, channels=self.channels)

    @torch.no_grad()
    def decode(self, qt: QuantizedTensor) -> torch.Tensor:
        """Deployment path, tail side: integers back to split-point features."""
        if qt.channels != self.channels:
            raise ValueError(f"code has C={qt.channels}, this bottleneck has C={self.channels}")
        f_hat: torch.Tensor = self.decoder(zero_fill(dequantize(qt), self.channels))
        return f_hat
