"""The out-of-sample check: replay chosen thresholds on a held-out table, compare with the goal.

Selection (from the calibration split) ─ replay on the test table ─► PromiseCheck
    accuracy floor: target re-anchored on the held-out tail when given as X points
    offload budget: the same rate
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .goals import TOLERANCE, Goal
from .replay import Outcome, Replay
from .table import CalibrationError, CalibrationTable
from .thresholds import Selection, select_thresholds


@dataclass(frozen=True)
class Promise:
    """One promised quantity checked on held-out data; `gap` > 0 means kept with room."""

    quantity: str  # "accuracy" or "offload_rate"
    target: float
    achieved: float
    gap: float

    @property
    def kept(self) -> bool:
        return self.gap >= -TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "kept": self.kept}


@dataclass(frozen=True)
class PromiseCheck:
    """A selection replayed on a held-out table: what was promised and what happened."""

    selection: Selection
    test: Outcome
    promises: tuple[Promise, ...]

    @property
    def kept(self) -> bool:
        return all(p.kept for p in self.promises)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kept": self.kept,
            "promises": [p.to_dict() for p in self.promises],
            "test": self.test.to_dict(),
        }


def check_promise(selection: Selection, test: CalibrationTable) -> PromiseCheck:
    """Replay a selection on a held-out table and compare the goal's targets with it.

    An accuracy floor given as `max_drop` is re-anchored on the held-out tail's accuracy
    (the promise is "X points below the tail"); an absolute one is used as is.
    """
    if tuple(selection.thresholds) != test.exit_names:
        raise CalibrationError(
            f"the held-out table has exits {list(test.exit_names)}, the selection "
            f"{list(selection.thresholds)}: record both tables from the same bundle"
        )
    goal = selection.goal
    replay = Replay(test, selection.measure, selection.point, goal.cost)
    outcome = replay.outcome([selection.thresholds[n] for n in test.exit_names])
    promises = []
    floor = goal.floor(test.tail_accuracy(selection.reference_point))
    if floor is not None:
        promises.append(Promise("accuracy", floor, outcome.accuracy, outcome.accuracy - floor))
    if goal.kind == "offload":
        rate = float(goal.offload_rate)  # type: ignore[arg-type]
        promises.append(
            Promise("offload_rate", rate, outcome.offload_rate, rate - outcome.offload_rate)
        )
    return PromiseCheck(selection, outcome, tuple(promises))


def promise_sweep(
    calibration: CalibrationTable,
    test: CalibrationTable,
    *,
    max_drops: Iterable[float] = (0.5, 1.0, 2.0),
    modes: Iterable[bool] = (False, True),
    **kwargs: Any,
) -> list[PromiseCheck]:
    """Accuracy goals at several X, plain and conservative, each checked on `test`."""
    modes = tuple(modes)
    return [
        check_promise(
            select_thresholds(calibration, Goal.accuracy(x), conservative=c, **kwargs), test
        )
        for x in max_drops
        for c in modes
    ]
