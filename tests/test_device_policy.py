"""The decision logic, on its own: numbers in, a decision out."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitexit.bundle import OperatingPoint as Point
from splitexit.cost import Compute, CostModel, Link
from splitexit_device.policy import (
    AdaptiveRule,
    Choices,
    Decision,
    FixedRule,
    at_bottleneck,
    best_point,
    exit_plan,
    find_point,
    pareto,
    start,
)

# (k, bits) -> (accuracy, frame bytes): more channels or bits, more accurate and bigger
GRID = [
    Point(2, 2, 0.70, 100),
    Point(2, 8, 0.80, 400),
    Point(4, 4, 0.85, 500),
    Point(8, 2, 0.86, 600),
    Point(8, 8, 0.92, 1600),
]
SERVER = Compute(tail_s=0.002)


NOTHING = Compute()


def model(
    rtt_s: float, rate_bps: float, device: Compute = NOTHING, overhead: float = 400
) -> CostModel:
    return CostModel(Link(rate_bps, rtt_s, overhead), device, SERVER, (1,) if device.exit_s else ())


FAST = model(0.005, 100e6)
SLOW = model(0.040, 100e3)


def decide(
    points: list[Point], cost: CostModel, rule: AdaptiveRule | FixedRule, **kw: Any
) -> Decision:
    """The decision at the bottleneck (`kw`: the rest of `Choices`)."""
    return at_bottleneck(Choices(points, **kw), cost, rule)


def chosen(cost: CostModel, rule: AdaptiveRule | FixedRule, points: list[Point] = GRID) -> Point:
    d = decide(points, cost, rule)
    assert d.action == "offload", d
    assert d.point is not None
    return d.point


def test_expected_offload_time_adds_every_cost() -> None:
    cost = CostModel(
        Link(80e3, 0.01, overhead_bytes=500), Compute(encode_s=0.001), Compute(tail_s=0.003)
    )
    # (1500 + 500) bytes * 8 / 80 kbit/s = 0.2 s
    d = decide([Point(8, 8, 0.9, 1500)], cost, FixedRule(8, 8))
    assert d.expected_s == pytest.approx(0.214)


def test_fixed_rule_always_offloads_its_point_whatever_the_link() -> None:
    for costs in (FAST, SLOW):
        assert chosen(costs, FixedRule(2, 8)) == Point(2, 8, 0.80, 400)


def test_fixed_rule_names_the_available_points_when_its_point_is_missing() -> None:
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        decide(GRID, FAST, FixedRule(3, 8))


def test_without_constraints_the_most_accurate_point_is_sent() -> None:
    assert chosen(SLOW, AdaptiveRule()) == Point(8, 8, 0.92, 1600)


def test_deadline_on_a_fast_link_sends_the_most_accurate_point() -> None:
    assert chosen(FAST, AdaptiveRule(deadline_s=0.05)) == Point(8, 8, 0.92, 1600)


def test_deadline_on_a_slow_link_sends_fewer_channels_or_bits() -> None:
    # slow: 8x8 takes 0.042 + 2000 B / 100 kbit/s = 0.202 s; 8x2 0.042 + 0.08 = 0.122 s
    p = chosen(SLOW, AdaptiveRule(deadline_s=0.13))
    assert p == Point(8, 2, 0.86, 600)


def test_deadline_no_offload_can_meet_answers_locally() -> None:
    d = decide(GRID, SLOW, AdaptiveRule(deadline_s=0.05))
    assert d.action == "local"
    assert d.point is None
    assert "deadline" in d.reason


def test_deadline_without_exits_offloads_the_fastest_point_anyway() -> None:
    d = decide(GRID, SLOW, AdaptiveRule(deadline_s=0.05, local_ok=False))
    assert d.action == "offload"
    assert d.point == Point(2, 2, 0.70, 100)


def test_floor_picks_the_fastest_point_that_meets_it() -> None:
    assert chosen(SLOW, AdaptiveRule(accuracy_floor=0.84)) == Point(4, 4, 0.85, 500)


def test_floor_no_point_meets_falls_back_to_the_most_accurate() -> None:
    d = decide(GRID, SLOW, AdaptiveRule(accuracy_floor=0.99))
    assert d.point == Point(8, 8, 0.92, 1600)
    assert "none meets" in d.reason


def test_with_a_floor_and_a_deadline_the_fastest_point_meeting_the_floor_in_time_goes() -> None:
    # in time (<= 0.13 s): 2x2, 2x8, 4x4, 8x2; of those, floor 0.85 leaves 4x4 (the faster)
    assert chosen(SLOW, AdaptiveRule(accuracy_floor=0.85, deadline_s=0.13)) == GRID[2]
    # only 2x2 and 2x8 are in time; neither meets the floor: the most accurate in time
    assert chosen(SLOW, AdaptiveRule(accuracy_floor=0.85, deadline_s=0.11)) == GRID[1]


def test_unknown_accuracies_rank_points_by_the_information_they_carry() -> None:
    points = [Point(p.channels, p.bits, None, p.frame_bytes) for p in GRID]
    assert chosen(FAST, AdaptiveRule(deadline_s=1.0), points).label == "k=8,bits=8"
    # 2x8, 4x4 and 8x2 carry as much (16 bits per position); 2x8 is the fastest
    assert chosen(SLOW, AdaptiveRule(deadline_s=0.13), points).label == "k=2,bits=8"
    # a floor cannot be checked without accuracies: it is ignored
    assert chosen(SLOW, AdaptiveRule(accuracy_floor=0.99), points).label == "k=8,bits=8"


def test_helpers_find_and_rank_points() -> None:
    assert find_point(GRID, 4, 4) == GRID[2]
    assert best_point(GRID) == GRID[-1]
    with pytest.raises(ValueError, match="no operating points"):
        decide([], FAST, AdaptiveRule())


@given(
    bw=st.floats(1e3, 1e10),
    base=st.floats(0, 1),
    deadline=st.floats(1e-3, 2),
    floor=st.one_of(st.none(), st.floats(0, 1)),
)
def test_a_chosen_offload_meets_the_deadline_and_a_slower_link_never_picks_more_bytes(
    bw: float, base: float, deadline: float, floor: float | None
) -> None:
    rule = AdaptiveRule(accuracy_floor=floor, deadline_s=deadline)
    fast = decide(GRID, model(base, bw * 10, overhead=300), rule)
    slow = decide(GRID, model(base, bw, overhead=300), rule)
    for d in (fast, slow):
        if d.action == "offload":
            assert d.expected_s is not None and d.expected_s <= deadline
    if slow.action == "offload":
        assert fast.action == "offload"
        assert fast.point is not None and slow.point is not None
        assert slow.point.frame_bytes <= fast.point.frame_bytes


# ---------------------------------------------------------------- the whole decision space

DEVICE = Compute(segment_s=(0.002, 0.003), exit_s=(0.0005,), encode_s=0.0005, tail_s=0.001)


def test_a_device_tail_faster_than_any_offload_finishes_the_input_here() -> None:
    d = decide(
        GRID,
        model(0.02, 100e6, DEVICE),
        AdaptiveRule(accuracy_floor=0.9),
        tail_here=True,
        tail_accuracy=0.92,
    )
    assert d.action == "tail" and d.point is None
    assert d.expected_s == pytest.approx(0.001)


def test_a_slow_device_tail_loses_to_an_offload_that_meets_the_floor() -> None:
    slow_tail = DEVICE.scaled(100.0)  # 0.1 s of tail here against ~0.03 s of offload
    d = decide(
        GRID,
        model(0.02, 100e6, slow_tail),
        AdaptiveRule(accuracy_floor=0.9),
        tail_here=True,
        tail_accuracy=0.92,
    )
    assert d.action == "offload" and d.point == GRID[-1]


def test_the_tail_here_that_misses_the_floor_is_not_taken() -> None:
    d = decide(
        GRID,
        model(0.02, 100e6, DEVICE),
        AdaptiveRule(accuracy_floor=0.9),
        tail_here=True,
        tail_accuracy=0.5,
    )
    assert d.action == "offload"


def test_the_image_is_sent_when_the_head_costs_more_than_the_whole_trip() -> None:
    slow = DEVICE.scaled(50.0)  # head 0.25 s here; the image ~0.03 s away
    cost = CostModel(Link(100e6, 0.02, 400), slow, Compute(tail_s=0.002, model_s=0.004), (1,))
    choices = Choices(GRID, tail_here=True, tail_accuracy=0.92)
    images = {"png": (0.001, 800.0), "jpeg": (0.001, 1200.0)}
    d = start(choices, cost, AdaptiveRule(accuracy_floor=0.9), leave=(0.5,), images=images)
    assert d.action == "image" and d.image_format == "png"  # the smaller, as quick to encode
    assert d.expected_s == pytest.approx(cost.image_s(800, 0.001))


PNG = {"png": (0.0, 800.0)}


def test_a_fast_device_runs_the_head_and_a_slow_link_keeps_images_home() -> None:
    choices = Choices(GRID, tail_here=True, tail_accuracy=0.92)
    fast = CostModel(Link(100e6, 0.02, 400), DEVICE, Compute(model_s=0.004), (1,))
    assert start(choices, fast, AdaptiveRule(), (0.5,), PNG).action == "head"
    slow_link = CostModel(Link(30e3, 0.02, 400), DEVICE.scaled(20.0), Compute(model_s=0.004), (1,))
    assert start(choices, slow_link, AdaptiveRule(), (0.5,), PNG).action == "head"


def test_the_fixed_rule_never_sends_the_image() -> None:
    slow = CostModel(Link(100e6, 0.02, 400), DEVICE.scaled(50.0), Compute(model_s=0.004), (1,))
    assert start(Choices(GRID), slow, FixedRule(8, 8), (0.0,), PNG).action == "head"


def test_exits_that_answer_more_often_make_the_head_path_cheaper() -> None:
    cost = model(0.02, 1e6, DEVICE)
    rarely = cost.head_path_s([0.1], after_s=0.05)
    often = cost.head_path_s([0.9], after_s=0.05)
    assert often < rarely
    assert cost.head_path_s([1.0], after_s=0.05) == pytest.approx(cost.exit_s(0))


TWO_EXITS = Compute(segment_s=(0.004, 0.004), exit_s=(0.002, 0.001), tail_s=0.0005)


def two_exits(device: Compute = TWO_EXITS) -> CostModel:
    return CostModel(Link(1e6, 0.02, 400), device, SERVER, (0, 1))


def test_skipping_exits_saves_their_compute_and_carries_their_inputs_on() -> None:
    cost = two_exits()
    leave = (0.3, 0.5)
    after = 0.010
    everything = cost.head_path_s(leave, after)
    assert cost.head_path_s(leave, after, (True, True)) == pytest.approx(everything)
    none = cost.head_path_s(leave, after, (False, False))
    assert none == pytest.approx(cost.bottleneck_s(False) + after)
    first = cost.head_path_s(leave, after, (True, False))
    want = 0.3 * (0.004 + 0.002) + 0.7 * (0.008 + 0.002 + after)
    assert first == pytest.approx(want)
    assert cost.bottleneck_s((True, False)) == pytest.approx(0.010)
    assert cost.exit_s(1, (False, True)) == pytest.approx(0.009)


def test_an_exit_runs_only_where_it_pays_for_itself() -> None:
    cost = two_exits()
    # a cheap tail here: neither exit saves what it costs
    assert exit_plan(cost, (0.3, 0.5), after_s=0.0005) == (False, False)
    # an expensive offload after the head: both exits save it
    assert exit_plan(cost, (0.3, 0.5), after_s=0.050) == (True, True)
    # an exit nobody leaves at never runs; the later one still may
    assert exit_plan(cost, (0.0, 0.9), after_s=0.050) == (False, True)
    # the plan is never slower than running every exit, nor than running none
    for after in (0.0, 0.001, 0.003, 0.01, 0.1):
        for leave in ((0.0, 0.0), (0.1, 0.1), (0.5, 0.4), (0.9, 0.05)):
            plan = exit_plan(cost, leave, after)
            best = cost.head_path_s(leave, after, plan)
            assert best <= cost.head_path_s(leave, after) + 1e-12
            assert best <= cost.head_path_s(leave, after, (False, False)) + 1e-12


def test_start_plans_the_exits_for_the_adaptive_rule_only() -> None:
    choices = Choices(GRID, tail_here=True, tail_accuracy=0.92)
    cost = two_exits()
    head = start(choices, cost, AdaptiveRule(), (0.3, 0.5), {})
    assert head.action == "head" and head.exits == (False, False)  # the tail here is cheap
    assert head.expected_s == pytest.approx(cost.head_path_s((0.3, 0.5), 0.0005, head.exits))
    assert start(choices, cost, FixedRule(8, 8), (0.3, 0.5), {}).exits is None
    # a deadline nothing meets answers with the best exit now: every exit runs
    late = start(choices, cost, AdaptiveRule(deadline_s=0.0001), (0.3, 0.5), {})
    assert late.exits is None


def test_only_points_nothing_beats_at_once_are_left_to_choose_from() -> None:
    same = Point(2, 2, 0.70, 100)  # as accurate as 4x2 and as big, but carries less
    worse = Point(2, 8, 0.75, 900)  # less accurate than the other 2x8 and bigger
    grid = [*GRID, same.__class__(4, 2, 0.70, 100), worse]
    front = pareto(grid)
    assert same not in front and worse not in front
    assert set(front) == {Point(4, 2, 0.70, 100), *GRID[1:]}
    for cost in (FAST, SLOW):
        for rule in (AdaptiveRule(accuracy_floor=0.84), AdaptiveRule(deadline_s=0.13)):
            assert decide(grid, cost, rule).point in front
    assert pareto([Point(2, 2, None, 100), Point(4, 4, None, 50)]) == [
        Point(2, 2, None, 100),
        Point(4, 4, None, 50),
    ]
