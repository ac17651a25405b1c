"""Learned bottleneck and its per-sample quantization.

The quantizer (`quantize`, `dequantize`, numpy twins included) imports without torch; the
modules (`Bottleneck`, `Encoder`, `Decoder`, `keep_channels`, `zero_fill`) load on first use.
"""

from typing import Any

from .quantize import (
    SUPPORTED_BITS,
    QuantizedTensor,
    dequantize,
    fake_quantize,
    quant_params,
    quantize,
)

_MODULES = ("Bottleneck", "Decoder", "Encoder", "keep_channels", "zero_fill")

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


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        from . import module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
