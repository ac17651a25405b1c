"""Resuming a run: a changed config is refused or restarted from a named stage, never silently
continued; stage times add up over invocations."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from support import experiment, write_toml

from splitexit.cli import main
from splitexit.train.config import config_from_dict

STAGES = ("teacher", "stage1", "stage2", "exits")
CPU = torch.device("cpu")
#: The tiny experiment made smaller still (width 4, two channels, one teacher epoch).
RESUME = {
    "name": "resume",
    "seed": 1,
    "data": {"train_subset": 128, "test_subset": 64, "calibration": 64},
    "teacher.kwargs.width": 4,
    "teacher.optim.epochs": 1,
    "split.channels": 2,
    "split.hidden": 4,
}


def config(out: Path, **changes) -> dict:
    """The resume experiment writing to `out`, with dotted-key changes."""
    return experiment(out, **{**RESUME, **changes})


def train(out: Path, *args: str, **changes) -> int:
    path = write_toml(config(out, **changes), out.parent / f"{out.name}.toml")
    return main(["train", str(path), "--no-export", *args])


def snapshot(out: Path) -> dict[str, tuple[int, bytes]]:
    """Each stage checkpoint's mtime and bytes."""
    return {
        s: (p.stat().st_mtime_ns, p.read_bytes())
        for s in STAGES
        if (p := out / "checkpoints" / f"{s}.pt").exists()
    }


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    assert train(out) == 0
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A copy of the finished tiny run (mtimes kept), as if trained with `config(copy)`."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    (out / "config.json").write_text(json.dumps(config_from_dict(config(out)).to_dict()))
    return out


def test_a_changed_config_is_refused_with_exit_2_naming_the_key_and_the_flag(run, capsys):
    before, stored = snapshot(run), (run / "config.json").read_text()
    capsys.readouterr()
    assert train(run, **{"exits.optim.epochs": 2}) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "exits.optim.epochs 1 -> 2" in err
    assert "invalidates stage 'exits'" in err and "--restart-from exits" in err
    assert snapshot(run) == before and (run / "config.json").read_text() == stored


def test_restart_from_retrains_the_changed_stage_and_leaves_earlier_ones(run, capsys):
    before, records = snapshot(run), metrics(run)
    assert train(run, "--restart-from", "exits", **{"exits.optim.epochs": 2}) == 0
    after = snapshot(run)
    assert {s: after[s] for s in STAGES[:3]} == {s: before[s] for s in STAGES[:3]}
    assert torch.load(run / "checkpoints" / "exits.pt", weights_only=True)["epoch"] == 2
    assert [(r["stage"], r["epoch"]) for r in metrics(run)] == [
        *((r["stage"], r["epoch"]) for r in records if r["stage"] != "exits"),
        ("exits", 1),
        ("exits", 2),
    ]
    assert "restarting from stage 'exits'" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["exits"]["optim"]["epochs"] == 2


def test_restart_with_an_unchanged_config_retrains_from_the_named_stage(run, capsys):
    before = snapshot(run)
    assert train(run, "--restart-from", "stage2") == 0
    after = snapshot(run)
    assert {s: after[s] for s in ("teacher", "stage1")} == {
        s: before[s] for s in ("teacher", "stage1")
    }
    for stage in ("stage2", "exits"):
        assert after[stage][0] > before[stage][0], f"{stage} was not retrained"
    assert "restarting from stage 'stage2'" in capsys.readouterr().err


def test_restart_from_a_stage_after_the_invalidated_one_is_refused_naming_the_right_one(
    run, capsys
):
    before = snapshot(run)
    capsys.readouterr()
    assert train(run, "--restart-from", "exits", **{"stage1.optim.lr": 0.01}) == 2
    err = capsys.readouterr().err
    assert "stage1.optim.lr" in err and "--restart-from stage1" in err
    assert snapshot(run) == before


def test_a_key_that_changes_no_weights_resumes_says_so_and_updates_config_json(run, capsys):
    before = snapshot(run)
    assert train(run, eval_batch_size=256) == 0
    assert snapshot(run) == before
    assert "eval_batch_size 512 -> 256" in capsys.readouterr().err
    stored = json.loads((run / "config.json").read_text())
    assert stored["eval_batch_size"] == 256
    canonical = json.dumps(stored, sort_keys=True, separators=(",", ":")).encode()
    assert (run / "config.sha256").read_text().strip() == hashlib.sha256(canonical).hexdigest()


def test_train_seconds_count_the_stages_of_every_invocation(run):
    assert train(run, "--restart-from", "exits", **{"exits.optim.epochs": 2}) == 0
    results = json.loads((run / "results.json").read_text())
    records = metrics(run)  # teacher .. stage2 from the first invocation, exits from this one
    assert {r["stage"] for r in records} == set(STAGES)
    assert results["train_seconds"] >= sum(r["seconds"] for r in records) - 0.1
    for stage in STAGES:
        spent = sum(r["seconds"] for r in records if r["stage"] == stage)
        assert results["stage_seconds"][stage] >= spent - 0.01
        ckpt = torch.load(run / "checkpoints" / f"{stage}.pt", weights_only=True)
        assert results["stage_seconds"][stage] == round(ckpt["seconds"], 2)


def test_a_resumed_stage_adds_its_new_epochs_to_the_checkpoints_seconds(tmp_path):
    from splitexit.models import build_model
    from splitexit.preprocess import Preprocess
    from splitexit.train.batches import ArraySplit
    from splitexit.train.config import Optim
    from splitexit.train.loop import StageRun, run_stage
    from splitexit.train.objectives import TeacherObjective

    torch.manual_seed(0)
    model = build_model("small_resnet", width=4)
    split = ArraySplit(
        torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8), torch.arange(64) % 10
    )
    pre = Preprocess(size=(28, 28), mean=(0.5,), std=(0.25,), channels=1)
    ckpt = tmp_path / "checkpoints" / "t.pt"
    seconds = []
    for epochs in (1, 2):  # the second call resumes after epoch 1, as a killed run does
        run = StageRun("t", Optim(epochs=epochs, batch_size=32), split, pre, tmp_path, 0, CPU)
        run_stage(run, TeacherObjective(model), model)
        seconds.append(torch.load(ckpt, weights_only=True)["seconds"])
    second_epoch = metrics(tmp_path)[1]["seconds"]  # rounded to 10 ms
    assert seconds[0] > 0 and seconds[1] - seconds[0] >= second_epoch - 0.005


def test_each_key_invalidates_its_own_stage_or_the_next_one_the_config_runs():
    from splitexit.train.resume import first_invalidated

    cfg = config_from_dict(config(Path("x")))
    given = config_from_dict(config(Path("x"), **{"teacher.checkpoint": "teacher.pt"}))
    no_stage2 = config_from_dict(config(Path("x"), **{"stage2.optim.epochs": 0}))

    def first(key: str, c=cfg) -> str | None:
        return first_invalidated({key: (0, 1)}, c)

    assert [first(k) for k in ("seed", "data.calibration", "teacher.optim.lr")] == ["teacher"] * 3
    assert [first(k) for k in ("split.channels", "stage1.optim.lr")] == ["stage1"] * 2
    assert [first(k) for k in ("stage2.alpha", "exits.optim.epochs")] == ["stage2", "exits"]
    assert [first(k) for k in ("name", "output", "device", "eval_batch_size")] == [None] * 4
    assert first("teacher.optim.lr", given) == "stage1"  # a given teacher: no teacher stage
    assert first("stage2.alpha", no_stage2) == "exits"
