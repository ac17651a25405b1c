"""`splitexit-device run`: the exit status and messages a user (or systemd) acts on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.device import DeviceBundle
from support import interrupt_agent

from splitexit.demo import free_port
from splitexit_device.cli import EXIT_OK, EXIT_SERVER, agent_config, build_parser, main
from splitexit_device.config import AgentConfig


def run(tb: DeviceBundle, *args: str) -> int:
    return main(["run", "--bundle", str(tb.path), "--no-progress", *args])


def test_help_explains_sources_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for words in ("--deadline-ms", "--accuracy-floor", "--local-only", "camera:N", "exit status"):
        assert words in text
    assert "--probe-interval-ms" in text and "--explore-ms" in text


def test_local_only_writes_records_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device_bundle
) -> None:
    tb = device_bundle
    out, summary = tmp_path / "out" / "records.jsonl", tmp_path / "summary.json"
    code = run(device_bundle,
        "--local-only", "--source", str(tb.folder), "--limit", "25",
        "--out", str(out), "--summary-json", str(summary),
    )  # fmt: skip
    assert code == EXIT_OK
    lines = out.read_text().splitlines()
    assert len(lines) == 25 and all(json.loads(line)["class"] is not None for line in lines)
    assert json.loads(summary.read_text())["inputs"] == 25
    err = capsys.readouterr().err
    assert "summary" in err and "accuracy" in err


def test_offloads_through_an_emulated_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], device_bundle, tail_server
) -> None:
    tb = device_bundle
    out = tmp_path / "r.jsonl"
    srv = tail_server(tb.path)
    code = run(device_bundle,
        "--server", srv.url, "--source", str(tb.folder), "--limit", "30",
        "--link", "20mbit:2ms", "--policy", "fixed", "--channels", "4", "--bits", "4",
        "--out", str(out),
    )  # fmt: skip
    assert code == EXIT_OK
    records = [json.loads(line) for line in out.read_text().splitlines()]
    offloaded = [r for r in records if r["decided_by"] == "server"]
    assert offloaded and all((r["channels"], r["bits"]) == (4, 4) for r in offloaded)
    assert "emulated link 20mbit:2ms" in capsys.readouterr().err


def test_a_server_with_another_bundle_exits_3_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], device_bundle, fault_server
) -> None:
    tb = device_bundle
    srv = fault_server("ok", tb, fingerprint="ab" * 32)
    assert run(device_bundle, "--server", srv.url, "--source", str(tb.folder)) == EXIT_SERVER
    err = capsys.readouterr().err
    assert "fingerprint abababababababab" in err and "--local-only" in err


def test_no_server_exits_3_and_says_what_to_do(
    capsys: pytest.CaptureFixture[str], device_bundle
) -> None:
    tb = device_bundle
    url = f"http://127.0.0.1:{free_port()}"
    assert (
        run(device_bundle, "--server", url, "--source", str(tb.folder), "--retries", "0")
        == EXIT_SERVER
    )
    assert "start the tail server" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["--source", "x"],  # no --server, not --local-only
        ["--local-only", "--source", "x", "--threshold", "layer1"],
        ["--local-only", "--source", "x", "--policy", "greedy"],
        ["--server", "127.0.0.1:8000", "--source", "x"],  # no scheme
        ["--server", "ftp://tail:8000", "--source", "x"],
        ["--server", "http://tail:99999", "--source", "x"],
    ],
)
def test_bad_usage_exits_2(args: list[str], device_bundle) -> None:
    with pytest.raises(SystemExit) as e:
        run(device_bundle, *args)
    assert e.value.code == 2


def test_probe_and_explore_flags_reach_the_agent_config_in_seconds() -> None:
    def config(*args: str) -> AgentConfig:
        return agent_config(
            build_parser().parse_args(["run", "--bundle", "b", "--source", "x", *args])
        )

    default = config()
    assert default.probe_interval_s == AgentConfig().probe_interval_s
    assert default.explore_s == AgentConfig().explore_s
    given = config("--probe-interval-ms", "250", "--explore-ms", "0")
    assert given.probe_interval_s == 0.25 and given.explore_s == 0.0


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--probe-interval-ms", "-1", "--probe-interval-ms must be >= 0"),
        ("--probe-interval-ms", "nan", "--probe-interval-ms must be >= 0"),
        ("--explore-ms", "-5", "--explore-ms must be >= 0"),
        ("--explore-ms", "soon", "invalid float value: 'soon'"),
        ("--window", "0", "window must be >= 1"),  # AgentConfig's own check, same path
    ],
)
def test_a_bad_agent_setting_exits_2_with_one_line_naming_it(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str], device_bundle
) -> None:
    with pytest.raises(SystemExit) as e:
        run(device_bundle, "--local-only", "--source", "x", flag, value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_a_missing_source_is_an_error_not_a_traceback(
    capsys: pytest.CaptureFixture[str], device_bundle
) -> None:
    assert run(device_bundle, "--local-only", "--source", "/nonexistent/images") == 1
    assert "does not exist" in capsys.readouterr().err


def test_ctrl_c_answers_what_was_taken_prints_the_summary_and_exits_130(
    tmp_path: Path, device_bundle, fault_server
) -> None:
    """A real process and a real SIGINT, while frames wait on a stalled server."""
    tb = device_bundle
    srv = fault_server("stall", tb)
    args = [
        "--bundle", str(tb.path), "--server", srv.url, "--source", str(tb.folder),
        "--timeout-ms", "20000", "--budget-ms", "20000", "--no-progress", "--policy", "fixed",
    ]  # fmt: skip
    code, err, records = interrupt_agent(args, tmp_path / "records.jsonl", lambda: srv.attempts)
    assert code == 130
    assert "stopping" in err and "summary" in err
    assert records and len({r["id"] for r in records}) == len(records)
    assert any(r["reason"] == "interrupted" for r in records)
    assert len(records) < len(tb.images)


def test_the_systemd_unit_runs_a_valid_command_line() -> None:
    import shlex
    import shutil
    import subprocess

    from splitexit_device.cli import build_parser

    unit = Path(__file__).parent.parent / "device" / "splitexit-device.service"
    text = unit.read_text()
    exec_start = text.split("ExecStart=", 1)[1].split("\n#", 1)[0].replace("\\\n", " ")
    argv = shlex.split(exec_start.splitlines()[0])
    assert argv[0].endswith("/splitexit-device")
    env = {"${SPLITEXIT_DEADLINE_MS}": "100"}
    args = build_parser().parse_args([env.get(a, a) for a in argv[1:]])
    assert args.command == "run" and args.deadline_ms == 100 and args.progress is False
    assert "SuccessExitStatus=130" in text and "RestartPreventExitStatus=2" in text
    if shutil.which("systemd-analyze"):
        check = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        problems = [
            line
            for line in (check.stdout + check.stderr).splitlines()
            if line.strip() and "is not executable" not in line
        ]
        assert not problems, problems
