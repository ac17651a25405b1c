"""Running a bundle: the head on the device, the tail on the server.

device:  x ─ HeadRunner.run ─┬─ confident exit ─► ExitAnswer (local)
                             └─ z ─ HeadRunner.frame(z, bits, keep) ─► bytes
server:  [bytes, ...] ─ TailRunner.run_frames ─► [TailAnswer, ...]   (one tail call)

Both runners run their pieces on a backend (`backends`): TorchScript (torch tensors) or
ONNX Runtime (numpy arrays, no torch), chosen by `RuntimeOptions` (`--runtime`).
"""

from .backends import RUNTIMES, RuntimeOptions, resolve_runtime
from .head import ExitAnswer, HeadResult, HeadRunner
from .tail import TailAnswer, TailRunner

__all__ = [
    "RUNTIMES",
    "ExitAnswer",
    "HeadResult",
    "HeadRunner",
    "RuntimeOptions",
    "TailAnswer",
    "TailRunner",
    "resolve_runtime",
]
