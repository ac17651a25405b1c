"""The tail server the strategies talk to: `splitexit-server` as its own process, on loopback.

    run_all ─ tail_server(bundle) ─ splitexit.demo.tail_server ─ `splitexit_server.cli` :port
                                        ▲
    strategies ─ link_process(127.0.0.1:port, "RATE:20ms") ─────┘   (one process per rate)

The link emulator runs as its own process (`python -m splitexit.link`), one per link setting:
in the agent's process its delivery threads, which spin to the due time holding the GIL, would
slow the agent down, and a real device shares its process with no network. With `--cpus`
(the default on two or more cores) the suite's own process, the device, runs on one core and
the server and the link emulator on another: a real device shares its CPU with neither.

The server is started as a user would start it, with its default batching (the waits of a
lone device's requests gather nobody, and the batcher stops waiting after a few), one
runtime thread (the device side gets the other core), warnings-only logs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

from splitexit.demo import free_port
from splitexit.demo import tail_server as demo_tail_server
from splitexit.link import LOOPBACK
from splitexit.processes import server_process, wait_until

SERVER_ENV = {
    "SPLITEXIT_SERVER_THREADS": "1",
    "SPLITEXIT_SERVER_LOG_LEVEL": "warning",
}


@contextlib.contextmanager
def environ(changes: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_cpus(text: str) -> tuple[int, int] | None:
    """`--cpus` DEVICE,SERVER, "auto" (the first two usable cores, when there are two or more)
    or "none": (device core, server core), or None for no pinning. ValueError if bad."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if text == "none":
        return None
    if text == "auto":
        return (usable[0], usable[1]) if len(usable) >= 2 else None
    parts = text.split(",")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
        raise ValueError(f"--cpus takes DEVICE,SERVER (two core numbers), auto or none: {text!r}")
    device, server = (int(x) for x in parts)
    if device == server or device not in usable or server not in usable:
        raise ValueError(f"--cpus {text}: two different cores of the usable {usable}")
    return device, server


def pin_device(cpus: tuple[int, int] | None) -> set[int] | None:
    """Pin this process, the device, to its core (call before any thread starts: threads
    inherit it); returns the server's cores for `tail_server` and `link_process` (None: no
    pinning)."""
    if cpus is None:
        return None
    os.sched_setaffinity(0, {cpus[0]})
    return {cpus[1]}


@contextlib.contextmanager
def tail_server(bundle: Path, log: Path, cpus: Collection[int] | None = None) -> Iterator[str]:
    """`splitexit-server` for `bundle` on a free loopback port with SERVER_ENV (on `cpus` if
    given); yields its URL once ready, stops it (SIGTERM, then SIGKILL) when the block ends."""
    with contextlib.ExitStack() as stack:
        with environ(SERVER_ENV):  # read by the server process when it starts
            url = stack.enter_context(demo_tail_server(bundle, free_port(), log, cpus=cpus))
        yield url


@contextlib.contextmanager
def link_process(
    target: str,
    spec: str,
    log: Path,
    timeout_s: float = 30.0,
    cpus: Collection[int] | None = None,
) -> Iterator[str]:
    """`python -m splitexit.link spec --target target` as its own process on a free loopback
    port (on `cpus` if given); yields its URL once it accepts connections, stops it when the
    block ends."""
    port = free_port()
    cmd = [sys.executable, "-m", "splitexit.link", spec, "--target", target, "--port", str(port)]

    def accepts() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 1.0):
            return True
        return False

    with (
        log.open("ab") as out,
        server_process(cmd, stdout=out, stderr=subprocess.STDOUT, cpus=cpus) as proc,
    ):
        wait_until(accepts, proc, log, timeout_s, f"the link emulator ({spec})", 0.05)
        yield f"http://{LOOPBACK}:{port}"
