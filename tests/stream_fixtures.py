"""Helpers for the stream's device tests (this module holds no tests).

* `FaultStreamServer`: a tiny app whose stream misbehaves on purpose (garbage answers, a
  close instead of every other answer, "busy", silence, a refused fingerprint), on a
  loopback port, with metadata that offers the stream.
* `ProcessServer`: the real `splitexit-server` in its own process (to SIGSTOP or SIGTERM it).
* `stream_agent`: an Agent offloading through a StreamClient.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from device_fixtures import DeviceBundle, ListWriter, UvicornThread, free_port
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from splitexit.protocol.stream import (
    CLOSE_FINGERPRINT,
    SUBPROTOCOL,
    Accepted,
    Failure,
    Session,
    encode_answer,
    encode_failure,
    read_message,
)
from splitexit_device.agent import Agent, AgentConfig
from splitexit_device.client import ClientConfig, OffloadClient
from splitexit_device.stream import StreamClient, StreamConfig, bundle_session


def stream_agent(
    url: str,
    tb: DeviceBundle,
    config: AgentConfig,
    stream: StreamConfig | None = None,
    log: Any = None,
    timing: bool = False,
    **client: Any,
) -> tuple[Agent, ListWriter, StreamClient]:
    http = OffloadClient(url, tb.name, ClientConfig(**client))
    c = StreamClient(http, bundle_session(tb.load(), tb.name, timing=timing), stream, log=log)
    writer = ListWriter()
    agent = Agent(tb.load(), config, c, writer=writer, log=log)  # type: ignore[arg-type]
    return agent, writer, c


class FaultStreamServer:
    """Modes: ok (real answers from the tail), garbage (bytes that are no answer), flaky
    (closes the connection instead of answering every other message), busy ("busy",
    Retry-After `retry_after`), stall (never answers), refuse (4409 at the handshake),
    mute_once (the first connection never answers its handshake, the others are ok).
    `messages` and `connections` count what came in."""

    def __init__(self, mode: str, tb: DeviceBundle, *, retry_after: float = 1.0) -> None:
        self.mode = mode
        self.tb = tb
        self.retry_after = retry_after
        self.messages = 0
        self.connections = 0
        self._uv = UvicornThread(self._app())

    @property
    def url(self) -> str:
        return self._uv.url

    def __enter__(self) -> FaultStreamServer:
        self._uv.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._uv.stop()

    def _app(self) -> FastAPI:
        app = FastAPI()
        tb = self.tb

        @app.get("/v2/health/ready")
        async def ready() -> JSONResponse:
            return JSONResponse({"ready": True})

        @app.get("/v2/models/{model}")
        async def meta(model: str) -> JSONResponse:
            stream = {"path": f"/v2/models/{model}/stream", "version": 1}
            params = {"fingerprint": tb.bundle.fingerprint, "stream": stream}
            return JSONResponse({"name": tb.name, "parameters": params})

        @app.websocket("/v2/models/{model}/stream")
        async def stream(ws: WebSocket, model: str) -> None:
            await ws.accept(subprotocol=SUBPROTOCOL)
            self.connections += 1
            session = Session.decode(await ws.receive_text())
            if self.mode == "mute_once" and self.connections == 1:
                await asyncio.sleep(30)
            if self.mode == "refuse":
                text = f"fingerprint {session.fingerprint[:16]} is not {'f' * 16}"
                await ws.send_text(encode_failure(Failure(None, "rejected", text)))
                await ws.close(CLOSE_FINGERPRINT, text)
                return
            await ws.send_text(Accepted(64, 10, session.max_message_bytes).encode())
            try:
                while True:
                    data = await ws.receive_bytes()
                    self.messages += 1
                    if not await self._answer(ws, session, data):
                        return
            except WebSocketDisconnect:
                return

        return app

    async def _answer(self, ws: WebSocket, session: Session, data: bytes) -> bool:
        mid, frame = read_message(data, session)
        if self.mode == "garbage":
            await ws.send_bytes(b"\xff\xfe\xfd\xfc\xfb")
        elif self.mode == "flaky" and self.messages % 2 == 1:
            await ws.close(1011, "injected failure")
            return False
        elif self.mode == "busy":
            failure = Failure(mid, "busy", "overloaded", self.retry_after)
            await ws.send_text(encode_failure(failure))
        elif self.mode == "stall":
            await asyncio.sleep(30)
        else:
            a = self.tb.tail.run_frames([frame])[0]
            answer = encode_answer(
                mid, session, 10, a.prediction.numpy(), a.probability.numpy(), a.logits.numpy()
            )
            await ws.send_bytes(answer)
        return True


class ProcessServer:
    """`python -m splitexit_server.cli` serving `bundle` on a free loopback port, own process."""

    def __init__(self, bundle: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-W",
            "ignore",
            "-m",
            "splitexit_server.cli",
            "--bundle",
            str(bundle),
        ]
        # admission control off in effect (a cold batch on a loaded machine must not be shed):
        # these tests are about faults; test_server_admission covers shedding
        cmd += ["--port", str(self.port), "--log-level", "warning"]
        cmd += ["--queue-delay-target-ms", "10000", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITEXIT_SERVER_")}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env)

    def __enter__(self) -> ProcessServer:
        deadline = time.monotonic() + 90
        while True:
            assert self.proc.poll() is None, "the server process died"
            try:
                if httpx.get(f"{self.url}/v2/health/ready", trust_env=False).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
