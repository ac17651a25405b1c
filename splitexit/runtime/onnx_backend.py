"""The onnxruntime backend: a bundle's ONNX graphs in InferenceSessions, numpy in and out.

    onnx/head/segment_<i>.onnx   onnx/exits/<name>.onnx   onnx/tail.onnx   (Manifest.has_onnx)
        ─ one InferenceSession each (providers in order, CPU last; intra-op threads) ─► numpy

Nothing here imports torch: preprocessing is `Preprocess.numpy`, dequantization the numpy
twin in `splitexit.bottleneck.quantize`, confidences `splitexit.confidence`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from splitexit.bottleneck.quantize import QuantizedTensor, dequantize
from splitexit.bundle.manifest import onnx_graph_files
from splitexit.confidence import softmax
from splitexit.errors import BundleError, RuntimeUnavailable

from .backends import PROVIDERS, RuntimeOptions

if TYPE_CHECKING:
    from splitexit.bundle.load import Bundle
    from splitexit.preprocess import Preprocess


def session_providers(requested: Sequence[str]) -> list[str]:
    """onnxruntime provider names for `requested`, CPU appended; raises RuntimeUnavailable
    for one this onnxruntime build does not have (e.g. CUDA without onnxruntime-gpu)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    names = [PROVIDERS.get(p, p) for p in requested]
    missing = [n for n in names if n not in available]
    if missing:
        raise RuntimeUnavailable(
            f"execution provider {', '.join(missing)} is not in this onnxruntime "
            f"(available: {', '.join(available)}); install onnxruntime-gpu (CUDA, TensorRT) "
            "or Jetson's onnxruntime wheel, or use --providers cpu"
        )
    return list(dict.fromkeys([*names, "CPUExecutionProvider"]))


class OnnxBackend:
    """InferenceSessions for the pieces of `parts` ("head", "exits", "tail")."""

    name = "onnxruntime"

    def __init__(self, bundle: Bundle, parts: Sequence[str], options: RuntimeOptions) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        self.providers = session_providers(options.providers)
        so = ort.SessionOptions()
        if options.threads is not None:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3  # warnings about unused providers are noise here
        m = bundle.manifest
        files = onnx_graph_files(m)

        def session(piece: str) -> Any:
            path = bundle.path / files[piece]
            if not path.is_file():
                raise BundleError(f"{files[piece]} is missing from bundle {bundle.path}")
            sess = ort.InferenceSession(str(path), so, providers=self.providers)
            return sess, sess.get_inputs()[0].name

        self._segments = (
            [session(f"segment_{i}") for i in range(m.segments)] if "head" in parts else None
        )
        self._exits = (
            {e.name: session(f"exit_{e.name}") for e in m.exits} if "exits" in parts else None
        )
        self._tail = session("tail") if "tail" in parts else None

    @staticmethod
    def _call(entry: Any, x: np.ndarray) -> np.ndarray:
        sess, name = entry
        out: np.ndarray = sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        return out

    def _need(self, value: Any, part: str) -> Any:
        if value is None:
            raise BundleError(f"the onnxruntime backend was opened without the {part!r} part")
        return value

    def segment(self, i: int, x: np.ndarray) -> np.ndarray:
        return self._call(self._need(self._segments, "head")[i], x)

    def exit(self, name: str, f: np.ndarray) -> np.ndarray:
        return self._call(self._need(self._exits, "exits")[name], f)

    def tail(self, code: np.ndarray) -> np.ndarray:
        return self._call(self._need(self._tail, "tail"), code)

    def input(self, x: Any) -> np.ndarray:
        if not isinstance(x, np.ndarray) and hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().numpy()
        return np.ascontiguousarray(x, dtype=np.float32)

    def preprocess(self, pre: Preprocess, images: np.ndarray) -> np.ndarray:
        return pre.numpy(images)

    def rows(self, a: np.ndarray, keep: np.ndarray) -> np.ndarray:
        out: np.ndarray = a[keep]
        return out

    def host(self, a: np.ndarray) -> np.ndarray:
        return a

    def codes(self, codes: Sequence[QuantizedTensor], channels: int) -> np.ndarray:
        parts = []
        for qt in codes:
            x = dequantize(qt.numpy())
            pad = channels - x.shape[1]
            parts.append(np.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x)
        return np.concatenate(parts)

    def answers(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = softmax(logits.astype(np.float32, copy=False))
        prediction = p.argmax(axis=1)
        return logits, prediction.astype(np.int64), p[np.arange(len(p)), prediction]

    def zeros(self, shape: Sequence[int]) -> np.ndarray:
        return np.zeros(tuple(shape), dtype=np.float32)
