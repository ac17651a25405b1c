"""The device side: run the head segment by segment, exit early, or frame the code for the tail.

    x ─ segment 0 ─┬─ segment 1 ─┬─ ... ─ last segment (ends in the encoder) ─ z ─ frame ─► tail
                   │             │
                exit a        exit b        a sample whose confidence >= the exit's
                   ▼             ▼          threshold is answered there and goes no further

Samples that exit are dropped from the batch before the next segment, so a batch of one stops
computing at its first confident exit. Batch-norm runs in eval mode, so dropping rows does
not change the numbers of the others.

The pieces run on a backend (`runtime=`: TorchScript or onnxruntime, see `backends`);
arrays (`z`, logits) are the backend's kind: torch tensors or numpy arrays. Quantization is
the bottleneck's own `quantize` (torch or its numpy twin).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from splitexit.bottleneck.quantize import QuantizedTensor, quantize
from splitexit.bundle.load import Bundle
from splitexit.confidence import CONFIDENCE_MEASURES, confidence
from splitexit.errors import BundleError

from .backends import RuntimeOptions, open_backend


@dataclass(frozen=True)
class ExitAnswer:
    """A local answer: which exit, the predicted class, its confidence, the logits [K]."""

    exit_name: str
    prediction: int
    confidence: float
    logits: np.ndarray  # [K]


@dataclass
class HeadResult:
    """What running the head on a batch of N samples gave.

    Per sample i: `exit_name[i]` (None if it needs the tail), `prediction[i]` and
    `confidence[i]` of that exit (None if it needs the tail), and `exit_logits[i]` /
    `exit_confidence[i]`: every exit computed for it so far, by name (logits [K] as numpy).
    `pending` lists the samples that need the tail, in the order of the rows of `z`
    (the float code [len(pending), C, h, w]; None when every sample exited).
    `timings` holds seconds per piece: "segment_0", ..., "exit_<name>".
    """

    exit_name: list[str | None]
    prediction: list[int | None]
    confidence: list[float | None]
    exit_logits: list[dict[str, Any]]
    exit_confidence: list[dict[str, float]]
    pending: list[int]
    z: Any  # torch.Tensor | np.ndarray | None
    timings: dict[str, float] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict, repr=False)
    """Exit inputs kept for the exits `run` skipped, for `fallback`."""

    @property
    def batch_size(self) -> int:
        return len(self.exit_name)

    def answer(self, i: int) -> ExitAnswer | None:
        """Sample i's local answer if it exited, else None."""
        name = self.exit_name[i]
        if name is None:
            return None
        return ExitAnswer(
            name,
            cast(int, self.prediction[i]),  # set wherever exit_name is
            cast(float, self.confidence[i]),
            self.exit_logits[i][name],
        )


class HeadRunner:
    """Runs a bundle's head (loaded with parts "head" and "exits") on preprocessed input.

    Args:
        bundle: the loaded bundle.
        measure: confidence measure for every exit; default each exit's manifest measure.
        thresholds: per-exit thresholds overriding the manifest's (exit when
            confidence >= threshold; a threshold above 1 disables an exit).
        runtime: `RuntimeOptions` or a runtime name; default TorchScript ("torch"), loading
            the head and exits if the bundle was loaded without them.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        measure: str | None = None,
        thresholds: Mapping[str, float] | None = None,
        runtime: RuntimeOptions | str | None = None,
    ) -> None:
        if measure is not None and measure not in CONFIDENCE_MEASURES:
            raise ValueError(f"unknown measure {measure!r}; choose one of {CONFIDENCE_MEASURES}")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.backend = open_backend(bundle, ("head", "exits"), runtime)
        self.exit_at = {e.segment: e.name for e in self.manifest.exits}
        self.measures = {e.name: measure or e.measure for e in self.manifest.exits}
        self.thresholds = self._thresholds(thresholds, dict(self.manifest.thresholds))

    # ----------------------------------------------------------------------------- head

    def preprocess(self, images: np.ndarray) -> Any:
        """uint8 images [N, H, W(, C)] to model input, in this runner's array kind."""
        return self.backend.preprocess(self.bundle.preprocess, images)

    def run(
        self,
        x: Any,
        *,
        thresholds: Mapping[str, float] | None = None,
        exits: bool | Collection[str] = True,
    ) -> HeadResult:
        """Run the head on preprocessed input [N, ...]; exit samples whose exit is confident.

        `thresholds` overrides this runner's for one call. `exits=False` skips the exit
        branches (always offload), a collection of exit names runs only those; `fallback`
        computes a skipped exit later if the tail is unreachable.
        """
        thr = self._thresholds(thresholds, self.thresholds) if thresholds else self.thresholds
        n = int(x.shape[0])
        result = HeadResult(
            exit_name=[None] * n,
            prediction=[None] * n,
            confidence=[None] * n,
            exit_logits=[{} for _ in range(n)],
            exit_confidence=[{} for _ in range(n)],
            pending=[],
            z=None,
        )
        be = self.backend
        active = np.arange(n)
        f = be.input(x)
        for i in range(self.manifest.segments):
            f = self._timed(result, f"segment_{i}", be.segment, i, f)
            name = self.exit_at.get(i)
            if name is None:
                continue
            if not (exits is True or (exits is not False and name in exits)):
                result.features[name] = f
                continue
            # scored on the host: a few numpy ops on [N, K] cost less than device ops
            logits = be.host(self._timed(result, f"exit_{name}", be.exit, name, f))
            conf = confidence(logits, self.measures[name])
            self._record(result, active.tolist(), name, logits, conf)
            take = conf >= thr[name]
            if not take.any():
                continue
            for row in np.flatnonzero(take).tolist():
                sample = int(active[row])
                result.exit_name[sample] = name
                result.prediction[sample] = int(logits[row].argmax())
                result.confidence[sample] = float(conf[row])
            active = active[~take]
            if active.size == 0:
                break
            f = be.rows(f, ~take)
        if active.size:
            result.pending = active.tolist()
            result.z = f
        return result

    def fallback(self, result: HeadResult) -> list[ExitAnswer]:
        """Best local answer per sample when the tail cannot be reached.

        A sample that exited keeps its answer; the others get their most confident exit
        (computed now if `run(exits=False)` skipped them). Raises BundleError if the bundle
        has no exits at all.
        """
        if result.features:
            self._compute_skipped(result)
        answers = []
        for i in range(result.batch_size):
            taken = result.answer(i)
            if taken is not None:
                answers.append(taken)
                continue
            scores = result.exit_confidence[i]
            if not scores:
                raise BundleError(
                    f"bundle {self.manifest.name!r} has no exits, so it cannot answer without "
                    "the tail server; retry later or export a model with exits"
                )
            name = max(scores, key=lambda e: scores[e])
            logits = result.exit_logits[i][name]
            answers.append(ExitAnswer(name, int(logits.argmax()), scores[name], logits))
        return answers

    # --------------------------------------------------------------------------- encode

    def encode(self, z: Any, bits: int, keep: int | None = None) -> QuantizedTensor:
        """Quantize the first `keep` (default all C) channels of z to `bits`, per sample."""
        b = self.manifest.bottleneck
        if bits not in b.bits:
            raise ValueError(f"bits={bits} is not supported by this bundle; use one of {b.bits}")
        keep = b.channels if keep is None else int(keep)
        if not 1 <= keep <= b.channels:
            raise ValueError(f"keep must be in 1..{b.channels}, got {keep}")
        if tuple(z.shape[1:]) != tuple(b.code_shape):
            raise ValueError(f"z has shape {tuple(z.shape)}, expected [N, {b.code_shape}]")
        return quantize(z[:, :keep], bits, channels=b.channels)

    def frame(self, z: Any, bits: int, keep: int | None = None, *, compress: bool = True) -> bytes:
        """The wire frame for z at (keep, bits), stamped with the bundle's fingerprint."""
        from splitexit.codec import encode_frame

        return encode_frame(
            self.encode(z, bits, keep),
            self.bundle.fingerprint,
            level=self.manifest.codec.zstd_level,
            dictionary=self.bundle.dictionary,
            compress=compress,
        )

    # -------------------------------------------------------------------------- helpers

    def _thresholds(
        self, override: Mapping[str, float] | None, base: dict[str, float]
    ) -> dict[str, float]:
        unknown = sorted(set(override or {}) - set(base))
        if unknown:
            raise ValueError(f"no exits named {unknown}; this bundle's exits: {list(base)}")
        return {**base, **{k: float(v) for k, v in (override or {}).items()}}

    def _timed(self, result: HeadResult, key: str, call: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = call(*args)
        result.timings[key] = time.perf_counter() - start
        return out

    def _record(
        self,
        result: HeadResult,
        samples: list[int],
        name: str,
        logits: Any,
        conf: np.ndarray,
    ) -> None:
        conf_list = conf.tolist()
        for row, sample in enumerate(samples):
            result.exit_logits[sample][name] = logits[row]
            result.exit_confidence[sample][name] = conf_list[row]

    def _compute_skipped(self, result: HeadResult) -> None:
        pending = set(result.pending)
        rows = [i for i in range(result.batch_size) if i in pending]
        for name, f in result.features.items():
            logits = self.backend.host(
                self._timed(result, f"exit_{name}", self.backend.exit, name, f)
            )
            conf = confidence(logits, self.measures[name])
            self._record(result, rows, name, logits, conf)
        result.features = {}
