"""Learned bottleneck and its per-sample quantization."""

from .module import Bottleneck, Decoder, Encoder, keep_channels, zero_fill
from .quantize import (
    SUPPORTED_BITS,
    QuantizedTensor,
    dequantize,
    fake_quantize,
    quant_params,
    quantize,
)

__all__ = [
    "SUPPORTED_BITS",
    "Bottleneck",
    "Decoder",
    "Encoder",
    "QuantizedTensor",
    "dequantize",
    "fake_quantize",
    "keep_channels",
    "quant_params",
    "quantize",
    "zero_fill",
]
