"""The calibration table: what a bundle did on every sample of a split (`tabulate.py` fills it).

    per sample: label, every exit's confidence (every measure) and predicted class, the
    tail's predicted class and the frame's bytes at every operating point (k, bits)

Every later question (which thresholds, which measure, which operating point, what accuracy,
offload rate, bytes, latency) is answered from this table with numpy alone, without running
the model again. It saves as a compressed `.npz` of plain arrays plus a small JSON header
(no pickles): `table.save(path)`, `CalibrationTable.load(path)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitexit.bundle.manifest import OperatingPoint
from splitexit.errors import SplitexitError
from splitexit.exits import CONFIDENCE_MEASURES

TABLE_FORMAT = "splitexit-calibration"
TABLE_VERSION = 1

Point = OperatingPoint  # the one operating-point type; the table keys by (channels, bits)


class CalibrationError(SplitexitError, ValueError):
    """A calibration table or goal that cannot be used as asked."""


@dataclass(frozen=True)
class CalibrationTable:
    """Per-sample record of a bundle on one split (N samples, E exits, P operating points).

    Attributes:
        labels: [N] true classes.
        exit_names: the exits in the order the head reaches them; `exit_segments` the head
            segment each one reads (of `segments` segments).
        confidence: measure -> [N, E] float32 confidence of every exit.
        exit_prediction: [N, E] class each exit predicts.
        points: the operating points the tail was run at (given as points or (k, bits)).
        tail_prediction: [N, P] class the tail predicts at each point.
        frame_bytes: [N, P] bytes of the sample's one-sample frame at each point (header
            included; HTTP overhead not).
        info: free-form provenance (bundle name, fingerprint, split, created, ...).
    """

    labels: np.ndarray
    exit_names: tuple[str, ...]
    exit_segments: tuple[int, ...]
    segments: int
    confidence: Mapping[str, np.ndarray]
    exit_prediction: np.ndarray
    points: tuple[Point, ...]
    tail_prediction: np.ndarray
    frame_bytes: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # (k, bits) pairs are taken for points
        object.__setattr__(
            self,
            "points",
            tuple(OperatingPoint(*point_key(p)) for p in self.points),
        )
        n, e, p = len(self.labels), len(self.exit_names), len(self.points)
        problems = []
        if self.labels.ndim != 1:
            problems.append(f"labels must be 1-D, got shape {self.labels.shape}")
        if len(self.exit_segments) != e:
            problems.append(f"{len(self.exit_segments)} exit segments for {e} exits")
        if any(not 0 <= s < self.segments for s in self.exit_segments):
            problems.append(f"exit segments {self.exit_segments} outside 0..{self.segments - 1}")
        if list(self.exit_segments) != sorted(self.exit_segments):
            problems.append("exits must be listed in the order the head reaches them")
        for name, arr, shape in (
            ("exit_prediction", self.exit_prediction, (n, e)),
            ("tail_prediction", self.tail_prediction, (n, p)),
            ("frame_bytes", self.frame_bytes, (n, p)),
            *((f"confidence[{m!r}]", c, (n, e)) for m, c in self.confidence.items()),
        ):
            if arr.shape != shape:
                problems.append(f"{name} has shape {arr.shape}, expected {shape}")
        unknown = sorted(set(self.confidence) - set(CONFIDENCE_MEASURES))
        if unknown or not self.confidence:
            problems.append(
                f"confidence measures must be a non-empty subset of "
                f"{CONFIDENCE_MEASURES}, got {sorted(self.confidence)}"
            )
        if not self.points:
            problems.append("a table needs at least one operating point")
        if problems:
            raise CalibrationError("invalid calibration table: " + "; ".join(problems))

    # ------------------------------------------------------------------------- access

    @property
    def n(self) -> int:
        """Number of samples."""
        return len(self.labels)

    @property
    def measures(self) -> tuple[str, ...]:
        return tuple(m for m in CONFIDENCE_MEASURES if m in self.confidence)

    @property
    def exit_correct(self) -> np.ndarray:
        """[N, E] bool: each exit's prediction is right."""
        correct: np.ndarray = self.exit_prediction == self.labels[:, None]
        return correct

    @property
    def tail_correct(self) -> np.ndarray:
        """[N, P] bool: the tail's prediction at each operating point is right."""
        correct: np.ndarray = self.tail_prediction == self.labels[:, None]
        return correct

    @property
    def widest_point(self) -> Point:
        """The operating point with the most channels, then the most bits."""
        return max(self.points, key=lambda p: p.key)

    def point_index(self, point: Sequence[int] | Point | None = None) -> int:
        """Column of `point` (a point, or (k, bits); default the widest) in the per-point
        arrays."""
        key = point_key(self.widest_point if point is None else point)
        for i, p in enumerate(self.points):
            if p.key == key:
                return i
        raise CalibrationError(
            f"operating point (k={key[0]}, bits={key[1]}) is not in the table; recorded "
            f"points: {', '.join(f'{p.channels},{p.bits}' for p in self.points)}"
        )

    def scores(self, measure: str) -> np.ndarray:
        """[N, E] confidences under `measure`."""
        if measure not in self.confidence:
            raise CalibrationError(
                f"measure {measure!r} is not in the table; it holds {list(self.measures)}"
            )
        return self.confidence[measure]

    def tail_accuracy(self, point: Sequence[int] | Point | None = None) -> float:
        """Accuracy of sending every sample to the tail at `point` (default the widest)."""
        return float(self.tail_correct[:, self.point_index(point)].mean()) if self.n else 0.0

    def exit_accuracy(self) -> dict[str, float]:
        """Accuracy of every exit on all samples (as if it answered everything)."""
        acc = self.exit_correct.mean(axis=0) if self.n else np.zeros(len(self.exit_names))
        return {name: float(a) for name, a in zip(self.exit_names, acc, strict=True)}

    def subset(self, index: np.ndarray | Sequence[int]) -> CalibrationTable:
        """The table restricted to the samples `index` (a mask or indices)."""
        idx = np.asarray(index)
        return CalibrationTable(
            labels=self.labels[idx],
            exit_names=self.exit_names,
            exit_segments=self.exit_segments,
            segments=self.segments,
            confidence={m: c[idx] for m, c in self.confidence.items()},
            exit_prediction=self.exit_prediction[idx],
            points=self.points,
            tail_prediction=self.tail_prediction[idx],
            frame_bytes=self.frame_bytes[idx],
            info=dict(self.info),
        )

    # ---------------------------------------------------------------------------- I/O

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a compressed `.npz` (plain arrays + a JSON header); returns the path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        header = {
            "format": TABLE_FORMAT,
            "format_version": TABLE_VERSION,
            "exit_names": list(self.exit_names),
            "exit_segments": list(self.exit_segments),
            "segments": self.segments,
            "points": [list(p.key) for p in self.points],
            "measures": list(self.measures),
            "info": self.info,
        }
        arrays: dict[str, np.ndarray] = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "labels": _compact(self.labels),
            "exit_prediction": _compact(self.exit_prediction),
            "tail_prediction": _compact(self.tail_prediction),
            "frame_bytes": _compact(self.frame_bytes),
            **{f"confidence_{m}": c.astype(np.float32) for m, c in self.confidence.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]  # numpy's stub: **kwds
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CalibrationTable:
        """Read a table written by `save`; raises CalibrationError if it is not one."""
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(
                f"no calibration table at {path}; record one with `splitexit calibrate BUNDLE "
                "--save-tables DIR` or CalibrationTable.save"
            )
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(z["header"].tobytes().decode())
                if header.get("format") != TABLE_FORMAT:
                    raise CalibrationError(f"{path} is not a splitexit calibration table")
                if header.get("format_version") != TABLE_VERSION:
                    raise CalibrationError(
                        f"{path} has table format version {header.get('format_version')}; this "
                        f"splitexit reads version {TABLE_VERSION}: re-record it"
                    )
                return cls(
                    labels=z["labels"].astype(np.int64),
                    exit_names=tuple(header["exit_names"]),
                    exit_segments=tuple(int(s) for s in header["exit_segments"]),
                    segments=int(header["segments"]),
                    confidence={m: z[f"confidence_{m}"] for m in header["measures"]},
                    exit_prediction=z["exit_prediction"].astype(np.int64),
                    points=tuple(OperatingPoint(int(k), int(b)) for k, b in header["points"]),
                    tail_prediction=z["tail_prediction"].astype(np.int64),
                    frame_bytes=z["frame_bytes"].astype(np.int64),
                    info=dict(header.get("info") or {}),
                )
        except CalibrationError:
            raise
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as e:
            raise CalibrationError(f"cannot read calibration table {path}: {e}") from e


def point_key(point: Sequence[int] | Point) -> tuple[int, int]:
    """(channels, bits) of an operating point or of a (k, bits) pair."""
    if isinstance(point, OperatingPoint):
        return point.key
    return int(point[0]), int(point[1])


def _compact(a: np.ndarray) -> np.ndarray:
    """Integers in the smallest unsigned/signed dtype that holds them."""
    a = np.asarray(a)
    if a.size == 0:
        return a.astype(np.int32)
    lo, hi = int(a.min()), int(a.max())
    for dtype in (np.uint8, np.int16, np.uint16, np.int32, np.uint32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return a.astype(dtype)
    return a.astype(np.int64)
