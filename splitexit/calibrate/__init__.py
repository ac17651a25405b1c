"""Calibration: record what a bundle does on held-out data, choose exit thresholds for a goal,
check the promise on a test split, and write the thresholds into the bundle.

    bundle + split ─ record_table ─► CalibrationTable (.npz) ─ select_thresholds(Goal)
        ─► Selection ─ check_promise(test table) ─► PromiseCheck ─ write_selection ─► bundle

`tabulate` runs a bundle into a `table`; `replay` replays thresholds (accuracy, offload, bytes,
latency, priced by `splitexit.cost`); `goals` states what they must achieve; `bounds` holds
the Clopper-Pearson bounds; `thresholds` searches; `samples` says how many calibration
samples each exit's figures rest on and how many the goal's margin needs; `promise` checks on
held-out data; `report` formats; `write` writes a selection into the bundle. The
`splitexit calibrate` command is `splitexit.commands.calibrate`.

Names are imported on first use, so importing the package (what the CLI does to build its
parser) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "betainc": "bounds",
    "binom_sf": "bounds",
    "clopper_pearson_lower": "bounds",
    "clopper_pearson_upper": "bounds",
    "samples_needed": "bounds",
    "folder_split": "data",
    "held_out_splits": "data",
    "GOALS": "goals",
    "Goal": "goals",
    "NEVER": "replay",
    "Outcome": "replay",
    "Replay": "replay",
    "evaluate_policy": "replay",
    "check_compute": "replay",
    "measure_compute": "replay",
    "median_ms": "replay",
    "Promise": "promise",
    "PromiseCheck": "promise",
    "check_promise": "promise",
    "promise_sweep": "promise",
    "record_table": "tabulate",
    "format_exit_samples": "report",
    "format_outcome": "report",
    "format_selection": "report",
    "format_sweep": "report",
    "format_table_summary": "report",
    "CalibrationError": "table",
    "CalibrationTable": "table",
    "ExitSamples": "samples",
    "Selection": "thresholds",
    "select_thresholds": "thresholds",
    "calibrated_on": "write",
    "jsonable": "write",
    "write_selection": "write",
}

__all__ = [
    "GOALS",
    "NEVER",
    "CalibrationError",
    "CalibrationTable",
    "ExitSamples",
    "Goal",
    "Outcome",
    "Promise",
    "PromiseCheck",
    "Replay",
    "Selection",
    "betainc",
    "binom_sf",
    "calibrated_on",
    "check_compute",
    "check_promise",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "evaluate_policy",
    "folder_split",
    "format_exit_samples",
    "format_outcome",
    "format_selection",
    "format_sweep",
    "format_table_summary",
    "held_out_splits",
    "jsonable",
    "measure_compute",
    "median_ms",
    "promise_sweep",
    "record_table",
    "samples_needed",
    "select_thresholds",
    "write_selection",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs
    from .bounds import (
        betainc,
        binom_sf,
        clopper_pearson_lower,
        clopper_pearson_upper,
        samples_needed,
    )
    from .goals import GOALS, Goal
    from .promise import Promise, PromiseCheck, check_promise, promise_sweep
    from .replay import (
        NEVER,
        Outcome,
        Replay,
        check_compute,
        evaluate_policy,
        measure_compute,
        median_ms,
    )
    from .report import (
        format_exit_samples,
        format_outcome,
        format_selection,
        format_sweep,
        format_table_summary,
    )
    from .samples import ExitSamples
    from .table import CalibrationError, CalibrationTable
    from .tabulate import record_table
    from .thresholds import Selection, select_thresholds
    from .write import calibrated_on, jsonable, write_selection
