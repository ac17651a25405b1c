"""`splitexit demo` end to end: server and agent as processes, a report, nothing left running."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitexit.demo import run_demo
from splitexit.errors import SplitexitError


def test_demo_answers_every_input_reports_and_stops_the_server(tmp_path, capsys) -> None:
    status = run_demo(limit=120, out=tmp_path, link="20mbit:5ms")
    assert status == 0
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == 120 and len({r["id"] for r in records}) == 120
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["inputs"] == 120
    answered = summary["offloaded"] + sum(summary["exits"].values()) + summary["tail_here"]
    assert answered + summary["fallbacks"] + summary["errors"] == 120  # each input once
    assert summary["accuracy"] > 0.8  # the shipped, trained bundle
    report = (tmp_path / "report.md").read_text()
    assert "accuracy" in report and "link 20mbit:5ms" in report and "B to send the PNG" in report
    assert report in capsys.readouterr().out
    # the server was stopped gracefully (SIGTERM, drained), not killed
    log = (tmp_path / "server.log").read_text()
    assert "Application shutdown complete" in log and "Finished server process" in log


def test_demo_refuses_a_data_path_that_is_not_a_folder(tmp_path) -> None:
    with pytest.raises(SplitexitError, match="not a folder"):
        run_demo(data=tmp_path / "missing", out=tmp_path, local_only=True)


def test_demo_command_has_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "splitexit", "demo", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--link" in out.stdout and "--accuracy-floor" in out.stdout
