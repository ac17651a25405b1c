"""Plain-text reports of a threshold selection and of its check on held-out data."""

from __future__ import annotations

from collections.abc import Sequence

from .promise import PromiseCheck
from .replay import NEVER, Outcome
from .table import CalibrationTable
from .thresholds import Selection


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _thr(t: float) -> str:
    return "off" if t >= NEVER else f">= {t:.4f}"


def format_table_summary(table: CalibrationTable, name: str = "calibration") -> str:
    """One paragraph: what a calibration table holds."""
    info = table.info
    lines = [
        f"{name} table: {table.n} samples of bundle {info.get('bundle', '?')!r} "
        f"(fingerprint {str(info.get('fingerprint', '?'))[:16]})",
        "  exits (accuracy on all samples): "
        + ", ".join(f"{e} {_pct(a)}" for e, a in table.exit_accuracy().items()),
        "  tail by (channels, bits): "
        + ", ".join(
            f"{k},{b}: {_pct(table.tail_accuracy((k, b)))} ~{table.frame_bytes[:, j].mean():.0f} B"
            for j, (k, b) in enumerate(p.key for p in table.points)
        ),
    ]
    return "\n".join(lines)


def format_outcome(outcome: Outcome, bounds: dict[str, float | None] | None = None) -> str:
    """Per-exit rates and accuracies, then the totals."""
    rows = [
        f"  {'answered by':<16}{'threshold':>12}{'rate':>10}{'accuracy':>10}"
        + ("   CP lower" if bounds else "")
    ]
    for name, t in outcome.thresholds.items():
        row = (
            f"  {name:<16}{_thr(t):>12}{_pct(outcome.exit_rates[name]):>10}"
            f"{_pct(outcome.exit_accuracy[name]):>10}"
        )
        if bounds:
            row += f"   {_pct(bounds.get(name))}"
        rows.append(row)
    k, bits = outcome.point.key
    rows.append(
        f"  {f'tail (k={k}, {bits}b)':<16}{'':>12}{_pct(outcome.offload_rate):>10}"
        f"{_pct(outcome.offload_accuracy):>10}"
    )
    latency = (
        ""
        if outcome.expected_latency_ms is None
        else f", expected latency {outcome.expected_latency_ms:.2f} ms"
    )
    rows.append(
        f"  overall accuracy {_pct(outcome.accuracy)} (tail alone {_pct(outcome.tail_accuracy)}), "
        f"offload {_pct(outcome.offload_rate)}, {outcome.expected_bytes:.1f} B/input{latency}"
    )
    return "\n".join(rows)


def format_selection(selection: Selection, check: PromiseCheck | None = None) -> str:
    """A readable report: goal, thresholds, per-exit figures, and the held-out check."""
    s = selection
    mode = (
        f"conservative (Clopper-Pearson, {100 * s.confidence:g}% confidence)"
        if s.conservative
        else "plain (point estimates)"
    )
    k, bits = s.reference_point.key
    lines = [
        f"goal: {s.goal.describe()}",
        f"mode: {mode}; measure {s.measure}; offload at k={s.point.channels}, {s.point.bits} bits",
        f"tail accuracy at k={k}, {bits} bits: {_pct(s.reference_accuracy)}"
        + ("" if s.floor is None else f"; accuracy floor {_pct(s.floor)}"),
    ]
    if not s.feasible:
        lines.append(
            "WARNING: no thresholds meet this goal on the calibration data; "
            "showing the closest found (relax the goal)"
        )
    lines.append(f"on the calibration split ({s.outcome.n} samples):")
    lines.append(format_outcome(s.outcome, s.exit_bounds if s.conservative else None))
    if s.conservative and s.floor is not None:
        lines.append(
            f"  pessimistic accuracy (exits at their bounds) {_pct(s.pessimistic_accuracy)}"
        )
    if s.exit_samples:
        lines.append(format_exit_samples(s))
    if check is not None:
        lines.append(f"on the held-out split ({check.test.n} samples):")
        lines.append(format_outcome(check.test))
        for p in check.promises:
            lines.append(_promise_line(p.quantity, p.target, p.achieved, p.gap, p.kept))
    return "\n".join(lines)


def format_exit_samples(selection: Selection) -> str:
    """Per exit: the samples it saw, its bound's width, and what the goal's margin needs."""
    samples = selection.exit_samples
    first = next(iter(samples.values()))
    margin = "no margin" if first.margin is None else f"{100 * first.margin:g}-point margin"
    rows = [
        f"calibration samples per exit (bounds at {100 * first.confidence:g}% each, {margin}):",
        f"  {'exit':<16}{'reached':>9}{'answered':>10}{'width':>9}{'needed':>9}",
    ]
    for name, e in samples.items():
        width = "-" if e.width is None else f"{100 * e.width:.2f}"
        needed = "-" if e.needed is None else str(e.needed)
        more = (
            f"   too few: ~{e.more_images} more images"
            if e.worth_more_data
            else "   (too few, costs little)"
            if e.too_few
            else ""
        )
        rows.append(f"  {name:<16}{e.reached:>9}{e.answered:>10}{width:>9}{needed:>9}{more}")
    return "\n".join(rows)


def _promise_line(quantity: str, target: float, achieved: float, gap: float, kept: bool) -> str:
    word = "at least" if quantity == "accuracy" else "at most"
    return (
        f"  promise: {quantity} {word} {_pct(target)}, achieved {_pct(achieved)}, "
        f"gap {100 * gap:+.2f} points: {'KEPT' if kept else 'MISSED'}"
    )


def format_sweep(checks: Sequence[PromiseCheck]) -> str:
    """Target vs achieved for several accuracy goals (e.g. from `promise_sweep`)."""
    head = (
        f"{'X (points)':>10}  {'mode':<12}{'target':>9}{'achieved':>10}{'gap':>8}"
        f"{'offload cal':>13}{'offload test':>14}  kept"
    )
    rows = [head, "-" * len(head)]
    for c in checks:
        s = c.selection
        acc = next(p for p in c.promises if p.quantity == "accuracy")
        rows.append(
            f"{s.goal.max_drop if s.goal.max_drop is not None else float('nan'):>10.2f}  "
            f"{'conservative' if s.conservative else 'plain':<12}"
            f"{_pct(acc.target):>9}{_pct(acc.achieved):>10}{100 * acc.gap:>+8.2f}"
            f"{_pct(s.outcome.offload_rate):>13}{_pct(c.test.offload_rate):>14}  "
            f"{'yes' if acc.kept else 'NO'}"
        )
    return "\n".join(rows)
