"""What thresholds must achieve: an accuracy floor, an offload budget, or least latency.

Goal.accuracy(X)              overall accuracy >= the tail's - X points; offload least
Goal.offload(rate)            offload <= rate; be as accurate as possible
Goal.latency(cost)            least expected latency (`splitexit.cost.CostModel`), with an
                              accuracy floor
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from splitexit.cost import CostModel

from .table import CalibrationError

GOALS = ("accuracy", "offload", "latency")
TOLERANCE = 1e-12


@dataclass(frozen=True)
class Goal:
    """What the thresholds must achieve. Build with `Goal.accuracy`, `.offload`, `.latency`.

    Accuracy floors are either `max_drop` points below the tail's accuracy (at the reference
    operating point) or an absolute `min_accuracy` in [0, 1]; `min_accuracy` wins if both.
    """

    kind: str = "accuracy"
    max_drop: float | None = 1.0
    min_accuracy: float | None = None
    offload_rate: float | None = None
    cost: CostModel | None = None

    def __post_init__(self) -> None:
        if self.kind not in GOALS:
            raise CalibrationError(f"unknown goal {self.kind!r}; choose one of {GOALS}")
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise CalibrationError(f"min_accuracy is a fraction in [0, 1], got {self.min_accuracy}")
        if self.max_drop is not None and not 0.0 <= self.max_drop <= 100.0:
            raise CalibrationError(f"max_drop is in accuracy points (0..100), got {self.max_drop}")
        if self.kind in ("accuracy", "latency") and not self.has_floor:
            raise CalibrationError(f"the {self.kind} goal needs max_drop or min_accuracy")
        if self.kind == "offload" and (
            self.offload_rate is None or not 0.0 <= self.offload_rate <= 1.0
        ):
            raise CalibrationError(
                f"the offload goal needs offload_rate in [0, 1], got {self.offload_rate}"
            )
        if self.kind == "latency" and self.cost is None:
            raise CalibrationError(
                "the latency goal needs a cost model (the link, and the device's and server's "
                "compute); measure the compute with splitexit.calibrate.measure_compute"
            )

    @classmethod
    def accuracy(cls, max_drop: float = 1.0, *, min_accuracy: float | None = None) -> Goal:
        """(a) overall accuracy at most `max_drop` points below the tail's."""
        return cls("accuracy", max_drop=max_drop, min_accuracy=min_accuracy)

    @classmethod
    def offload(
        cls, rate: float, *, max_drop: float | None = None, min_accuracy: float | None = None
    ) -> Goal:
        """(b) offload at most `rate` of the inputs, as accurately as possible."""
        return cls("offload", max_drop=max_drop, min_accuracy=min_accuracy, offload_rate=rate)

    @classmethod
    def latency(
        cls,
        cost: CostModel,
        *,
        max_drop: float | None = 1.0,
        min_accuracy: float | None = None,
    ) -> Goal:
        """(c) minimum expected latency, accuracy at most `max_drop` points below the tail's."""
        return cls("latency", max_drop=max_drop, min_accuracy=min_accuracy, cost=cost)

    @property
    def has_floor(self) -> bool:
        return self.min_accuracy is not None or self.max_drop is not None

    def floor(self, tail_accuracy: float) -> float | None:
        """The accuracy floor given the tail's accuracy (None: no floor)."""
        if self.min_accuracy is not None:
            return self.min_accuracy
        if self.max_drop is not None:
            return tail_accuracy - self.max_drop / 100.0
        return None

    def describe(self) -> str:
        floor = (
            f"accuracy >= {100 * self.min_accuracy:.2f}%"
            if self.min_accuracy is not None
            else f"accuracy at most {self.max_drop:g} points below the tail's"
            if self.max_drop is not None
            else ""
        )
        if self.kind == "accuracy":
            return f"{floor}, offloading as little as possible"
        if self.kind == "offload":
            extra = f", {floor}" if floor else ""
            rate = 100 * (self.offload_rate or 0.0)
            return f"offload at most {rate:.1f}% of inputs{extra}, as accurately as possible"
        assert self.cost is not None
        link = self.cost.link
        return (
            f"minimum expected latency at {link.rate_mbps:g} Mbit/s, RTT "
            f"{link.rtt_s * 1e3:g} ms, with {floor}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "max_drop": self.max_drop,
            "min_accuracy": self.min_accuracy,
            "offload_rate": self.offload_rate,
            "cost": None if self.cost is None else asdict(self.cost),
        }
