"""The benchmark suite runs from its one command and writes every section it promises; the
link emulator's own cost is measured against a raw exchange, never below the link's floor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from suite.analysis import Cell
from suite.inputs import Inputs
from suite.link_check import link_cost  # benchmarks/ is on pytest's pythonpath (pyproject)
from suite.samples import Sample
from suite.split_pays import ModelInputs, model_inputs, price, where_split_pays, why

from splitexit.cost import Compute, CostModel, Link

ROOT = Path(__file__).resolve().parents[1]


def test_a_raw_exchange_through_the_emulator_pays_rtt_and_bytes_and_little_more() -> None:
    cost = link_cost("1mbit:10ms", 1000, 500, n=5)
    assert cost.wire_ms == pytest.approx(1500 * 8 / 1e6 * 1e3)
    assert cost.rtt_ms == 10.0
    assert cost.through_ms >= cost.rtt_ms + cost.wire_ms  # a link is never early
    assert 0 < cost.direct_ms < cost.through_ms
    assert cost.excess_ms < 10.0  # loose: a loaded machine wakes threads late


def _slow_device_model(rate_mbit: float) -> CostModel:
    """A device whose tail is most of the model (100 of 130 ms), an exit after the first
    10 ms of head; a server 20x faster; a 20 ms RTT."""
    device = Compute(segment_s=(0.010, 0.020), exit_s=(0.001, 0.001), tail_s=0.100)
    server = Compute(tail_s=0.002, model_s=0.005)
    return CostModel(Link.mbit(rate_mbit, 20.0), device, server, exit_segments=(0, 1))


def test_split_pays_where_the_model_prices_split_plus_exit_30_percent_below_both_baselines() -> (
    None
):
    leave = (0.5, 0.0)  # half the inputs leave at the early exit
    images = {"offload-png": (0.001, 20_000.0)}  # (encode s, bytes both ways) of an image
    # a slow link: the image takes 1.6 s, local-only 130 ms; half the inputs stop after
    # 11 ms, the rest pay the head, the early exit (the late one answers none: not run) and
    # a 400 B frame's round trip (52 ms)
    slow = price(_slow_device_model(0.1), leave, 400.0, images)
    assert slow["best_baseline"] == "local"
    assert slow["baselines_ms"]["local"] == pytest.approx(130.0)
    assert slow["split_ms"] == pytest.approx(0.5 * 11.0 + 0.5 * (31.0 + 20.0 + 32.0 + 2.0), 0.01)
    assert slow["vs_best_baseline_pct"] <= -30 and slow["pays"]
    # a fast link: the image costs 27 ms in all, less than the plan's head and frame
    fast = price(_slow_device_model(100.0), leave, 400.0, images)
    assert fast["best_baseline"] == "offload-png"
    assert fast["split_ms"] > fast["baselines_ms"]["offload-png"] and not fast["pays"]


def test_the_line_under_the_goals_names_the_cells_where_split_pays_and_only_those() -> None:
    slow = _slow_device_model(1.0)
    inputs = ModelInputs(
        slow.device,
        slow.server,
        slow.exit_segments,
        (0.5, 0.0),
        {"http": 400.0},
        {"offload-png": (0.001, 20_000.0)},
        ("early", "bottleneck"),
    )
    rows = where_split_pays(inputs, [0.1, 100.0], rtt_ms=20.0, speed=1.0)
    assert [(r["rate_mbit"], r["pays"]) for r in rows] == [(0.1, True), (100.0, False)]
    line = why(inputs, rows, speed=1.0)
    assert "in: 0.1 Mbit/s (http)." in line and "100 Mbit/s (http)" not in line
    assert "early: 50% after" in line  # where the exits answer


def test_the_models_inputs_are_the_runs_compute_at_local_onlys_pace_and_its_bytes() -> None:
    local = Cell("local", None, [Sample("a", 7.0, True, "device", device_ms=_ms(1, 4, tail=2))])
    reached = Sample(  # ran every exit, then offloaded: 500 B up, 300 B down
        "b",
        40.0,
        True,
        "server",
        request_bytes=500,
        response_bytes=300,
        tail_ms=3.0,
        device_ms=_ms(2, 8, exits=2, quantize=0.5, frame=0.5),
    )
    exited = Sample("c", 9.0, True, "bottleneck", device_ms=_ms(2, 8, exits=1))
    split = Cell("split-exit", 1.0, [reached, exited], transport="stream")
    profile = Compute(segment_s=(0.001, 0.003), exit_s=(0.003, 0.001))
    inputs = model_inputs([local, split], profile, (0.0, 0.5), (0, 1), 9.9)
    assert inputs is not None
    d = inputs.device
    assert d.segment_s == pytest.approx((0.001, 0.003))  # local-only's 4 ms head, as profiled
    # the exits cost a quarter of the head where every exit ran: 1 ms at local-only's pace
    assert d.exit_s == pytest.approx((0.00075, 0.00025))
    assert (d.preprocess_s, d.tail_s, d.encode_s) == pytest.approx((0.001, 0.002, 0.001))
    assert inputs.server.tail_s == pytest.approx(0.003)  # as the server reported it
    assert inputs.frame_bytes == {"stream": 800.0} and inputs.images == {}


def _ms(preprocess: float, head: float, **rest: float) -> dict[str, float]:
    return {"preprocess": preprocess, "head": head, **rest}


def test_split_does_not_pay_where_the_exits_save_too_little_of_the_model() -> None:
    # the exit nobody takes (not run), a small tail: the plan is local-only plus an exit
    device = Compute(segment_s=(0.005, 0.005), exit_s=(0.0005, 0.0005), tail_s=0.002)
    cost = CostModel(Link.mbit(0.1), device, Compute(tail_s=0.001), exit_segments=(0, 1))
    priced = price(cost, (0.0, 0.3), 800.0, {})
    assert priced["best_baseline"] == "local" and not priced["pays"]
    # 30% answer at the bottleneck exit after the whole head: they save only the tail
    assert priced["split_ms"] == pytest.approx(10.5 + 0.7 * 2.0, 0.01)
    assert priced["vs_best_baseline_pct"] > -30


def test_the_rounds_split_the_inputs_in_order_and_each_keeps_its_ids() -> None:
    images = Inputs(np.zeros((7, 4, 4), np.uint8), np.arange(7), ("a",) * 7)
    parts = images.parts(3)
    assert [len(p) for p in parts] == [2, 3, 2]
    ids = [p.id(i) for p in parts for i in range(len(p))]
    assert ids == [images.id(i) for i in range(7)]
    assert [int(x) for p in parts for x in p.labels] == list(range(7))
    assert len(images.parts(10)) == 7 and len(images.parts(1)) == 1  # never an empty part


def test_a_cells_rounds_add_up_samples_and_counts_and_keep_the_latest_link_estimate() -> None:
    def run(n: int, bps: float, reasons: dict[str, int]) -> Cell:
        samples = [Sample(f"{i}", 1.0, True, "server") for i in range(n)]
        extra = {"retries": 1, "fallback_reasons": reasons, "link": {"bandwidth_bps": bps}}
        return Cell("split", 5.0, samples, extra, "http")

    cell = Cell("split", 5.0, [], transport="http")
    cell.add(run(2, 1e6, {"busy": 1}))
    cell.add(run(3, 2e6, {"busy": 2, "timeout": 1}))
    assert len(cell.samples) == 5 and cell.extra["retries"] == 2
    assert cell.extra["fallback_reasons"] == {"busy": 3, "timeout": 1}
    assert cell.extra["link"] == {"bandwidth_bps": 2e6}


@pytest.mark.parametrize(
    ("script", "flag", "value", "named"),
    [
        ("run_all.py", "--transport", "http,ftp", "transport"),
        ("run_all.py", "--tracks", "big", "tracks"),
        ("run_all.py", "--cpus", "0,0", "cpus"),
        ("run_all.py", "--cpus", "zero", "cpus"),
        ("run_all.py", "--rounds", "0", "rounds"),
        ("agent_overhead.py", "--cpus", "0,0", "cpus"),
    ],
)
def test_a_bad_transport_track_or_cores_is_one_line_and_exit_2(
    script: str, flag: str, value: str, named: str
) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), flag, value],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and named in done.stderr


@pytest.mark.slow
def test_the_suite_runs_from_one_command_and_writes_every_section(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the suite's plots need the notebooks extra")
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "run_all.py"),
        "--quick",
        "--inputs",
        "4",
        "--rates",
        "100",
        "--rounds",
        "2",
        "--strategies",
        "local,offload-png,split,split-exit,split-exit-adaptive",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    md = (tmp_path / "suite_small.md").read_text()
    for section in (
        "## 0. Goals",
        "## 1. Strategies",
        "## 2. Ideal vs achieved",
        "## 3. Wire size",
        "## 4. Device-side cost",
        "## 5. Where split + exit wins",
    ):
        assert section in md
    for row in ("split-only (http)", "split-only (stream)", "split + exit + adaptive (stream)"):
        assert f"| {row} |" in md  # both transports' rows, side by side
    assert "split meant to pay (model)" in md and "Splitting is meant to pay" in md
    doc = json.loads((tmp_path / "suite_small.json").read_text())
    assert doc["config"]["rounds"] == 2  # every cell's inputs in two parts, order rotated
    cells = {(c["strategy"], c["transport"], c["rate_mbit"]): c for c in doc["cells"]}
    assert all(c["stats"]["inputs"] == 4 for c in doc["cells"] if c["rate_mbit"] is not None)
    split = ("split", "split-exit", "split-exit-adaptive")
    assert set(cells) == {
        ("local", None, None),  # every local-only run, pooled
        ("local", None, 100.0),  # the one beside the 100 Mbit/s cells
        ("offload-png", None, 100.0),
        *((key, t, 100.0) for key in split for t in ("http", "stream")),
    }
    goals = {g["transport"]: g for g in doc["goals"]}  # adaptive against the fixed ones
    assert set(goals) == {"http", "stream"}
    fixed = {"local", "offload-png", *(f"{k}/{t}" for k in split[:2] for t in goals)}
    for goal in goals.values():
        assert goal["best_fixed"] in fixed
        assert sum(goal["actions"].values()) == 4 and goal["within_5pct"] in (True, False)
        assert goal["split_meant_to_pay"]["pays"] in (True, False)
    meant = {(r["transport"], r["rate_mbit"]) for r in doc["split_pays"]["cells"]}
    assert meant == {("http", 100.0), ("stream", 100.0)}
    ideal = {r["transport"]: r for r in doc["ideal_vs_achieved"] if r["strategy"] == "split"}
    for row in ideal.values():
        assert row["offload_rate"] == 1.0
        off = row["offloaded"]
        assert off["measured_ms"] >= off["floor_ms"] - 1.0  # nothing beats the analytic floor
        assert "link_emulator_ms" in off and "gap_pct_without_emulator" in off
    bare = {(b["transport"], b["rate_mbit"]): b for b in doc["bare_requests"]}
    assert set(bare) == {(t, r) for t in ("http", "stream") for r in (None, 100.0)}
    assert bare[("http", None)]["link_emulator_ms"] is None
    assert bare[("stream", 100.0)]["link_emulator_ms"] is not None
    sent = {r["transport"]: r for r in doc["offload_bytes"]}
    assert sent["stream"]["request_bytes"] < sent["http"]["request_bytes"]  # no HTTP around it
    for png in ("suite_small_latency.png", "suite_small_accuracy_bytes.png"):
        assert (tmp_path / png).stat().st_size > 10_000


@pytest.mark.parametrize(
    "script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")), ids=str
)
def test_every_benchmark_script_imports_and_explains_itself(script: str) -> None:
    """`--help` of each script: what it imports still exists (a refactor elsewhere must not
    leave a benchmark broken until someone runs it), and it writes nothing."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr[-2000:]
