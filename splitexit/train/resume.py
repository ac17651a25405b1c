"""Resuming a run: the config it was trained with, what a changed one invalidates, stage times.

    <run>/config.json + config.sha256 ─ compare with the new config ─┬─ same: resume
                                                                     ├─ weights untouched: resume,
                                                                     │  say so, update config.json
                                                                     └─ stage S invalidated: refuse,
                                                                        naming --restart-from S

Stages run in the order of `STAGES`; a key invalidates its own stage and every later one:
`data.*`, `seed` and `teacher.*` the teacher, `split.*` and `stage1.*` stage 1, `stage2.*`
stage 2, `exits.*` the exits. Keys in `NO_WEIGHTS` only change how the run is evaluated,
exported or where it lives. A stage the new config does not run (the teacher when
`teacher.checkpoint` is given, a stage with 0 epochs) passes its invalidation on to the next.

`restart_from=S` (`splitexit train --restart-from S`) deletes the checkpoints of S and every
later stage, their records in metrics.jsonl, and the run's outputs made from them
(results.json, model.pt, bundle/), then trains from S.

Every checkpoint carries the cumulative `seconds` spent on its stage over all invocations;
`train_seconds` in results.json is their sum over the stages the final model came from
(training epochs and their per-epoch validation; loading data and the final test-set
evaluation are not counted).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import ExperimentConfig, config_from_dict

STAGES = ("teacher", "stage1", "stage2", "exits")
# keys (or key prefixes) that change no weights: evaluation, export and the run's location
NO_WEIGHTS = ("name", "output", "device", "eval_batch_size", "data.test_subset", "exits.measure")
_FIRST_STAGE = {
    "data": "teacher",
    "seed": "teacher",
    "teacher": "teacher",
    "split": "stage1",
    "stage1": "stage1",
    "stage2": "stage2",
    "exits": "exits",
}
_OUTPUTS = ("results.json", "model.pt", "bundle")
_UNSET = object()


def config_hash(table: Mapping[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(table, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys: {"exits": {"optim": {"epochs": 2}}} -> exits.optim.epochs."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for every key whose value differs (missing: `_UNSET`)."""
    a, b = flatten(old), flatten(new)
    return {
        k: (a.get(k, _UNSET), b.get(k, _UNSET))
        for k in sorted(set(a) | set(b))
        if a.get(k, _UNSET) != b.get(k, _UNSET)
    }


def stage_of(key: str) -> str | None:
    """The first stage a changed key invalidates (None: it changes no weights)."""
    if any(key == k or key.startswith(f"{k}.") for k in NO_WEIGHTS):
        return None
    return _FIRST_STAGE.get(key.split(".", 1)[0], STAGES[0])


def running_stages(cfg: ExperimentConfig) -> list[str]:
    """The stages `cfg` trains, in order."""
    epochs = {
        "teacher": 0 if cfg.teacher.checkpoint else cfg.teacher.optim.epochs,
        "stage1": cfg.stage1.optim.epochs,
        "stage2": cfg.stage2.optim.epochs,
        "exits": cfg.exits.optim.epochs,
    }
    return [s for s in STAGES if epochs[s] > 0]


def first_invalidated(changes: Mapping[str, tuple[Any, Any]], cfg: ExperimentConfig) -> str | None:
    """The earliest stage the changes invalidate, moved on to the first one `cfg` runs."""
    hit = [STAGES.index(s) for k in changes if (s := stage_of(k)) is not None]
    if not hit:
        return None
    runs = [s for s in running_stages(cfg) if STAGES.index(s) >= min(hit)]
    return runs[0] if runs else STAGES[min(hit)]


def describe_changes(changes: Mapping[str, tuple[Any, Any]], limit: int = 6) -> str:
    """`a.b 1 -> 2, c "x" -> "y"`: the first `limit` changes, then how many more."""

    def show(v: Any) -> str:
        return "(unset)" if v is _UNSET else json.dumps(v)

    parts = [f"{k} {show(a)} -> {show(b)}" for k, (a, b) in list(changes.items())[:limit]]
    if len(changes) > limit:
        parts.append(f"and {len(changes) - limit} more")
    return ", ".join(parts)


@dataclass(frozen=True)
class ResumePlan:
    """What a (re)started run does with what is already in its directory."""

    out: Path
    table: dict[str, Any]  # the new config, as config.json stores it
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    restart_from: str | None = None
    note: str = ""  # why the changes need no restart

    @property
    def deleted_stages(self) -> tuple[str, ...]:
        if self.restart_from is None:
            return ()
        return STAGES[STAGES.index(self.restart_from) :]


def checkpoint_path(out_dir: Path, stage: str) -> Path:
    """Where a stage's checkpoint lives in a run directory."""
    return out_dir / "checkpoints" / f"{stage}.pt"


def plan_resume(cfg: ExperimentConfig, restart_from: str | None = None) -> ResumePlan:
    """Compare `cfg` with the config its run directory was trained with; refuse a change
    that invalidates trained stages unless `restart_from` names that stage or an earlier one.

    Raises ConfigError naming the changed keys and the `--restart-from` stage to pass.
    """
    if restart_from is not None and restart_from not in STAGES:
        raise ConfigError(f"restart_from must be one of {list(STAGES)}, got {restart_from!r}")
    out = cfg.output_dir()
    table = json.loads(json.dumps(cfg.to_dict()))
    stored = out / "config.json"
    if not stored.exists():
        return ResumePlan(out, table, restart_from=restart_from)
    digest = out / "config.sha256"
    if digest.exists() and digest.read_text().strip() == config_hash(table):
        return ResumePlan(out, table, restart_from=restart_from)
    try:
        old = json.loads(stored.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{stored} is not valid JSON ({e}); choose a new --output") from None
    changes = config_changes(_normalised(old), table)
    stage = first_invalidated(changes, cfg)
    if stage is None:
        return ResumePlan(out, table, changes, restart_from, "no trained weights depend on them")
    if not _trained_from(out, stage):
        note = f"stage {stage!r} and later are not trained yet"
        return ResumePlan(out, table, changes, restart_from, note)
    why = f"{describe_changes(changes)}; that invalidates stage {stage!r} and later"
    if restart_from is None:
        raise ConfigError(
            f"{out} was trained with another config: {why}; rerun with --restart-from "
            f"{stage} (or choose a new --output)"
        )
    if STAGES.index(restart_from) > STAGES.index(stage):
        raise ConfigError(
            f"{out} was trained with another config: {why}, so --restart-from {restart_from} "
            f"is too late; rerun with --restart-from {stage} (or choose a new --output)"
        )
    return ResumePlan(out, table, changes, restart_from)


def apply_resume(plan: ResumePlan) -> None:
    """Delete what the plan restarts, write config.json and its hash, say what happens
    (stderr). Rank 0 only."""
    out = plan.out
    out.mkdir(parents=True, exist_ok=True)
    if plan.changes:
        print(
            f"splitexit: {out}: config changed since the last invocation: "
            f"{describe_changes(plan.changes)}",
            file=sys.stderr,
        )
    if plan.restart_from is not None:
        removed = [s for s in plan.deleted_stages if checkpoint_path(out, s).exists()]
        for s in plan.deleted_stages:
            checkpoint_path(out, s).unlink(missing_ok=True)
        outputs = [name for name in _OUTPUTS if (out / name).exists()]
        for name in outputs:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
        _drop_metrics(out / "metrics.jsonl", set(plan.deleted_stages))
        print(
            f"splitexit: {out}: restarting from stage {plan.restart_from!r}: deleted "
            f"checkpoints {', '.join(removed) or '(none yet)'}"
            + (f" and {', '.join(outputs)}" if outputs else ""),
            file=sys.stderr,
        )
    elif plan.changes:
        print(f"splitexit: {out}: {plan.note}; resuming", file=sys.stderr)
    _write(out / "config.json", json.dumps(plan.table, indent=2, sort_keys=True))
    _write(out / "config.sha256", config_hash(plan.table) + "\n")


def stage_seconds(out: Path, stages: list[str]) -> dict[str, float]:
    """Cumulative seconds recorded in each of `stages`' checkpoints (missing: none)."""
    import torch

    seconds = {}
    for s in stages:
        path = checkpoint_path(out, s)
        if path.exists():
            state = torch.load(path, map_location="cpu", weights_only=True)
            seconds[s] = round(float(state.get("seconds", 0.0)), 2)
    return seconds


def _trained_from(out: Path, stage: str) -> bool:
    """Does the run directory hold anything trained at or after `stage`?"""
    later = STAGES[STAGES.index(stage) :]
    return any(checkpoint_path(out, s).exists() for s in later) or any(
        (out / name).exists() for name in _OUTPUTS
    )


def _normalised(table: dict[str, Any]) -> dict[str, Any]:
    """A stored config with today's defaults filled in (as stored if it no longer parses)."""
    try:
        normalised: dict[str, Any] = json.loads(json.dumps(config_from_dict(table).to_dict()))
        return normalised
    except ConfigError:
        return table


def _drop_metrics(path: Path, stages: set[str]) -> None:
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("stage") not in stages
    ]
    _write(path, "".join(f"{line}\n" for line in kept))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
