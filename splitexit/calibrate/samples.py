"""How much calibration data each exit's figures rest on, and how much the goal's margin needs.

    chosen thresholds ─ per exit: reached, answered, correct ─ Clopper-Pearson lower bound
        ─ width (accuracy - bound) vs margin ─ samples_needed(accuracy, margin) ─ warning

An exit's accuracy on the samples it answers is estimated from those samples alone; with a
few of them its lower bound sits far below it (conservative mode then turns the exit off).
The margin is the room the goal leaves below the tail: its `max_drop` (or the tail's
accuracy minus an absolute floor). `needed` is the number of answered samples at which the
bound, at the observed accuracy, is within that margin; an exit that answers none is judged
at 100% accuracy, the fewest any exit can need. Images to add scale `needed` by the share
of the calibration split the exit answers (or, answering none, reaches).

An exit with too few samples is warned about when that costs something: it answers none
although fewer than `needed` reach it, or its bound lowers the pessimistic overall accuracy
(its share of the split times the bound's width) by at least `NOTABLE` of the margin. An
exit answering a sliver of a large split barely moves the total, however wide its bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .bounds import clopper_pearson_lower, samples_needed

NOTABLE = 0.1  # of the margin: a bound costing less than this is not warned about


@dataclass(frozen=True)
class ExitSamples:
    """One exit's calibration samples at the chosen thresholds.

    `total` samples in the split, `reached` not taken by an earlier exit, `answered` taken
    by this one, `correct` of those right. `lower_bound` is the Clopper-Pearson bound on the
    answered accuracy at `confidence` (the per-exit level of conservative mode); `margin`
    the goal's room (a fraction; None: the goal has no accuracy floor).
    """

    total: int
    reached: int
    answered: int
    correct: int
    confidence: float
    margin: float | None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answered if self.answered else None

    @property
    def lower_bound(self) -> float | None:
        if not self.answered:
            return None
        return clopper_pearson_lower(self.correct, self.answered, self.confidence)

    @property
    def width(self) -> float | None:
        """Accuracy minus its lower bound (a fraction; None: answers nothing)."""
        acc, low = self.accuracy, self.lower_bound
        return None if acc is None or low is None else acc - low

    @cached_property
    def needed(self) -> int | None:
        """Answered samples at which the bound is within the margin (None: no margin)."""
        if self.margin is None:
            return None
        acc = 1.0 if self.accuracy is None else self.accuracy
        return samples_needed(acc, self.margin, self.confidence)

    @property
    def too_few(self) -> bool:
        """Would more labelled images tighten what this exit is judged by?"""
        needed = self.needed
        if needed is None:
            return False
        return self.answered < needed if self.answered else 0 < self.reached < needed

    @property
    def bound_cost(self) -> float | None:
        """How far the bound lowers the overall accuracy: share answered x width."""
        width = self.width
        return None if width is None else width * self.answered / self.total

    @property
    def worth_more_data(self) -> bool:
        """Too few samples, and that costs the selection something (see the module)."""
        if not self.too_few:
            return False
        cost = self.bound_cost
        return cost is None or cost >= NOTABLE * (self.margin or 0.0)

    @property
    def more_images(self) -> int | None:
        """Labelled calibration images to add for `needed` (0: enough; None: cannot say)."""
        needed = self.needed
        seen = self.answered or self.reached
        if needed is None or not seen:
            return None
        return max(-(-needed * self.total // seen) - self.total, 0)

    def to_dict(self) -> dict[str, Any]:
        def points(x: float | None) -> float | None:
            return None if x is None else round(100 * x, 4)

        return {
            "total": self.total,
            "reached": self.reached,
            "answered": self.answered,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "lower_bound": self.lower_bound,
            "confidence": self.confidence,
            "width_points": points(self.width),
            "bound_cost_points": points(self.bound_cost),
            "margin_points": points(self.margin),
            "needed": self.needed,
            "too_few": self.too_few,
            "worth_more_data": self.worth_more_data,
            "more_images": self.more_images,
        }


def exit_samples(
    names: tuple[str, ...],
    counts: list[int],
    correct: list[int],
    confidence: float,
    margin: float | None,
) -> dict[str, ExitSamples]:
    """Per exit, from the answered counts of every exit and then the tail (`counts`)."""
    total = reached = sum(counts)
    out = {}
    for name, n, k in zip(names, counts[: len(names)], correct[: len(names)], strict=True):
        out[name] = ExitSamples(total, reached, n, k, confidence, margin)
        reached -= n
    return out


def warnings(samples: dict[str, ExitSamples]) -> list[str]:
    """One line per exit whose calibration samples are too few for the margin, where that
    costs the selection something (`ExitSamples.worth_more_data`)."""
    lines = []
    for name, s in samples.items():
        if not s.worth_more_data:
            continue
        margin = f"a {100 * (s.margin or 0):g}-point margin"
        level = f"{100 * s.confidence:g}%-confidence"
        if s.answered:
            seen = (
                f"exit {name!r} answered {s.answered} of {s.total} calibration samples: its "
                f"{level} lower bound is {100 * (s.width or 0):.1f} points below its accuracy;"
                f" {margin} needs {s.needed} answered, about"
            )
        else:
            seen = (
                f"exit {name!r} answered none of {s.total} calibration samples ({s.reached} "
                f"reached it): {margin} at {level} needs at least {s.needed} answered, at least"
            )
        lines.append(
            f"splitexit: warning: {seen} {s.more_images} more labelled calibration images "
            "would help"
        )
    return lines
