"""The tail server the strategies talk to: `splitexit-server` as its own process, on loopback.

    run_all ─ tail_server(bundle) ─ splitexit.demo.tail_server ─ `splitexit_server.cli` :port
                                        ▲
    strategies ─ LinkEmulator(127.0.0.1:port, "RATE:20ms").url ─┘   (one per track, re-set per rate)

The server is started as a user would start it, with settings suited to measuring latency
one input at a time: no batching wait (a lone request never gains from it), one torch
thread (the device side gets the other core), warnings-only logs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from splitexit.demo import free_port
from splitexit.demo import tail_server as demo_tail_server

SERVER_ENV = {
    "SPLITEXIT_SERVER_MAX_QUEUE_DELAY_MS": "0",
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


@contextlib.contextmanager
def tail_server(bundle: Path, log: Path) -> Iterator[str]:
    """`splitexit-server` for `bundle` on a free loopback port with SERVER_ENV; yields its URL
    once ready, stops it (SIGTERM, then SIGKILL) when the block ends."""
    with contextlib.ExitStack() as stack:
        with environ(SERVER_ENV):  # read by the server process when it starts
            url = stack.enter_context(demo_tail_server(bundle, free_port(), log))
        yield url
