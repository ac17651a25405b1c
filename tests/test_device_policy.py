"""The decision logic, on its own: numbers in, a decision out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device.policy import (
    AdaptiveRule,
    Costs,
    FixedRule,
    Point,
    best_point,
    decide,
    find_point,
    offload_seconds,
)

# (k, bits) -> (accuracy, frame bytes): more channels or bits, more accurate and bigger
GRID = [
    Point(2, 2, 0.70, 100),
    Point(2, 8, 0.80, 400),
    Point(4, 4, 0.85, 500),
    Point(8, 2, 0.86, 600),
    Point(8, 8, 0.92, 1600),
]
FAST = Costs(base_latency_s=0.005, bandwidth_bps=100e6, server_s=0.002, overhead_bytes=400)
SLOW = Costs(base_latency_s=0.040, bandwidth_bps=100e3, server_s=0.002, overhead_bytes=400)


def chosen(costs: Costs, rule: AdaptiveRule | FixedRule, points: list[Point] = GRID) -> Point:
    d = decide(points, costs, rule)
    assert d.action == "offload", d
    assert d.point is not None
    return d.point


def test_expected_offload_time_adds_every_cost() -> None:
    costs = Costs(0.01, 80e3, server_s=0.003, encode_s=0.001, overhead_bytes=500)
    # (1500 + 500) bytes * 8 / 80 kbit/s = 0.2 s
    assert offload_seconds(Point(8, 8, 0.9, 1500), costs) == pytest.approx(0.214)


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


def test_deadline_prefers_points_that_meet_the_floor() -> None:
    # in time (<= 0.13 s): 2x2, 2x8, 4x4, 8x2; of those, floor 0.85 leaves 4x4 and 8x2
    assert chosen(SLOW, AdaptiveRule(accuracy_floor=0.85, deadline_s=0.13)) == GRID[3]
    # only 2x2 and 2x8 are in time; neither meets the floor: the deadline wins
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
    fast = decide(GRID, Costs(base, bw * 10, overhead_bytes=300), rule)
    slow = decide(GRID, Costs(base, bw, overhead_bytes=300), rule)
    for d in (fast, slow):
        if d.action == "offload":
            assert d.expected_s is not None and d.expected_s <= deadline
    if slow.action == "offload":
        assert fast.action == "offload"
        assert fast.point is not None and slow.point is not None
        assert slow.point.frame_bytes <= fast.point.frame_bytes
