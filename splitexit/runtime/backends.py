"""Runtime backends: what runs a bundle's head segments, exits and tail.

    HeadRunner / TailRunner (exits, quantization, framing, batching: one logic)
        └─ Backend ─┬─ TorchBackend  TorchScript pieces on `bundle.device`      torch tensors
                    └─ OnnxBackend   onnx/ graphs in onnxruntime sessions       numpy arrays
                                     (execution providers: CPU, CUDA, TensorRT; threads)

A backend runs pieces and does the few array steps whose spelling differs between torch and
numpy (preprocess, rows of a batch, zero-fill and concatenate codes, to the host). Arrays
stay in the backend's own kind from input to logits, so the ONNX path imports no torch.

`--runtime auto` picks onnxruntime when it is installed and the bundle carries ONNX graphs
(`Manifest.has_onnx`), else torch.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from splitexit.bottleneck.quantize import QuantizedTensor, dequantize
from splitexit.errors import RuntimeUnavailable

if TYPE_CHECKING:
    from splitexit.bundle.load import Bundle
    from splitexit.bundle.manifest import Manifest
    from splitexit.preprocess import Preprocess

RUNTIMES = ("auto", "torch", "onnxruntime")
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass(frozen=True)
class RuntimeOptions:
    """Which runtime runs the pieces, and how.

    `runtime`: "auto", "torch" or "onnxruntime". `providers`: onnxruntime execution
    providers in order of preference ("cpu", "cuda", "tensorrt", or onnxruntime's own
    names); CPU is always appended as the fallback. `threads`: intra-op threads (torch:
    process-wide `torch.set_num_threads`; onnxruntime: per session); None leaves the default.
    """

    runtime: str = "auto"
    providers: tuple[str, ...] = ("cpu",)
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        object.__setattr__(self, "providers", tuple(self.providers))
        for p in self.providers:
            if p not in PROVIDERS and p not in PROVIDERS.values():
                raise ValueError(
                    f"unknown execution provider {p!r}; choose from {', '.join(PROVIDERS)}"
                )

    @classmethod
    def coerce(cls, value: RuntimeOptions | str | None) -> RuntimeOptions:
        """Options from options, a runtime name, or None (torch: the library's default)."""
        if isinstance(value, RuntimeOptions):
            return value
        return cls(runtime=value or "torch")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # an import hook that refuses it
        return False


def has_onnxruntime() -> bool:
    return _installed("onnxruntime")


def has_torch() -> bool:
    return _installed("torch")


def resolve_runtime(requested: str, manifest: Manifest) -> str:
    """ "torch" or "onnxruntime" for `requested` ("auto" decides); raises RuntimeUnavailable
    with what to install or export when the choice cannot run here."""
    if requested not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {requested!r}")
    if requested == "auto":
        if has_onnxruntime() and manifest.has_onnx:
            return "onnxruntime"
        if has_torch():
            return "torch"
        if not has_onnxruntime():
            raise RuntimeUnavailable(
                "neither torch nor onnxruntime is installed: pip install 'splitexit[device]'"
            )
        requested = "onnxruntime"  # only onnxruntime is here: say what the bundle lacks
    if requested == "onnxruntime":
        if not has_onnxruntime():
            raise RuntimeUnavailable(
                "--runtime onnxruntime needs onnxruntime: pip install onnxruntime "
                "(or onnxruntime-gpu), or use --runtime torch"
            )
        if not manifest.has_onnx:
            raise RuntimeUnavailable(
                f"bundle {manifest.name!r} has no ONNX graphs: add them with "
                "`splitexit onnx BUNDLE` (needs the export extra), or use --runtime torch"
            )
        return "onnxruntime"
    if not has_torch():
        raise RuntimeUnavailable(
            "--runtime torch needs torch (pip install torch, CPU build: --index-url "
            "https://download.pytorch.org/whl/cpu), or use --runtime onnxruntime"
        )
    return "torch"


class Backend(Protocol):
    """What the runners need from a runtime (arrays are the backend's own kind)."""

    name: str

    def segment(self, i: int, x: Any) -> Any: ...
    def exit(self, name: str, f: Any) -> Any: ...
    def tail(self, code: Any) -> Any: ...
    def input(self, x: Any) -> Any: ...
    def preprocess(self, pre: Preprocess, images: np.ndarray) -> Any: ...
    def rows(self, a: Any, keep: np.ndarray) -> Any: ...
    def host(self, a: Any) -> np.ndarray: ...
    def codes(self, codes: Sequence[QuantizedTensor], channels: int) -> Any: ...
    def answers(self, logits: Any) -> tuple[Any, Any, Any]: ...
    def zeros(self, shape: Sequence[int]) -> Any: ...


def open_backend(
    bundle: Bundle, parts: Sequence[str], options: RuntimeOptions | str | None = None
) -> Backend:
    """The backend `options` chooses for `bundle`, with the pieces of `parts` ready to run."""
    opts = RuntimeOptions.coerce(options)
    runtime = resolve_runtime(opts.runtime, bundle.manifest)
    if runtime == "onnxruntime":
        from .onnx_backend import OnnxBackend

        return OnnxBackend(bundle, parts, opts)
    return TorchBackend(bundle, parts, opts)


class TorchBackend:
    """The bundle's TorchScript pieces (loaded here if the bundle was loaded without them)."""

    name = "torch"

    def __init__(self, bundle: Bundle, parts: Sequence[str], options: RuntimeOptions) -> None:
        import torch

        self._torch = torch
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        bundle.load_parts(parts)
        self.bundle = bundle
        self.device = bundle.device

    def _call(self, module: Any, x: Any) -> Any:
        with self._torch.inference_mode():
            out = module(x)
        if out.is_cuda:
            self._torch.cuda.synchronize(out.device)
        return out

    def segment(self, i: int, x: Any) -> Any:
        return self._call(self.bundle.segments[i], x)

    def exit(self, name: str, f: Any) -> Any:
        return self._call(self.bundle.exits[name], f)

    def tail(self, code: Any) -> Any:
        return self._call(self.bundle.tail, code).float()

    def input(self, x: Any) -> Any:
        return self._torch.as_tensor(x).to(self.device)

    def preprocess(self, pre: Preprocess, images: np.ndarray) -> Any:
        return pre(images, device=self.device)

    def rows(self, a: Any, keep: np.ndarray) -> Any:
        return a[self._torch.from_numpy(keep).to(a.device)]

    def host(self, a: Any) -> np.ndarray:
        out: np.ndarray = a.detach().cpu().numpy()
        return out

    def codes(self, codes: Sequence[QuantizedTensor], channels: int) -> Any:
        """Dequantize on the device (moving the uint8 values, not 4x larger floats), zero-fill."""
        from splitexit.bottleneck.module import zero_fill

        torch = self._torch
        parts = []
        for qt in codes:
            v, s, zp = (
                torch.as_tensor(a).to(self.device) for a in (qt.values, qt.scale, qt.zero_point)
            )
            x = dequantize(QuantizedTensor(v, s, zp, qt.bits, qt.channels))
            parts.append(zero_fill(x, channels))
        return torch.cat(parts)

    def answers(self, logits: Any) -> tuple[Any, Any, Any]:
        """(logits, argmax class, its softmax probability) on the CPU."""
        with self._torch.inference_mode():
            probability, prediction = self._torch.softmax(logits, dim=1).max(dim=1)
        return logits.cpu(), prediction.cpu(), probability.cpu()

    def zeros(self, shape: Sequence[int]) -> Any:
        return self._torch.zeros(tuple(shape), device=self.device)
