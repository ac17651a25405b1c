"""Calibration says, per exit, how many samples its figures rest on and how many the goal's
margin needs, and warns when a small calibration split is what holds the exits back."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_calibrate import synthetic

from splitexit.calibrate import (
    Goal,
    Replay,
    clopper_pearson_lower,
    format_selection,
    select_thresholds,
)


def warnings_of(selection) -> list[str]:
    from splitexit.calibrate.samples import warnings

    return warnings(selection.exit_samples)


@pytest.mark.parametrize("conservative", [False, True])
def test_a_small_calibration_split_warns_per_exit_with_the_images_it_needs(conservative):
    s = select_thresholds(synthetic(250, 0), Goal.accuracy(1.0), conservative=conservative)
    lines = warnings_of(s)
    assert len(lines) == 2
    for line, (name, e) in zip(lines, s.exit_samples.items(), strict=True):
        assert "\n" not in line and f"exit {name!r} answered {e.answered} of 250" in line
        assert f"needs {e.needed} answered" in line
        assert f"about {e.more_images} more labelled calibration images" in line
        assert e.answered < e.needed and e.more_images > 0
    report = format_selection(s)
    assert "calibration samples per exit" in report and "too few" in report


@pytest.mark.parametrize("conservative", [False, True])
def test_a_large_calibration_split_does_not_warn_even_where_an_exit_answers_a_sliver(
    conservative,
):
    s = select_thresholds(synthetic(20000, 0), Goal.accuracy(1.0), conservative=conservative)
    assert warnings_of(s) == []
    early, late = s.exit_samples["early"], s.exit_samples["late"]
    assert late.answered >= late.needed and late.more_images == 0
    # the early exit answers a few percent: its wide bound costs the total little
    assert early.too_few and not early.worth_more_data
    assert early.bound_cost < 0.1 * early.margin


def test_the_per_exit_figures_are_the_bounds_at_the_chosen_thresholds():
    table = synthetic(250, 0)
    s = select_thresholds(table, Goal.accuracy(1.0), conservative=True)
    first = Replay(table, s.measure, s.point).first_exit(np.array(list(s.thresholds.values())))
    level = 1 - 0.05 / 2  # Bonferroni over the two exits, as conservative mode's bounds
    for i, (name, e) in enumerate(s.exit_samples.items()):
        answered = first == i
        assert (e.total, e.reached, e.answered) == (250, int((first >= i).sum()), answered.sum())
        assert e.correct == int(table.exit_correct[answered, i].sum())
        lower = clopper_pearson_lower(e.correct, e.answered, level)
        assert e.lower_bound == lower == s.exit_bounds[name]
        acc = e.correct / e.answered
        assert e.to_dict()["width_points"] == pytest.approx(100 * (acc - lower), abs=1e-4)

        def width(n: int, acc=acc) -> float:
            return acc - clopper_pearson_lower(acc * n, n, level)

        assert width(e.needed) <= 0.01 < width(e.needed - 1)
        assert e.more_images == math.ceil(e.needed * 250 / e.answered) - 250


def test_at_full_accuracy_the_needed_count_has_a_closed_form():
    from splitexit.calibrate import samples_needed

    for margin, level in ((0.01, 0.975), (0.005, 0.95), (0.02, 0.99)):
        # 1 - alpha ** (1 / n) <= margin  <=>  n >= log(alpha) / log(1 - margin)
        expected = math.ceil(math.log(1 - level) / math.log(1 - margin))
        assert samples_needed(1.0, margin, level) == expected
    assert samples_needed(0.9, 0.0) is None


def test_an_absolute_floor_sets_the_margin_and_an_offload_budget_sets_none():
    table = synthetic(250, 0)
    floor = table.tail_accuracy() - 0.03
    s = select_thresholds(table, Goal.accuracy(1.0, min_accuracy=floor))
    assert [e.margin for e in s.exit_samples.values()] == pytest.approx([0.03, 0.03])
    budget = select_thresholds(table, Goal.offload(0.5))
    assert {e.needed for e in budget.exit_samples.values()} == {None}
    assert warnings_of(budget) == []


def test_the_selections_json_records_every_exits_samples():
    s = select_thresholds(synthetic(250, 0), Goal.accuracy(1.0), conservative=True)
    d = s.to_dict()["exit_samples"]
    assert list(d) == ["early", "late"]
    for name, e in s.exit_samples.items():
        assert d[name]["answered"] == e.answered and d[name]["needed"] == e.needed
        assert d[name]["margin_points"] == 1.0 and d[name]["worth_more_data"] is True
