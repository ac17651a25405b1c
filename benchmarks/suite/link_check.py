"""What the link emulator itself adds: the instrument's share of the "network" gap.

    raw TCP client ─ LinkEmulator(RATE:RTT) ─► Responder (reads `up` bytes, answers `down`)
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
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from splitexit.cost import Link
from splitexit.link import LOOPBACK, LinkEmulator, LinkSpec


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

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while head := _read(conn, 4):
                if not _read(conn, int.from_bytes(head, "big")):
                    return
                conn.sendall(answer)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()


def _read(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def _exchanges_ms(port: int, up: int, down: int, n: int, gap_s: float) -> float:
    """Mean ms of n exchanges (after 3 warm-ups) on one connection to `port`."""
    message = (max(up, 4) - 4).to_bytes(4, "big") + b"q" * (max(up, 4) - 4)
    times = []
    with socket.create_connection((LOOPBACK, port), timeout=30) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(n + 3):
            time.sleep(gap_s)
            start = time.perf_counter()
            conn.sendall(message)
            if len(_read(conn, down)) != down:
                raise ConnectionError("the responder closed the connection")
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.mean(times)


def link_cost(
    spec: LinkSpec | str, up: float, down: float, *, n: int = 30, gap_s: float = 0.010
) -> LinkCost:
    """Time `n` raw exchanges of `up` / `down` bytes through a LinkEmulator at `spec` and
    straight to the responder."""
    link = spec if isinstance(spec, LinkSpec) else LinkSpec.parse(spec)
    up, down = max(round(up), 4), max(round(down), 1)
    with responder(down) as port:
        direct = _exchanges_ms(port, up, down, n, gap_s)
        with LinkEmulator((LOOPBACK, port), link) as emulator:
            through = _exchanges_ms(emulator.port, up, down, n, gap_s)
    wire = 0.0 if link.rate_bps is None else 1e3 * Link(link.rate_bps, 0.0).transfer_s(up + down)
    return LinkCost(through, direct, wire, link.rtt_s * 1e3)
