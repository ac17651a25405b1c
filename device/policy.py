"""What to do with each input: send the image, run the head, and at the bottleneck offload at
which (k, bits), finish the tail here, or answer with the best exit now.

Pure functions of numbers: no I/O, no clocks, no torch. The agent measures (`estimator`),
`splitexit.cost.CostModel` prices every action, this decides.

    before the head ── start(...) ─┬─ "image": send the image to the server's whole model
                                   └─ "head": run it ─ exit confident? ─ yes ─► "exit"
                                          no ─ at_bottleneck(...) ─┬─ "offload" (k, bits)
                                                                   ├─ "tail" (here)
                                                                   └─ "local" (best exit)

Rules (one model, many operating points, one cost model):

* `FixedRule`: always run the head and offload at the configured point.
* `AdaptiveRule`, among the actions available at the bottleneck (each offload point, and the
  tail here when the device has it): the expected-fastest that meets the accuracy floor; with
  a deadline and nothing meeting the floor in time, the most accurate in time; nothing in
  time: answer with the best exit now ("local"; without exits, the fastest). With neither a
  floor nor a deadline: the most accurate (ties to the faster).
* Before the head, the adaptive rule sends the image when that is expected sooner than the
  head and what follows it (exits taken at their observed rates, the bottleneck's choice for
  the rest), meets the floor, and fits the deadline. Running the head, it runs only the
  exits that pay for themselves (`exit_plan`): an exit costs its compute on every input that
  reaches it and saves what follows on those that leave there.

Accuracies: an offload point's is the manifest's; the tail here runs the float code (the
bundle's float accuracy, else its best point's); the server answers an image at its most
accurate point. Where some accuracy is unknown, actions rank by the information they carry
(channels x bits; the tail here as the best point) and a floor cannot be checked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from splitexit.bundle.manifest import OperatingPoint
from splitexit.cost import CostModel

Action = Literal["image", "head", "exit", "offload", "tail", "local"]


@dataclass(frozen=True)
class FixedRule:
    """Always offload at (channels, bits)."""

    channels: int
    bits: int


@dataclass(frozen=True)
class AdaptiveRule:
    """Choose per input; see the module docstring.

    `deadline_s` is the time left for this input (None: no deadline); `local_ok` says a
    local answer exists (the bundle has exits), so "answer locally now" is possible.
    """

    accuracy_floor: float | None = None
    deadline_s: float | None = None
    local_ok: bool = True


@dataclass(frozen=True)
class Decision:
    """The action, its point (offload only), expected seconds from now, and why."""

    action: Action
    point: OperatingPoint | None
    expected_s: float | None
    reason: str
    image_format: str | None = None  # "image": the format to send it in
    exits: tuple[bool, ...] | None = None  # "head": which exits to run (None: all)


@dataclass(frozen=True)
class Choices:
    """What the agent can choose among: the bundle's points (frame sizes as measured), the
    tail here or not, and the accuracies of the whole-precision answers (None: unknown)."""

    points: Sequence[OperatingPoint]
    tail_here: bool = False
    tail_accuracy: float | None = None

    @property
    def best_accuracy(self) -> float | None:
        """The most accurate point's accuracy (what the server answers an image with)."""
        acc = [p.accuracy for p in self.points if p.accuracy is not None]
        return max(acc) if len(acc) == len(self.points) and acc else None


class _Option(NamedTuple):
    action: Action
    point: OperatingPoint | None
    expected_s: float
    accuracy: float | None
    proxy: float  # information carried (channels x bits)


def at_bottleneck(choices: Choices, cost: CostModel, rule: FixedRule | AdaptiveRule) -> Decision:
    """The decision for an input no exit answered. `choices.points` must not be empty."""
    points = choices.points
    if not points:
        raise ValueError("no operating points to choose from; the bundle lists none")
    if isinstance(rule, FixedRule):
        p = find_point(points, rule.channels, rule.bits)
        return Decision("offload", p, _offload_s(p, cost), "fixed")
    fixed_s = cost.device.encode_s + cost.server.tail_s  # the rest: the frame's transfer
    transfer = cost.link.transfer_s
    options = [
        _Option(
            "offload", p, fixed_s + transfer(p.frame_bytes or 0.0), p.accuracy, p.channels * p.bits
        )
        for p in points
    ]
    if choices.tail_here:  # as informative as the best point: equally accurate, the faster
        acc = choices.tail_accuracy if choices.tail_accuracy is not None else choices.best_accuracy
        proxy = max(o.proxy for o in options)
        options.append(_Option("tail", None, cost.tail_here_s(), acc, proxy))
    return _choose(options, rule)


def start(
    choices: Choices,
    cost: CostModel,
    rule: FixedRule | AdaptiveRule,
    leave: Sequence[float],
    images: Mapping[str, tuple[float, float]],
) -> Decision:
    """Before the head: "image" (send it, in the fastest format) or "head" (run it), with
    the expected seconds.

    `leave[e]` is the chance an input leaves at exit e; `images` the formats the image may
    go in, each with its expected (seconds to encode, bytes) (empty: send no image).
    """
    after = at_bottleneck(choices, cost, rule)
    after_s = after.expected_s if after.expected_s is not None else 0.0
    plan = None  # all exits: the fixed rule, or a deadline that wants the best exit now
    if not isinstance(rule, FixedRule) and after.action != "local":
        plan = exit_plan(cost, leave, after_s)
    head_s = cost.head_path_s(leave, after_s, plan)
    why = f"head, then {after.action} ({after.reason})"
    head = Decision("head", None, head_s, why, exits=plan)
    if isinstance(rule, FixedRule) or not images:
        return head
    fmt = min(images, key=lambda f: cost.image_s(images[f][1], images[f][0]))
    image_s = cost.image_s(images[fmt][1], images[fmt][0])
    acc = choices.best_accuracy
    if rule.accuracy_floor is not None and acc is not None and acc < rule.accuracy_floor:
        return head
    if rule.deadline_s is not None and image_s > rule.deadline_s:
        return head
    if image_s < head_s:
        why = f"image/{fmt} {image_s:.4f}s < head {head_s:.4f}s"
        return Decision("image", None, image_s, why, image_format=fmt)
    return head


def exit_plan(cost: CostModel, leave: Sequence[float], after_s: float) -> tuple[bool, ...]:
    """Which exits to run: the expected-fastest head path among running the first j exits
    that inputs leave at (j = 0 .. all; an exit none leave at never runs), `after_s` being
    what an input that reaches the bottleneck pays. Only a prefix is priced: skipping an
    earlier exit would change the later exits' leave rates, which are observed with it."""
    live = [e for e, p in enumerate(leave) if p > 0.0]
    best: tuple[bool, ...] = tuple(False for _ in leave)
    best_s = cost.head_path_s(leave, after_s, best)
    for j in range(1, len(live) + 1):
        on = tuple(e in live[:j] for e in range(len(leave)))
        s = cost.head_path_s(leave, after_s, on)
        if s < best_s:
            best, best_s = on, s
    return best


def _offload_s(p: OperatingPoint, cost: CostModel) -> float:
    return float(cost.offload_s(p.frame_bytes or 0.0))


def _choose(options: list[_Option], rule: AdaptiveRule) -> Decision:
    by_acc = all(o.accuracy is not None for o in options)
    # higher is more accurate: (accuracy, information) or, without accuracies, information
    ranked = [(o, (o.accuracy, o.proxy) if by_acc else (0.0, o.proxy)) for o in options]

    def fastest(pool: list[tuple[_Option, tuple]]) -> _Option:
        return min(pool, key=lambda x: (x[0].expected_s, -x[1][0], -x[1][1]))[0]

    def most_accurate(pool: list[tuple[_Option, tuple]]) -> _Option:
        return max(pool, key=lambda x: (*x[1], -x[0].expected_s))[0]

    def decision(o: _Option, reason: str) -> Decision:
        return Decision(o.action, o.point, o.expected_s, reason)

    floor = rule.accuracy_floor if by_acc else None
    deadline = rule.deadline_s
    if floor is not None:
        meets = [x for x in ranked if x[0].accuracy >= floor]  # type: ignore[operator]
        if meets:
            o = fastest(meets)
            if deadline is None or o.expected_s <= deadline:
                return decision(o, "floor: fastest meeting it")
    if deadline is not None:
        in_time = [x for x in ranked if x[0].expected_s <= deadline]
        if in_time:
            return decision(most_accurate(in_time), "deadline: most accurate in time")
        o = fastest(ranked)
        if rule.local_ok:
            return Decision(
                "local",
                None,
                0.0,
                f"deadline: fastest action {o.expected_s:.3f}s > {deadline:.3f}s left",
            )
        return decision(o, "deadline: none in time, fastest")
    if floor is not None:
        return decision(most_accurate(ranked), "floor: none meets it, most accurate")
    return decision(most_accurate(ranked), "most accurate")


def pareto(points: Sequence[OperatingPoint]) -> list[OperatingPoint]:
    """The points no other beats at once on accuracy, information carried and frame size:
    the only ones the adaptive rule can choose (all of them where an accuracy is unknown)."""
    if any(p.accuracy is None for p in points):
        return list(points)

    def key(p: OperatingPoint) -> tuple[float, float, float]:
        return (p.accuracy, p.channels * p.bits, -(p.frame_bytes or 0.0))  # type: ignore[return-value]

    keys = [key(p) for p in points]
    return [
        p
        for p, k in zip(points, keys, strict=True)
        if not any(o != k and all(a >= b for a, b in zip(o, k, strict=True)) for o in keys)
    ]


def find_point(points: Sequence[OperatingPoint], channels: int, bits: int) -> OperatingPoint:
    """The point (channels, bits); ValueError listing the available ones if absent."""
    for p in points:
        if p.channels == channels and p.bits == bits:
            return p
    have = ", ".join(f"({p.channels}, {p.bits})" for p in points)
    raise ValueError(
        f"(channels={channels}, bits={bits}) is not an operating point of this bundle; "
        f"choose one of {have}"
    )


def best_point(points: Sequence[OperatingPoint]) -> OperatingPoint:
    """The most accurate point (the default for the fixed rule)."""
    known = all(p.accuracy is not None for p in points)
    return max(
        points,
        key=lambda p: (
            *((p.accuracy,) if known else ()),
            p.channels * p.bits,
            -(p.frame_bytes or 0.0),
        ),
    )
