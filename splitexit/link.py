"""A link emulator on loopback: a TCP proxy that limits bandwidth and adds delay, no root needed.

    client ─► 127.0.0.1:port ─ up: token bucket(rate) ─ + RTT/2 ─► target
    client ◄─────────────── down: token bucket(rate) ─ + RTT/2 ◄─ target

Each direction is one shared link: every connection's bytes queue through the same token
bucket, so concurrent requests share the bandwidth as on a real link. A chunk of n bytes
leaves the bucket when the link has had time to serialize it (n * 8 / rate seconds after
the previous one; `burst_bytes` of credit may accumulate while idle, 0 by default, so even a
small request pays its serialization delay) and is delivered RTT/2 later. Chunks are cut
at about 1 ms of link time (at least 1460 bytes), so data flows while a big transfer is
still arriving. Rate and RTT can change at runtime (`set`), e.g. to emulate a link that
degrades and recovers; a new rate applies to the bytes not yet sent (within 5 ms).

It runs on plain threads and blocking sockets (an accept thread, then per connection and
direction a transmit and a deliver thread), not asyncio: a delivery sleeps until shortly
before its time and spins the rest (`sleep_until`), where an event loop's timers fire
late, and would add that lateness to every delivery of every round trip. Half-closes pass
through (EOF one way is delivered, the other way goes on); a reset or a failed write closes
the connection both ways; a dead target closes the client's.

Use it from tests, the demo and benchmarks::

    with LinkEmulator(("127.0.0.1", server_port), "5mbit:20ms") as link:
        ... talk to link.url ...
        link.set(rate_bps=100e3, rtt_s=0.05)

or from a shell: `python -m splitexit.link 5mbit:20ms --target 127.0.0.1:8000 --port 8001`.
It measures what an application sees over a shaped link; it is not `tc netem` (no loss,
no jitter, no kernel queues).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
_READ_BYTES = 64 * 1024
_MIN_SLICE = 1460  # one Ethernet TCP segment
_QUEUE_SLICES = 1024  # slices in flight per direction of a connection
_CONNECT_TIMEOUT_S = 30.0
_LOOKAHEAD_S = 0.005  # the transmitter reserves the link this far ahead of time
_SPIN_S = 0.0005  # a delivery's last stretch is spun, not slept (timed waits wake up late)
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_RATE_RE = re.compile(_NUMBER + r"\s*([a-z]+)")
_TIME_RE = re.compile(_NUMBER + r"\s*([a-z]*)")


@dataclass(frozen=True)
class LinkSpec:
    """A link: `rate_bps` bits per second each way (None: unlimited) and round-trip time."""

    rate_bps: float | None
    rtt_s: float = 0.0

    def __post_init__(self) -> None:
        if self.rate_bps is not None and not (self.rate_bps > 0 and math.isfinite(self.rate_bps)):
            raise ValueError(f"rate must be a positive number of bit/s, got {self.rate_bps}")
        if not (self.rtt_s >= 0 and math.isfinite(self.rtt_s)):
            raise ValueError(f"rtt must be >= 0 seconds, got {self.rtt_s}")

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """Parse "RATE[:RTT]", e.g. "5mbit:20ms", "100kbit:50ms", "1gbit:0ms", "unlimited:5ms".

        Rates take tc's bit units (bit, kbit, mbit, gbit; k = 1000); RTT takes us, ms or s
        (a bare number is milliseconds). Raises ValueError with the accepted forms.
        """
        rate_text, _, rtt_text = text.strip().lower().partition(":")
        rate: float | None
        if rate_text in ("unlimited", "inf", "none"):
            rate = None
        else:
            m = _RATE_RE.fullmatch(rate_text)
            if m is None or m.group(2) not in _RATE_UNITS:
                raise ValueError(
                    f"cannot read the rate {rate_text!r} in link spec {text!r}: use a number with "
                    f"one of {sorted(_RATE_UNITS)} (bits per second, like tc), e.g. '5mbit:20ms'"
                )
            rate = float(m.group(1)) * _RATE_UNITS[m.group(2)]
        rtt = 0.0
        if rtt_text:
            m = _TIME_RE.fullmatch(rtt_text)
            unit = m.group(2) if m else ""
            if m is None or (unit and unit not in _TIME_UNITS):
                raise ValueError(
                    f"cannot read the RTT {rtt_text!r} in link spec {text!r}: use a number with "
                    f"one of {sorted(_TIME_UNITS)}, e.g. '5mbit:20ms'"
                )
            rtt = float(m.group(1)) * _TIME_UNITS[unit or "ms"]
        return cls(rate, rtt)

    def __str__(self) -> str:
        if self.rate_bps is None:
            rate = "unlimited"
        else:
            unit = next(
                u for u in ("gbit", "mbit", "kbit", "bit") if self.rate_bps >= _RATE_UNITS[u]
            )
            rate = f"{self.rate_bps / _RATE_UNITS[unit]:g}{unit}"
        return f"{rate}:{self.rtt_s * 1e3:g}ms"


def sleep_until(at: float, wake: threading.Event | None = None) -> bool:
    """Sleep until `time.monotonic()` reaches `at`; True if `wake` was set first.

    A timed wait wakes up late on a busy or virtual machine (the CPU halts while idle), so
    it ends _SPIN_S early and the rest is spun: the caller resumes just after `at`. Deliveries
    and the benchmarks' slowed-down device use it.
    """
    delay = at - _SPIN_S - time.monotonic()
    if delay > 0:
        if wake is None:
            time.sleep(delay)
        elif wake.wait(delay):
            return True
    while time.monotonic() < at:
        pass
    return wake is not None and wake.is_set()


def parse_link(text: str) -> LinkSpec:
    """`LinkSpec.parse`: "5mbit:20ms" -> LinkSpec(rate_bps=5e6, rtt_s=0.02)."""
    return LinkSpec.parse(text)


class _Shaper:
    """One direction of the link: a token bucket shared by every connection, plus delay."""

    def __init__(self, link: LinkEmulator) -> None:
        self._link = link
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the link has serialized everything scheduled so far
        self.bytes = 0

    def slice_size(self) -> int:
        rate = self._link.spec.rate_bps
        if rate is None:
            return _READ_BYTES
        return max(_MIN_SLICE, min(_READ_BYTES, int(rate / 8 * 1e-3)))

    def transmit(self, n: int, now: float) -> float:
        """Reserve the link for n bytes from now on; returns when they are all sent."""
        spec = self._link.spec
        with self._lock:
            self.bytes += n
            if spec.rate_bps is None:
                return now
            credit = self._link.burst_bytes * 8 / spec.rate_bps
            self._free_at = max(self._free_at, now - credit) + n * 8 / spec.rate_bps
            return max(self._free_at, now)


class LinkEmulator:
    """A loopback TCP proxy to `target` that shapes both directions (see the module docstring).

    Args:
        target: (host, port) or "host:port" of the server behind the link.
        spec: a `LinkSpec` or its text form ("5mbit:20ms").
        port: port to listen on, on 127.0.0.1 (0: any free port; read `.port`).
        burst_bytes: token-bucket depth: bytes that may pass at once after idle time.
    """

    def __init__(
        self,
        target: tuple[str, int] | str,
        spec: LinkSpec | str = "unlimited:0ms",
        *,
        port: int = 0,
        host: str = LOOPBACK,
        burst_bytes: int = 0,
    ) -> None:
        if isinstance(target, str):
            thost, _, tport = target.rpartition(":")
            target = (thost or LOOPBACK, int(tport))
        self.target = (target[0], int(target[1]))
        self.spec = spec if isinstance(spec, LinkSpec) else LinkSpec.parse(spec)
        if burst_bytes < 0:
            raise ValueError(f"burst_bytes must be >= 0, got {burst_bytes}")
        self.burst_bytes = burst_bytes
        self.host = host
        self.port = port
        self.up = _Shaper(self)
        self.down = _Shaper(self)
        self.connections = 0
        self._lock = threading.RLock()  # guards the fields below
        self._listener: socket.socket | None = None
        self._stopping = False
        self._conns: set[_Connection] = set()
        self._threads: set[threading.Thread] = set()

    # ------------------------------------------------------------------------ control

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port>: point an HTTP client here instead of at the target."""
        return f"http://{self.host}:{self.port}"

    def set(self, rate_bps: float | str | None = None, rtt_s: float | None = None) -> None:
        """Change the link now (thread-safe): a spec string, or rate (bit/s) and/or RTT (s).

        `rate_bps=float("inf")` lifts the bandwidth limit; arguments left out keep their value.
        """
        if isinstance(rate_bps, str):
            self.spec = LinkSpec.parse(rate_bps)
            return
        rate = self.spec.rate_bps if rate_bps is None else rate_bps
        if rate is not None and math.isinf(rate):
            rate = None
        self.spec = LinkSpec(rate, self.spec.rtt_s if rtt_s is None else rtt_s)

    def start(self) -> LinkEmulator:
        """Listen and serve from daemon threads; returns once listening."""
        with self._lock:
            if self._listener is not None:
                raise RuntimeError("this LinkEmulator is already running")
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            listener = socket.create_server((self.host, self.port), family=family, backlog=128)
            self.port = listener.getsockname()[1]
            self._listener = listener
            self._stopping = False
            self._spawn(self._accept, "accept", listener)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the listener and every proxied connection, join the threads (idempotent)."""
        with self._lock:
            listener, self._listener = self._listener, None
            if listener is None:
                return
            self._stopping = True
            conns = list(self._conns)
        _shutdown(listener)  # wakes the accept thread
        for conn in conns:
            conn.abort()
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                threads = [t for t in self._threads if t is not threading.current_thread()]
            left = deadline - time.monotonic()
            if not threads or left <= 0:
                break
            threads[0].join(left)
        listener.close()

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        host, port = self.target
        return f"LinkEmulator({self.host}:{self.port} -> {host}:{port}, {self.spec})"

    # ------------------------------------------------------------------------- proxying

    def _spawn(self, fn: Callable[..., None], name: str, *args: object) -> None:
        """Run fn(*args) in a daemon thread that `stop` joins."""

        def run() -> None:
            try:
                fn(*args)
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name=f"splitexit-link-{name}", daemon=True)
        with self._lock:  # started before `stop` can see it, listed before it can end
            self._threads.add(thread)
            thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                with self._lock:
                    if self._stopping:
                        return
                time.sleep(0.01)  # a transient error (a connection aborted, out of fds)
                continue
            with self._lock:
                if self._stopping:
                    client.close()
                    return
                self.connections += 1
                conn = _Connection(self, client, self.connections)
                self._conns.add(conn)
            self._spawn(conn.run, f"{conn.number}-connect")

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)


def _shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)


class _Direction:
    """One way through one connection, two threads and a queue between them.

    src ─ transmit (recv, cut, reserve the shared link at its rate now) ─ air queue
        ─ deliver (RTT/2 after it was sent; shutdown(SHUT_WR) at EOF) ─ dst
    """

    def __init__(self, src: socket.socket, dst: socket.socket, shaper: _Shaper) -> None:
        self.src, self.dst, self.shaper = src, dst, shaper
        self.air: deque[tuple[float, bytes] | None] = deque()  # (deliver at, data); None: EOF
        self.cond = threading.Condition()


class _Connection:
    """A proxied connection: per direction, a transmit thread and a deliver thread."""

    def __init__(self, link: LinkEmulator, client: socket.socket, number: int) -> None:
        self.link, self.client, self.number = link, client, number
        self.server: socket.socket | None = None
        self.closed = threading.Event()  # torn down (a reset, a failed write, stop)
        self._lock = threading.Lock()
        self._running = 0  # pipe threads still running; the last one closes the sockets
        self._ways: list[_Direction] = []

    def run(self) -> None:
        """Connect to the target, then start the four pipe threads."""
        link = self.link
        try:
            self.server = socket.create_connection(link.target, timeout=_CONNECT_TIMEOUT_S)
            self.server.settimeout(None)
            for sock in (self.client, self.server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.closed.set()  # the target is down: close the client's connection
        with self._lock:
            if not self.closed.is_set():
                assert self.server is not None
                self._ways = [
                    _Direction(self.client, self.server, link.up),
                    _Direction(self.server, self.client, link.down),
                ]
                self._running = 4
        if not self._ways:
            self._close()
            return
        for way, name in zip(self._ways, ("up", "down"), strict=True):
            link._spawn(self._transmit, f"{self.number}-{name}-transmit", way)
            link._spawn(self._deliver, f"{self.number}-{name}-deliver", way)

    def abort(self) -> None:
        """Tear the connection down both ways; the pipe threads wake up and end."""
        with self._lock:
            self.closed.set()
            socks = [s for s in (self.client, self.server) if s is not None]
            ways = list(self._ways)
        for sock in socks:
            _shutdown(sock)  # unblocks recv and sendall; the last thread out closes
        for way in ways:
            with way.cond:
                way.cond.notify_all()

    def _transmit(self, way: _Direction) -> None:
        """Read, cut into ~1 ms slices, reserve the shared link, queue for delivery."""
        try:
            while data := way.src.recv(_READ_BYTES):
                step = way.shaper.slice_size()
                for i in range(0, len(data), step):
                    if not self._send(way, data[i : i + step]):
                        return
            with way.cond:
                way.air.append(None)  # EOF: half-close once everything is delivered
                way.cond.notify_all()
        except OSError:
            self.abort()  # a reset
        finally:
            self._done()

    def _send(self, way: _Direction, data: bytes) -> bool:
        with way.cond:
            while len(way.air) >= _QUEUE_SLICES and not self.closed.is_set():
                way.cond.wait()
            if self.closed.is_set():
                return False
            sent = way.shaper.transmit(len(data), time.monotonic())
            way.air.append((sent + self.link.spec.rtt_s / 2, data))
            way.cond.notify_all()
        # take the next slice shortly before this one is out: a rate change applies
        # within _LOOKAHEAD_S, and a late wake-up does not idle the link
        wait = sent - _LOOKAHEAD_S - time.monotonic()
        return not (wait > 0 and self.closed.wait(wait))

    def _deliver(self, way: _Direction) -> None:
        """Hand each slice to dst at its delivery time; half-close dst at EOF."""
        try:
            while True:
                with way.cond:
                    while not way.air and not self.closed.is_set():
                        way.cond.wait()
                    if self.closed.is_set():
                        return
                    item = way.air.popleft()
                    way.cond.notify_all()  # room for the transmitter
                if item is None:
                    way.dst.shutdown(socket.SHUT_WR)
                    return
                at, data = item
                if sleep_until(at, self.closed):
                    return
                way.dst.sendall(data)
        except OSError:
            self.abort()  # a failed write
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self._close()

    def _close(self) -> None:
        for sock in (self.client, self.server):
            if sock is not None:
                _shutdown(sock)
                sock.close()
        self.link._forget(self)


def main(argv: list[str] | None = None) -> int:
    """`python -m splitexit.link RATE:RTT --target HOST:PORT [--port PORT]`."""
    parser = argparse.ArgumentParser(
        prog="python -m splitexit.link",
        description="Loopback link emulator: a TCP proxy with a bandwidth limit and added RTT.",
    )
    parser.add_argument("spec", help="link as RATE[:RTT], e.g. 5mbit:20ms, 100kbit:50ms")
    parser.add_argument("--target", required=True, help="HOST:PORT of the server behind the link")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: free)")
    args = parser.parse_args(argv)
    with LinkEmulator(args.target, args.spec, port=args.port) as link:
        print(f"link {link.spec}: {link.url} -> {args.target} (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
