"""The training pipeline end to end on a tiny subset: stages, determinism, resume, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import experiment, write_toml

from splitexit.bundle import load_bundle
from splitexit.demo import free_port
from splitexit.train.config import config_from_dict
from splitexit.train.pipeline import run_experiment


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    results = run_experiment(config_from_dict(experiment(out)), log=lambda *a: None)
    return out, results


def test_every_stage_checkpoints_and_logs_each_epoch(tiny_run) -> None:
    out, _ = tiny_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [
        ("teacher", 1),
        ("teacher", 2),
        ("stage1", 1),
        ("stage2", 1),
        ("exits", 1),
    ]
    assert all("val_accuracy" in r for r in records if r["stage"] != "exits")
    assert {"val_exit_layer1", "val_exit_bottleneck"} <= set(records[-1])
    for stage in ("teacher", "stage1", "stage2", "exits"):
        assert (out / "checkpoints" / f"{stage}.pt").exists()


def test_results_cover_the_whole_operating_grid_with_frame_sizes(tiny_run) -> None:
    _, results = tiny_run
    grid = {(p["channels"], p["bits"]): p for p in results["operating_points"]}
    assert set(grid) == {(k, b) for k in range(1, 5) for b in (2, 4, 8)}
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in grid.values())
    # more channels or more bits never make a frame smaller than the header alone
    assert grid[(4, 8)]["frame_bytes"] > grid[(1, 2)]["frame_bytes"] >= 37
    assert set(results["exits"]) == {"layer1", "bottleneck"}
    assert 0.0 <= results["teacher_accuracy"] <= 1.0


def test_the_run_exports_a_bundle_that_loads_and_carries_the_measured_grid(tiny_run) -> None:
    out, results = tiny_run
    bundle = load_bundle(out / "bundle")
    m = bundle.manifest
    assert m.split_point == "layer1" and [e.name for e in m.exits] == ["layer1", "bottleneck"]
    measured = {(p["channels"], p["bits"]): p["accuracy"] for p in results["operating_points"]}
    assert {(p.channels, p.bits): p.accuracy for p in m.operating_points} == measured
    assert m.teacher_accuracy == results["teacher_accuracy"]
    assert m.class_names[0] == "T-shirt/top"


def test_same_seed_reproduces_the_same_weights(tiny_run, tmp_path) -> None:
    out, _ = tiny_run
    again = tmp_path / "again"
    run_experiment(config_from_dict(experiment(again)), export=False, log=lambda *a: None)
    assert_same_state(final_state(out), final_state(again))


def test_rerunning_a_finished_run_trains_nothing_more(tiny_run) -> None:
    out, _ = tiny_run
    lines = (out / "metrics.jsonl").read_text()
    before = final_state(out)
    run_experiment(config_from_dict(experiment(out)), export=False, log=lambda *a: None)
    assert (out / "metrics.jsonl").read_text() == lines
    assert_same_state(before, final_state(out))


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "splitexit", *args], env=env, **kw)


def test_a_killed_run_resumes_to_the_same_weights(tmp_path) -> None:
    """Kill -9 after the teacher's first epoch, run again: same weights as uninterrupted.

    Both runs are subprocesses with the same thread count, so float reductions match.
    """
    whole = write_toml(experiment(tmp_path / "whole"), tmp_path / "whole.toml")
    config = write_toml(experiment(tmp_path / "killed"), tmp_path / "killed.toml")
    uninterrupted = _cli(
        "train", str(whole), "--no-export", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    proc = _cli(
        "train", str(config), "--no-export", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = tmp_path / "killed" / "checkpoints" / "teacher.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert ckpt.exists(), "the run never wrote its first checkpoint"
    assert not (tmp_path / "killed" / "model.pt").exists()
    done = _cli(
        "train", str(config), "--no-export", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err.decode()[-2000:]
    assert uninterrupted.wait(timeout=300) == 0
    assert_same_state(final_state(tmp_path / "whole"), final_state(tmp_path / "killed"))


def test_torchrun_two_cpu_ranks_train_the_same_model(tmp_path) -> None:
    table = experiment(tmp_path / "ddp")
    config = write_toml(table, tmp_path / "tiny.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "splitexit",
        "train",
        str(config),
        "--no-export",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all 2 ranks agree on the final weights" in proc.stdout + proc.stderr
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["teacher_accuracy"] > 0


def test_batchnorm_recalibration_averages_the_statistics_of_the_given_batches() -> None:
    from splitexit.models import build_model
    from splitexit.preprocess import Preprocess
    from splitexit.train.batches import ArraySplit, epoch_generator, iterate_batches
    from splitexit.train.config import Optim
    from splitexit.train.loop import StageRun, recalibrate_batchnorm
    from splitexit.train.objectives import TeacherObjective

    torch.manual_seed(0)
    model = build_model("small_resnet", width=8)
    images = torch.randint(0, 256, (96, 28, 28), dtype=torch.uint8)
    split = ArraySplit(images, torch.randint(0, 10, (96,)))
    pre = Preprocess(size=(28, 28), mean=(0.5,), std=(0.25,), channels=1)
    optim = Optim(batch_size=32, bn_recalibration_batches=2)
    run = StageRun("t", optim, split, pre, Path("."), seed=1, device=torch.device("cpu"))
    bn = model.stem.bn
    bn.running_mean.fill_(123.0)
    recalibrate_batchnorm(run, TeacherObjective(model), epoch=0)
    g = epoch_generator(1, "t-bn", 0)
    means = [
        model.stem.conv(x).mean(dim=(0, 2, 3))
        for _, (x, _) in zip(range(2), iterate_batches(split, pre, 32, generator=g), strict=False)
    ]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))
    assert bn.momentum == 0.1  # restored
