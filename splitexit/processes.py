"""Servers run as child processes: each in its own process group, stopped as a whole.

A server may fork workers (uvicorn, LitServe, `ip netns exec`) that outlive a signal sent to
their parent alone. `server_process` starts the command as the leader of a new session, so of
a new process group, and however the block ends (normally, an error, Ctrl-C, or SIGTERM made
`SystemExit` by the caller) stops the whole group: SIGTERM, a bounded wait, then SIGKILL.

    with server_process(cmd, stdout=log_file) as proc:
        wait_ready(f"{url}/v2/health/ready", proc, log)
        ...                                     # the group is gone after the block
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import SplitexitError

__all__ = ["server_process", "stop_group", "wait_ready"]


@contextlib.contextmanager
def server_process(
    cmd: Sequence[str],
    *,
    stop_timeout_s: float = 20.0,
    cpus: Collection[int] | None = None,
    **popen: Any,
) -> Iterator[subprocess.Popen[bytes]]:
    """`subprocess.Popen(cmd, **popen)` in a new process group for the block; the group is
    stopped (`stop_group`) when the block ends, however it ends. `cpus`: the cores it runs
    on (set as it starts, so the threads it makes inherit them; Linux)."""
    proc = subprocess.Popen(list(cmd), start_new_session=True, **popen)
    try:
        if cpus is not None:
            os.sched_setaffinity(proc.pid, set(cpus))
        yield proc
    finally:
        stop_group(proc, stop_timeout_s)


def stop_group(proc: subprocess.Popen[Any], timeout_s: float = 20.0) -> None:
    """SIGTERM the process group `proc` leads and wait for it; SIGKILL what of the group is
    left after `timeout_s` (+ 5 s for its workers); wait (bounded) until none of it is left."""
    group = proc.pid  # start_new_session: the leader's pid names its group
    _signal_group(group, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)
    if not _group_gone(group, 5.0):  # the leader hung, or its workers did
        _signal_group(group, signal.SIGKILL)
        proc.wait()
        if not _group_gone(group, 5.0):
            print(f"warning: processes of group {group} outlived SIGKILL", file=sys.stderr)


def wait_ready(url: str, proc: subprocess.Popen[Any], log: Path, timeout_s: float = 180.0) -> None:
    """Poll `url` until it answers 200; raise `SplitexitError` (with the end of `log`) if
    `proc` exits first, or once `timeout_s` has passed."""
    import httpx

    with httpx.Client(timeout=2.0, trust_env=False) as client:

        def ready() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return client.get(url).status_code == 200
            return False

        wait_until(ready, proc, log, timeout_s)


def wait_until(
    ready: Callable[[], bool],
    proc: subprocess.Popen[Any],
    log: Path,
    timeout_s: float = 180.0,
    what: str = "the server",
    interval_s: float = 0.2,
) -> None:
    """Call `ready` every `interval_s` until it is true; raise `SplitexitError` (with the end
    of `log`) if `proc` exits first, or once `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise SplitexitError(f"{what} exited with status {proc.returncode}:\n{tail}")
        if ready():
            return
        time.sleep(interval_s)
    raise SplitexitError(f"{what} was not ready after {timeout_s:.0f} s; see {log}")


def _signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def _group_gone(group: int, timeout_s: float) -> bool:
    """True once no process is left in `group` (within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def exit_on_sigterm() -> None:
    """Make SIGTERM raise `SystemExit(143)` in the main thread, so that every `server_process`
    block unwinds and stops its group (Python's default for SIGTERM exits without unwinding)."""

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)
