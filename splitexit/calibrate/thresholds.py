"""Choose exit thresholds for a goal on a calibration table.

Goals (`Goal`):
    accuracy   overall accuracy at most X points below the tail's (default X = 1.0);
               among the thresholds that keep it, offload as little as possible
    offload    offload at most a given fraction of inputs; among those, be as accurate as
               possible (optionally with an accuracy floor as well)
    latency    minimum expected latency under a link and head/tail timings, with an accuracy
               floor (X points below the tail, or an absolute one); it also picks the
               operating point unless one is given

Search (per confidence measure, per operating point):
    candidates   for each exit, quantiles of its observed confidences (+ "never")
    greedy path  start with every exit off (all offloaded); repeatedly lower the one exit
                 threshold that buys the most cost (offload rate, or latency) per point of
                 accuracy lost, until every exit takes everything
    pick         the best state on that path that meets the goal
    polish       coordinate descent: change one exit's threshold at a time to any candidate
                 while that improves the objective and keeps the goal; repeat until stable

Conservative mode takes, for every exit, a one-sided Clopper-Pearson lower bound on the
accuracy of the samples it accepts (at `confidence`, Bonferroni-split over the exits so the
bounds hold together), and requires the overall accuracy computed with every exit at its
bound to stay at or above the floor:

    sum_e n_e * lower_e + (tail hits on the offloaded samples)  >=  floor * N

The tail's own accuracy is not bounded: the floor is relative to it, and it answers the same
samples either way. For the offload goal the upper bound on the offload rate must stay at or
below the target. The thresholds are still chosen on the calibration data, so this is a
margin against small accepted sets and sampling noise rather than a formal guarantee for the
selected thresholds: check them on held-out data with `check_promise`. A floor given as
points below the tail is re-anchored there on the held-out tail's accuracy, so the held-out
split's own sampling noise counts too: with a few hundred samples it is a couple of points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitexit.exits import CONFIDENCE_MEASURES

from .bounds import clopper_pearson_lower, clopper_pearson_upper
from .goals import TOLERANCE, Goal
from .replay import NEVER, Outcome, Replay
from .samples import ExitSamples, exit_samples
from .table import CalibrationError, CalibrationTable, Point


@dataclass(frozen=True)
class Selection:
    """Chosen thresholds and what they give on the calibration table.

    `floor` is the accuracy floor the goal implies on this table (None: none); `feasible`
    says whether the goal was met (if not, `outcome` is the closest the search found).
    `exit_bounds` holds the Clopper-Pearson lower bound on each exit's accepted accuracy and
    (each at the Bonferroni level `confidence` / number of exits) and `pessimistic_accuracy`
    the overall accuracy with every exit at its bound (what conservative mode holds to the
    floor); `offload_bound` is the upper bound on the offload rate. `exit_samples` says, per
    exit, how many calibration samples those figures rest on and how many the goal's margin
    needs (`samples.py`).
    """

    goal: Goal
    outcome: Outcome
    reference_point: Point
    reference_accuracy: float
    floor: float | None
    feasible: bool
    conservative: bool
    confidence: float
    exit_bounds: dict[str, float | None]
    pessimistic_accuracy: float
    offload_bound: float
    search: dict[str, Any] = field(default_factory=dict)
    exit_samples: dict[str, ExitSamples] = field(default_factory=dict)

    @property
    def thresholds(self) -> dict[str, float]:
        return self.outcome.thresholds

    @property
    def measure(self) -> str:
        return self.outcome.measure

    @property
    def point(self) -> Point:
        return self.outcome.point

    def to_dict(self) -> dict[str, Any]:
        return {
            "goal": self.goal.to_dict(),
            "thresholds": self.thresholds,
            "measure": self.measure,
            "point": {"channels": self.point.channels, "bits": self.point.bits},
            "reference_point": {
                "channels": self.reference_point.channels,
                "bits": self.reference_point.bits,
            },
            "reference_accuracy": self.reference_accuracy,
            "floor": self.floor,
            "feasible": self.feasible,
            "conservative": self.conservative,
            "confidence": self.confidence,
            "exit_bounds": self.exit_bounds,
            "pessimistic_accuracy": self.pessimistic_accuracy,
            "offload_bound": self.offload_bound,
            "exit_samples": {name: s.to_dict() for name, s in self.exit_samples.items()},
            "calibration": self.outcome.to_dict(),
            "search": self.search,
        }


# --------------------------------------------------------------------------------- search


class _Problem:
    """One (measure, point) search: objective, feasibility and violation of a state."""

    def __init__(
        self,
        replay: Replay,
        goal: Goal,
        floor: float | None,
        conservative: bool,
        confidence: float,
    ) -> None:
        self.replay, self.goal, self.floor = replay, goal, floor
        self.conservative, self.confidence = conservative, confidence
        self.cache: dict[tuple[float, ...], dict[str, Any]] = {}

    def evaluate(self, thr: np.ndarray) -> dict[str, Any]:
        key = tuple(thr.tolist())
        s = self.cache.get(key)
        if s is None:
            s = self.replay.stats(thr)
            s["violation"] = self._violation(s)
            s["feasible"] = s["violation"] <= TOLERANCE
            s["objective"] = self._objective(s)
            s["thr"] = thr.copy()
            del s["first"]
            self.cache[key] = s
        return s

    def cost(self, s: dict[str, Any]) -> float:
        """What the greedy path trades accuracy for."""
        return float(s["latency"] if self.goal.kind == "latency" else s["offload"])

    def _objective(self, s: dict[str, Any]) -> tuple[float, float]:
        if self.goal.kind == "accuracy":
            return (s["offload"], -s["accuracy"])
        if self.goal.kind == "offload":
            return (-s["accuracy"], s["offload"])
        return (s["latency"], -s["accuracy"])

    def _violation(self, s: dict[str, Any]) -> float:
        v = 0.0
        n = self.replay.n
        if self.floor is not None:
            v += max(0.0, self.floor - s["accuracy"])
            if self.conservative:
                v += max(0.0, self.floor - self.pessimistic_accuracy(s))
        if self.goal.kind == "offload":
            rate = self.goal.offload_rate
            assert rate is not None
            v += max(0.0, s["offload"] - rate)
            if self.conservative:
                offloaded = int(s["counts"][-1])
                v += max(0.0, clopper_pearson_upper(offloaded, n, self.confidence) - rate)
        return v

    @property
    def exit_confidence(self) -> float:
        """Per-exit confidence level: Bonferroni, so all exits' bounds hold together."""
        return float(1.0 - (1.0 - self.confidence) / max(self.replay.e, 1))

    def bounds(self, s: dict[str, Any]) -> list[float | None]:
        """Clopper-Pearson lower bound on each exit's accepted accuracy (None: accepts none)."""
        return [
            clopper_pearson_lower(round(float(s["hits"][i])), c, self.exit_confidence)
            if (c := int(s["counts"][i]))
            else None
            for i in range(self.replay.e)
        ]

    def pessimistic_accuracy(self, s: dict[str, Any]) -> float:
        """Overall accuracy with every exit's accepted accuracy at its lower bound."""
        counts = s["counts"]
        exits = sum(b * int(counts[i]) for i, b in enumerate(self.bounds(s)) if b is not None)
        return float((exits + float(s["hits"][-1])) / max(self.replay.n, 1))


def _candidates(scores: np.ndarray, k: int) -> np.ndarray:
    """Thresholds to try for one exit, descending, starting with NEVER (exit off)."""
    if scores.size == 0:
        return np.array([NEVER])
    q = np.quantile(scores.astype(np.float64), np.linspace(0.0, 1.0, k), method="lower")
    return np.concatenate([[NEVER], np.unique(q)[::-1]])


def _better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    """Is state a preferable to b (feasible first, then objective, else less violation)?"""
    if b is None:
        return True
    if a["feasible"] != b["feasible"]:
        return bool(a["feasible"])
    if a["feasible"]:
        return bool(a["objective"] < b["objective"])
    return bool((a["violation"], a["objective"]) < (b["violation"], b["objective"]))


def _search(problem: _Problem, k: int) -> dict[str, Any]:
    replay = problem.replay
    cands = [_candidates(replay.conf[:, i], k) for i in range(replay.e)]
    pos = [0] * replay.e
    thr = np.array([c[0] for c in cands], dtype=np.float64)
    state = problem.evaluate(thr)
    best = state
    # greedy path: the move with the most cost saved per accuracy lost
    while True:
        moves = []
        for i in range(replay.e):
            if pos[i] + 1 < len(cands[i]):
                t = thr.copy()
                t[i] = cands[i][pos[i] + 1]
                s = problem.evaluate(t)
                gain = problem.cost(state) - problem.cost(s)
                loss = max(state["accuracy"] - s["accuracy"], 0.0)
                moves.append(((gain + 1e-9) / (loss + 1e-9), -i, i, s))
        if not moves:
            break
        *_, i, state = max(moves, key=lambda m: m[:2])
        pos[i] += 1
        thr = state["thr"]
        if _better(state, best):
            best = state
    # polish: coordinate descent from the best state on the path
    for _ in range(50):
        improved = False
        for i in range(replay.e):
            for c in cands[i]:
                t = best["thr"].copy()
                t[i] = c
                s = problem.evaluate(t)
                if _better(s, best):
                    best, improved = s, True
        if not improved:
            break
    return best


def select_thresholds(
    table: CalibrationTable,
    goal: Goal,
    *,
    measure: str = "max_prob",
    point: Sequence[int] | None = None,
    conservative: bool = False,
    confidence: float = 0.95,
    candidates: int = 100,
) -> Selection:
    """Choose exit thresholds on a calibration table for `goal` (see the module docstring).

    Args:
        measure: a confidence measure, or "auto" to try every measure in the table and keep
            the one that serves the goal best (the bundle stores one measure for all exits).
        point: operating point (k, bits) offloaded samples are sent at. Default the widest,
            except for the latency goal, which then tries every recorded point. The accuracy
            floor is relative to the tail at this point (the widest when searching).
        conservative: add the Clopper-Pearson conditions at `confidence`.
        candidates: quantile levels per exit (more: finer thresholds, slower search).
    """
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    if candidates < 2:
        raise CalibrationError(f"candidates must be >= 2, got {candidates}")
    if table.n == 0:
        raise CalibrationError("the calibration table is empty; record it on some samples")
    measures = _measures(table, measure)
    if point is not None:
        points: list[Point] = [table.points[table.point_index(point)]]
    elif goal.kind == "latency":
        points = list(table.points)
    else:
        points = [table.widest_point]
    reference = points[0] if len(points) == 1 else table.widest_point
    reference_accuracy = table.tail_accuracy(reference)
    floor = goal.floor(reference_accuracy)

    best: dict[str, Any] | None = None
    best_problem: _Problem | None = None
    evaluations = 0
    for m in measures:
        for p in points:
            replay = Replay(table, m, p, goal.cost)
            problem = _Problem(replay, goal, floor, conservative, confidence)
            s = _search(problem, candidates)
            evaluations += len(problem.cache)
            if _better(s, best):
                best, best_problem = s, problem
    assert best is not None and best_problem is not None
    outcome = best_problem.replay.outcome(best["thr"])
    names = table.exit_names
    return Selection(
        goal=goal,
        outcome=outcome,
        reference_point=reference,
        reference_accuracy=reference_accuracy,
        floor=floor,
        feasible=bool(best["feasible"]),
        conservative=conservative,
        confidence=confidence,
        exit_bounds=dict(zip(names, best_problem.bounds(best), strict=True)),
        pessimistic_accuracy=best_problem.pessimistic_accuracy(best),
        offload_bound=clopper_pearson_upper(int(best["counts"][-1]), table.n, confidence),
        search={
            "method": "quantile candidates, greedy cost-per-accuracy path, coordinate polish",
            "candidates": candidates,
            "measures": list(measures),
            "points": [list(p.key) for p in points],
            "evaluations": evaluations,
        },
        exit_samples=exit_samples(
            names,
            [int(c) for c in best["counts"]],
            [round(float(h)) for h in best["hits"]],
            best_problem.exit_confidence,
            _margin(goal, reference_accuracy, floor),
        ),
    )


def _margin(goal: Goal, reference_accuracy: float, floor: float | None) -> float | None:
    """The room the goal leaves below the tail: max_drop, or the tail minus an absolute floor."""
    if goal.min_accuracy is None and goal.max_drop is not None:
        return goal.max_drop / 100.0
    if floor is None or floor >= reference_accuracy:
        return None
    return reference_accuracy - floor


def _measures(table: CalibrationTable, measure: str) -> tuple[str, ...]:
    if measure == "auto":
        return table.measures
    if measure not in CONFIDENCE_MEASURES:
        raise CalibrationError(
            f"unknown measure {measure!r}; choose one of {CONFIDENCE_MEASURES} or 'auto'"
        )
    table.scores(measure)  # raises if the table lacks it
    return (measure,)
