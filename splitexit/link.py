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
import asyncio
import contextlib
import math
import re
import threading
import time
from dataclasses import dataclass

LOOPBACK = "127.0.0.1"
_READ_BYTES = 64 * 1024
_MIN_SLICE = 1460  # one Ethernet TCP segment
_QUEUE_SLICES = 1024
_LOOKAHEAD_S = 0.005  # the transmitter reserves the link this far ahead of time
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


def parse_link(text: str) -> LinkSpec:
    """`LinkSpec.parse`: "5mbit:20ms" -> LinkSpec(rate_bps=5e6, rtt_s=0.02)."""
    return LinkSpec.parse(text)


class _Shaper:
    """One direction of the link: a token bucket shared by every connection, plus delay."""

    def __init__(self, link: LinkEmulator) -> None:
        self._link = link
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

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

    async def start_async(self) -> LinkEmulator:
        """Start listening on the running event loop (use `start` for a background thread)."""
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop_async(self) -> None:
        """Stop listening and close every proxied connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    def start(self, timeout_s: float = 10.0) -> LinkEmulator:
        """Run the proxy in a daemon thread with its own event loop; returns once listening."""
        if self._thread is not None:
            raise RuntimeError("this LinkEmulator is already running")
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as e:  # reported to the starting thread
                error.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.stop_async())
                loop.close()

        self._thread = threading.Thread(target=run, name="splitexit-link", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"the link emulator did not start within {timeout_s} s")
        if error:
            self._thread = None
            raise error[0]
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the background thread started by `start` (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = None

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        host, port = self.target
        return f"LinkEmulator({self.host}:{self.port} -> {host}:{port}, {self.spec})"

    # ------------------------------------------------------------------------- proxying

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        server_w: asyncio.StreamWriter | None = None
        try:
            try:
                server_r, server_w = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the target is down: close the client's connection, like a dead link
            pipes = {
                asyncio.create_task(self._pipe(client_r, server_w, self.up)),
                asyncio.create_task(self._pipe(server_r, client_w, self.down)),
            }
            try:
                pending = pipes
                while pending:  # one direction may end (half-close) while the other goes on
                    done, pending = await asyncio.wait(pending, return_when="FIRST_COMPLETED")
                    if any(t.cancelled() or t.exception() is not None for t in done):
                        break  # a reset or a failed write: tear the connection down
            finally:
                for t in pipes:
                    t.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # stop_async: end quietly, the connection closes below
        finally:
            for w in (client_w, server_w):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaper: _Shaper
    ) -> None:
        """Copy one direction through the link; half-closes the writer at EOF.

        reader ─ wire queue ─ transmit (the shared link, at its rate now) ─ air queue
               ─ deliver (RTT/2 after it was sent) ─ writer
        """
        wire: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE_SLICES)
        air: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def transmit() -> None:
            while (data := await wire.get()) is not None:
                sent = shaper.transmit(len(data), time.monotonic())
                await air.put((sent + self.spec.rtt_s / 2, data))
                # take the next slice shortly before this one is out: a rate change applies
                # within _LOOKAHEAD_S, and a late wake-up does not idle the link
                wait = sent - _LOOKAHEAD_S - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            await air.put(None)

        async def deliver() -> None:
            while (item := await air.get()) is not None:
                at, data = item
                delay = at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        me = asyncio.current_task()
        assert me is not None
        stages = [asyncio.create_task(transmit()), asyncio.create_task(deliver())]
        for stage in stages:  # a failed write ends this pipe, even while it waits on a queue
            stage.add_done_callback(lambda t: t.cancelled() or t.exception() is None or me.cancel())
        try:
            while data := await reader.read(_READ_BYTES):
                step = shaper.slice_size()
                for i in range(0, len(data), step):
                    await wire.put(data[i : i + step])
            await wire.put(None)
            await asyncio.gather(*stages)
        finally:
            for stage in stages:
                stage.cancel()
            await asyncio.gather(*stages, return_exceptions=True)


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
    link = LinkEmulator(args.target, args.spec, port=args.port)

    async def serve() -> None:
        await link.start_async()
        print(f"link {link.spec}: {link.url} -> {args.target} (Ctrl-C stops)", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await link.stop_async()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
