"""The benchmark suite runs from its one command and writes every section it promises; the
link emulator's own cost is measured against a raw exchange, never below the link's floor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from suite.link_check import link_cost  # benchmarks/ is on pytest's pythonpath (pyproject)

ROOT = Path(__file__).resolve().parents[1]


def test_a_raw_exchange_through_the_emulator_pays_rtt_and_bytes_and_little_more() -> None:
    cost = link_cost("1mbit:10ms", 1000, 500, n=5)
    assert cost.wire_ms == pytest.approx(1500 * 8 / 1e6 * 1e3)
    assert cost.rtt_ms == 10.0
    assert cost.through_ms >= cost.rtt_ms + cost.wire_ms  # a link is never early
    assert 0 < cost.direct_ms < cost.through_ms
    assert cost.excess_ms < 10.0  # loose: a loaded machine wakes threads late


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
    doc = json.loads((tmp_path / "suite_small.json").read_text())
    cells = {(c["strategy"], c["rate_mbit"]): c for c in doc["cells"]}
    assert set(cells) == {
        ("local", None),
        ("offload-png", 100.0),
        ("split", 100.0),
        ("split-exit", 100.0),
        ("split-exit-adaptive", 100.0),
    }
    (goal,) = doc["goals"]  # the adaptive run against the fixed ones, with what it did
    assert goal["best_fixed"] in ("local", "offload-png", "split", "split-exit")
    assert sum(goal["actions"].values()) == 4 and goal["within_5pct"] in (True, False)
    split = next(r for r in doc["ideal_vs_achieved"] if r["strategy"] == "split")
    assert split["offload_rate"] == 1.0
    off = split["offloaded"]
    assert off["measured_ms"] >= off["floor_ms"] - 1.0  # nothing beats the analytic floor
    assert "link_emulator_ms" in off and "gap_pct_without_emulator" in off
    bare = {b["rate_mbit"]: b for b in doc["bare_requests"]}
    assert bare[None]["link_emulator_ms"] is None and bare[100.0]["link_emulator_ms"] is not None
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
