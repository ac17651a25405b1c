"""Server settings and the `splitexit-server` command: defaults < environment < flags, clear
errors for bad values, and a server that refuses to start on a bundle failing verification."""

from __future__ import annotations

import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest

from splitexit.errors import ConfigError
from splitexit_server import cli, settings
from splitexit_server.settings import ENV_PREFIX, Settings


def test_defaults_are_safe():
    s = Settings()
    assert s.host == "127.0.0.1" and s.auth_token is None
    assert s.max_body_bytes <= 16 * 2**20 and s.max_queue_size > 0 and s.warmup


def test_environment_variables_are_parsed_by_type():
    env = {
        f"{ENV_PREFIX}BUNDLES": "/m/a:/m/b,/m/c",
        f"{ENV_PREFIX}MAX_BATCH_SIZE": "64",
        f"{ENV_PREFIX}MAX_QUEUE_DELAY_MS": "0.5",
        f"{ENV_PREFIX}IMAGES": "off",
        f"{ENV_PREFIX}THREADS": "2",
        f"{ENV_PREFIX}AUTH_TOKEN": "tok",
    }
    s = Settings.from_env(env)
    assert s.bundles == (Path("/m/a"), Path("/m/b"), Path("/m/c"))
    assert (s.max_batch_size, s.max_queue_delay_s, s.images) == (64, 0.0005, False)
    assert s.threads == 2 and s.auth_token == "tok"
    assert s.public()["auth_token"] == "***"


def test_text_overrides_are_parsed_like_variables_and_unknown_names_refused():
    """What `serve run splitexit_server.ray_serve:app key=value` passes."""
    s = Settings.from_env({}, bundles="/m/a,/m/b", max_batch_size="8", images="off")
    assert (s.bundles, s.max_batch_size, s.images) == ((Path("/m/a"), Path("/m/b")), 8, False)
    with pytest.raises(ConfigError, match="no server setting is called 'max_batch'"):
        Settings.from_env({}, max_batch=8)


def test_every_setting_is_parsed_as_its_annotated_type():
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        assert f.metadata["parser"].type == hints[f.name], f.name


def test_the_old_torch_threads_name_still_works_and_warns_once(monkeypatch):
    monkeypatch.setattr(settings, "_warned", set())
    with pytest.warns(FutureWarning, match="torch_threads .* is deprecated: use threads") as seen:
        from_env = Settings.from_env({f"{ENV_PREFIX}TORCH_THREADS": "3"})
        args = cli.build_parser().parse_args(["--bundle", "x", "--torch-threads", "5"])
        from_flag = cli.settings_from_args(args, environ={})
    assert (from_env.threads, from_flag.threads) == (3, 5)
    assert len([w for w in seen if issubclass(w.category, FutureWarning)]) == 1
    new_wins = Settings.from_env({f"{ENV_PREFIX}TORCH_THREADS": "3", f"{ENV_PREFIX}THREADS": "4"})
    assert new_wins.threads == 4
    with pytest.raises(ConfigError, match=f"{ENV_PREFIX}TORCH_THREADS='many' is not a valid int"):
        Settings.from_env({f"{ENV_PREFIX}TORCH_THREADS": "many"})


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({f"{ENV_PREFIX}PORT": "eighty"}, f"{ENV_PREFIX}PORT"),
        ({f"{ENV_PREFIX}WARMUP": "maybe"}, "1/0, true/false"),
        ({f"{ENV_PREFIX}MAX_BATCH_SIZE": "0"}, "max_batch_size must be >= 1"),
        ({f"{ENV_PREFIX}LOG_LEVEL": "loud"}, "log_level must be one of"),
        (
            {f"{ENV_PREFIX}MAX_QUEUE_DELAY_MS": "80"},
            "queue_delay_target_ms .50. must exceed max_queue_delay_ms .80.",
        ),
        ({f"{ENV_PREFIX}REQUEST_TIMEOUT_S": "0"}, "request_timeout_s must be > 0"),
    ],
)
def test_bad_values_are_refused_with_the_reason(env, match):
    with pytest.raises(ConfigError, match=match):
        Settings.from_env(env)


def test_flags_beat_environment(monkeypatch):
    monkeypatch.setenv(f"{ENV_PREFIX}MAX_BATCH_SIZE", "64")
    monkeypatch.setenv(f"{ENV_PREFIX}PORT", "9000")
    args = cli.build_parser().parse_args(["--bundle", "x", "--max-batch-size", "4", "--no-images"])
    s = cli.settings_from_args(args)
    assert (s.max_batch_size, s.port, s.images, s.bundles) == (4, 9000, False, (Path("x"),))


def test_token_comes_from_a_file_not_a_flag(tmp_path):
    token = tmp_path / "token"
    token.write_text("abc\n")
    args = cli.build_parser().parse_args(["--bundle", "x", "--auth-token-file", str(token)])
    assert cli.settings_from_args(args, environ={}).auth_token == "abc"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--auth-token", "abc"])


def test_help_lists_every_setting_and_the_protocol(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--bundle",
        "--max-batch-size",
        "--max-queue-delay-ms",
        "--max-queue-size",
        "--max-body-bytes",
        "--request-timeout-s",
        "--auth-token-file",
        "--log-level",
        "--host",
        "--port",
        "--drain-s",
        "--check",
        "/v2/models/NAME/infer",
        ENV_PREFIX,
    ):
        assert flag in out, flag  # fmt: skip


def test_no_bundle_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.delenv(f"{ENV_PREFIX}BUNDLES", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2 and "--bundle" in capsys.readouterr().err


def test_check_verifies_bundles_and_refuses_tampered_ones(tmp_path, capsys, tiny_bundle):
    a = tiny_bundle
    assert cli.main(["--bundle", str(a.path), "--check", "--log-level", "warning"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == {"model": a.name, "fingerprint": a.fingerprint}

    bad = tmp_path / "tampered"
    shutil.copytree(a.path, bad)
    tail = bad / "tail.pt"
    data = bytearray(tail.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tail.write_bytes(bytes(data))
    assert cli.main(["--bundle", str(bad), "--log-level", "warning"]) == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err and "tail.pt" in err and "sha256" in err


def test_the_command_serves_logs_json_and_drains_on_sigterm(tmp_path, tiny_bundle):
    """The real `splitexit-server` process: JSON log lines carrying request ids, and SIGTERM
    turns readiness to 503 during the drain, then the process exits."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    a = tiny_bundle
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-W", "ignore", "-m", "splitexit_server.cli", "--bundle", str(a.path)]
    cmd += ["--port", str(port), "--drain-s", "1", "--no-warmup", "--max-batch-size", "4"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert httpx.get(f"{url}/v2/health/live", headers={"X-Request-ID": "probe-1"}).is_success
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503  # draining, still up
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert lines, log.read_text()
    # the access line; not the drain's, which carries the id too when SIGTERM lands while
    # that request's task is still logging it (the signal handler runs in its context)
    access = [
        ln for ln in lines if ln.get("request_id") == "probe-1" and ln["logger"] == "server.access"
    ]
    assert access and access[0]["path"] == "/v2/health/live" and access[0]["status"] == 200
    assert any("draining" in ln["message"] for ln in lines)
