"""What the link emulator itself adds: the instrument's share of the "network" gap.

    raw TCP client ─ link_process(RATE:RTT) ─► Responder (reads `up` bytes, answers `down`)
    raw TCP client ──────────────────────────► Responder                  (no emulator)

Both exchanges move exactly a request's and a response's bytes with no HTTP, no server and
no agent, one at a time after the same idle gap as the strategies. The emulator's own cost
is the first round trip less the second, less bytes x 8 / rate and the RTT it was told to
add: proxy threads waking up, two more loopback hops. A real link has no proxy in the middle,
so this part of the measured gap is the measurement's, not the framework's.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from splitexit.cost import Link
from splitexit.link import LOOPBACK, LinkSpec

from .services import link_process


@dataclass(frozen=True)
class LinkCost:
    """Mean ms of a raw exchange through the emulator and straight, and the emulator's own
    excess beyond bytes x 8 / rate + RTT."""

    through_ms: float
    direct_ms: float
    wire_ms: float
    rtt_ms: float

    @property
    def excess_ms(self) -> float:
        return self.through_ms - self.direct_ms - self.wire_ms - self.rtt_ms


@contextlib.contextmanager
def responder(down: int) -> Iterator[int]:
    """A loopback TCP server that answers every `up`-byte message (the first 4 bytes say how
    many follow) with `down` bytes; yields its port."""
    listener = socket.create_server((LOOPBACK, 0))
    answer = b"a" * down

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer_messages, args=(conn, answer), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def answer_messages(conn: socket.socket, answer: bytes) -> None:
    """Answer every message on `conn` (4 bytes saying how many follow, then those) with
    `answer`, until the peer closes; then close `conn`."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while head := read_exact(conn, 4):
            if not read_exact(conn, int.from_bytes(head, "big")):
                return
            conn.sendall(answer)


def read_exact(conn: socket.socket, n: int) -> bytes:
    """`n` bytes from `conn`, or b"" if it closes first."""
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def exchanges_ms(host: str, port: int, up: int, down: int, n: int, gap_s: float) -> float:
    """Mean ms of n exchanges (after 3 warm-ups) on one connection to `host:port`: `up`
    bytes out, `down` bytes back, `gap_s` apart."""
    message = (max(up, 4) - 4).to_bytes(4, "big") + b"q" * (max(up, 4) - 4)
    times = []
    with socket.create_connection((host, port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(n + 3):
            time.sleep(gap_s)
            start = time.perf_counter()
            conn.sendall(message)
            if len(read_exact(conn, down)) != down:
                raise ConnectionError("the responder closed the connection")
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.mean(times)


def link_cost(
    spec: LinkSpec | str,
    up: float,
    down: float,
    *,
    n: int = 30,
    gap_s: float = 0.010,
    cpus: Collection[int] | None = None,
) -> LinkCost:
    """Time `n` raw exchanges of `up` / `down` bytes through a LinkEmulator at `spec` (on
    `cpus` if given, as in the suite) and straight to the responder."""
    link = spec if isinstance(spec, LinkSpec) else LinkSpec.parse(spec)
    up, down = max(round(up), 4), max(round(down), 1)
    with responder(down) as port:
        direct = exchanges_ms(LOOPBACK, port, up, down, n, gap_s)
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "link.log"
            with link_process(f"{LOOPBACK}:{port}", str(link), log, cpus=cpus) as url:
                through = exchanges_ms(LOOPBACK, int(url.rsplit(":", 1)[1]), up, down, n, gap_s)
    wire = 0.0 if link.rate_bps is None else 1e3 * Link(link.rate_bps, 0.0).transfer_s(up + down)
    return LinkCost(through, direct, wire, link.rtt_s * 1e3)
