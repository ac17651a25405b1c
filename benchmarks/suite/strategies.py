"""The strategies a user could pick, each run over the same inputs, one input at a time.

    local-only    preprocess ─ head segments ─ tail (float code), all on the device
    full offload  encode JPEG-95 / PNG ─ POST `image` ─► server: decode ─ whole model
    split-*       the device agent (`device.Agent`) itself, posting `frame`s (`split_runs`)

Every run is closed-loop: the next input arrives GAP_S after the previous one is answered,
so a latency is that of an input alone on the link (no queueing behind earlier ones), which
is what the analytic floor describes, and every strategy idles between inputs alike (compute
right after an idle spell runs with cold caches; back-to-back, local compute would run
hot, faster than a device that waits for its camera). Each input's latency runs from its
pixels in memory to its answer on the device; the gap is not part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import httpx
import torch

from splitexit.bundle import Bundle
from splitexit.preprocess import encode_image
from splitexit.protocol.kserve import (
    CONTENT_TYPE,
    HEADER_LENGTH,
    ProtocolError,
    decode_response,
    encode_request,
)
from splitexit_device.client import (
    request_wire_bytes,
    response_wire_bytes,
    server_timings,
    timing_total,
)
from splitexit_device.http import fetch, http_transport, timeouts

from .device_side import DeviceClock, TimedPreprocess
from .inputs import Inputs
from .samples import Sample

GAP_S = 0.010  # an input arrives this long after the previous answer, in every strategy


@dataclass(frozen=True)
class Strategy:
    """One strategy: its key, its label in tables and plots, and how it runs."""

    key: str
    label: str
    kind: str  # "local", "image" or "split"
    image_format: str | None = None
    quality: int = 95
    exits: bool = True
    policy: str = "fixed"


STRATEGIES = (
    Strategy("local", "local-only", "local"),
    Strategy("offload-jpeg95", "full offload, JPEG q95", "image", "jpeg", 95),
    Strategy("offload-png", "full offload, PNG", "image", "png"),
    Strategy("split", "split-only", "split", exits=False),
    Strategy("split-exit", "split + exit", "split"),
    Strategy("split-exit-adaptive", "split + exit + adaptive", "split", policy="adaptive"),
)
BY_KEY = {s.key: s for s in STRATEGIES}
TRANSPORTS = ("http", "stream")  # how a split strategy offloads: KServe v2 over HTTP, the stream


def cell_name(key: str, transport: str | None = None) -> str:
    """What names a (strategy, transport) in results: the key, "/transport" for a split one."""
    return key if transport is None else f"{key}/{transport}"


def label(name: str) -> str:
    """A cell name's label in tables and plots, e.g. "split + exit (stream)"."""
    key, _, transport = name.partition("/")
    return BY_KEY[key].label + (f" ({transport})" if transport else "")


# ------------------------------------------------------------------------------- local


@torch.inference_mode()
def run_local(
    bundle: Bundle, inputs: Inputs, speed: float = 1.0, gap_s: float = GAP_S
) -> list[Sample]:
    """The whole model on the device: head segments, then the tail on the float code z."""
    clock = DeviceClock(speed)
    pre = TimedPreprocess(bundle.preprocess, clock)
    out = []
    for i in range(len(inputs)):
        time.sleep(gap_s)
        start = time.perf_counter()
        f = pre(inputs.pixels[i][None])
        for segment in bundle.segments:
            f = clock.timed("head", segment, f)
        logits = clock.timed("tail", bundle.tail, f)
        total = (time.perf_counter() - start) * 1e3
        pred = int(logits.argmax(dim=1)[0])
        out.append(
            Sample(
                inputs.id(i),
                total,
                pred == int(inputs.labels[i]),
                "device",
                device_ms=clock.entries[-1],
            )
        )
    return out


# ------------------------------------------------------------------------ full offload


def image_request(
    url: str, model: str, data: bytes, request_id: str, timeout_s: float = 10.0
) -> httpx.Request:
    """The `image` inference request, built by the agent's own request encoder, with the
    agent's headers, and sent on the agent's transport
    (`splitexit_device.http.http_transport`): both baselines pay the same HTTP overhead."""
    body, n = encode_request(data, input_name="image")
    headers = {
        HEADER_LENGTH: str(n),
        "Content-Type": CONTENT_TYPE,
        "X-Request-ID": request_id,
    }
    return httpx.Request(
        "POST",
        f"{url.rstrip('/')}/v2/models/{model}/infer",
        content=body,
        headers=headers,
        extensions={"timeout": timeouts(timeout_s)},
    )


async def run_full_offload(
    model: str,
    inputs: Inputs,
    url: str,
    strategy: Strategy,
    *,
    speed: float = 1.0,
    timeout_s: float = 10.0,
    gap_s: float = GAP_S,
) -> list[Sample]:
    """Encode each image on the device, send it as the `image` input, the server does the rest."""
    assert strategy.image_format is not None
    clock = DeviceClock(speed)
    out = []
    transport = http_transport()
    try:
        for i in range(min(2, len(inputs))):  # open the connection, warm the server's path
            data = encode_image(inputs.pixels[i], strategy.image_format, strategy.quality)
            with contextlib.suppress(httpx.HTTPError):
                await fetch(transport, image_request(url, model, data, f"warmup-{i}", timeout_s))
        for i in range(len(inputs)):
            await asyncio.sleep(gap_s)
            start = time.perf_counter()
            clock.begin()
            data = clock.timed(
                "image_encode",
                encode_image,
                inputs.pixels[i],
                strategy.image_format,
                strategy.quality,
            )
            request = image_request(url, model, data, f"bench-{i:06d}", timeout_s)
            sent = time.perf_counter()
            pred, response_bytes, timing = None, 0, {}
            with contextlib.suppress(httpx.HTTPError, ProtocolError):
                response = await fetch(transport, request)
                response_bytes = response_wire_bytes(response)
                timing = server_timings(response)
                if response.status_code == 200:
                    pred = decode_response(response.content, response.headers).prediction
            done = time.perf_counter()
            total_s = timing_total(timing)
            server_ms = None if total_s is None else total_s * 1e3
            out.append(
                Sample(
                    inputs.id(i),
                    (done - start) * 1e3,
                    pred == int(inputs.labels[i]),
                    "server" if pred is not None else "error",
                    None,
                    len(data),
                    request_wire_bytes(request),
                    response_bytes,
                    (done - sent) * 1e3 - (server_ms or 0.0),
                    clock.entries[-1],
                    server_ms,
                    timing["compute"] * 1e3 if "compute" in timing else None,
                )
            )
    finally:
        await transport.aclose()
    return out
