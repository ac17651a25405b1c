"""A server started with `server_process` is stopped whole: its workers too, however the
block ends, SIGKILL for what ignores SIGTERM."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from splitexit.demo import free_port
from splitexit.errors import SplitexitError
from splitexit.processes import server_process, wait_ready

#: A "server" that forks a worker, writes the worker's pid, and sleeps.
FORKING = """\
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(worker.pid))
time.sleep(120)
"""


def running(pid: int) -> bool:
    """True while `pid` exists and is no zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(path: Path, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return path.read_text()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process state from /proc")
def test_a_failing_block_stops_the_server_and_the_worker_it_forked(tmp_path: Path) -> None:
    pidfile = tmp_path / "worker.pid"
    cmd = [sys.executable, "-c", FORKING, str(pidfile)]
    with pytest.raises(RuntimeError), server_process(cmd) as proc:
        worker = int(wait_for(pidfile))
        assert running(worker)
        raise RuntimeError("the benchmark failed")
    assert proc.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 10
    while running(worker):  # signalled with its group; reaped by whoever adopted it
        assert time.monotonic() < deadline, "the forked worker outlived its server"
        time.sleep(0.05)


def test_a_server_ignoring_sigterm_is_killed_after_the_wait(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1], 'w').write('1'); time.sleep(120)"
    )
    start = time.monotonic()
    with server_process([sys.executable, "-c", code, str(ready)], stop_timeout_s=0.5) as proc:
        wait_for(ready)
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 30


def test_a_server_that_exits_before_ready_is_one_error_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    code = "import sys; print('no bundle at /nowhere', file=sys.stderr); sys.exit(2)"
    with (
        log.open("w") as out,
        server_process([sys.executable, "-c", code], stderr=out) as proc,
        pytest.raises(SplitexitError, match="status 2") as err,
    ):
        wait_ready(f"http://127.0.0.1:{free_port()}/v2/health/ready", proc, log)
    assert "no bundle at /nowhere" in str(err.value)
    assert proc.poll() == 2


#: A "benchmark" that starts FORKING with `server_process` and waits, SIGTERM made SystemExit.
TERMINATED = f"""\
import sys, time
from splitexit.processes import exit_on_sigterm, server_process
exit_on_sigterm()
with server_process([sys.executable, "-c", {FORKING!r}, sys.argv[1]]):
    time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process state from /proc")
def test_sigterm_to_the_caller_stops_its_servers_on_the_way_out(tmp_path: Path) -> None:
    import subprocess

    pidfile = tmp_path / "worker.pid"
    caller = subprocess.Popen([sys.executable, "-c", TERMINATED, str(pidfile)])
    worker = int(wait_for(pidfile))
    caller.send_signal(signal.SIGTERM)
    assert caller.wait(30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while running(worker):
        assert time.monotonic() < deadline, "SIGTERM to the caller left its server's worker"
        time.sleep(0.05)
