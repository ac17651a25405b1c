"""The throughput benchmark's load generators against the real server on loopback: h2load's
output parsed into answers/s and percentiles, the stream generator's handshake and closed
loop, and errors counted as errors."""

from __future__ import annotations

import shutil

import pytest
from loadgen import h2load_load, parse_h2load, stream_load  # benchmarks/ is on pytest's path
from support import server_settings

from splitexit.protocol.kserve import encode_request
from splitexit.protocol.stream import message_from_frame, session_for

pytestmark = pytest.mark.skipif(
    shutil.which("h2load") is None or shutil.which("taskset") is None,
    reason="needs h2load (nghttp2-client) and taskset",
)


@pytest.fixture(scope="module")
def live(tiny_bundle, module_live_server):
    return module_live_server(server_settings(tiny_bundle), [tiny_bundle])


def frames(tb, n: int) -> list[bytes]:
    x = tb.inputs(n, 0)
    return [tb.frame(x[i : i + 1], 4, 8) for i in range(n)]


def test_h2load_answers_are_counted_and_timed(tiny_bundle, live):
    body, header_length = encode_request(frames(tiny_bundle, 1)[0], None, None)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_length),
    }
    url = f"{live.url}/v2/models/{tiny_bundle.name}/infer"
    load = h2load_load(url, body, headers, 2, 1.0, warmup_s=0.3)
    assert load["errors"] == 0 and load["ok"] == load["requests"] > 0
    assert load["rps"] == pytest.approx(load["ok"] / 1.0)
    assert 0 < load["p50_ms"] <= load["p99_ms"]
    wrong = h2load_load(f"{live.url}/v2/models/nope/infer", body, headers, 1, 0.5, warmup_s=0.1)
    assert wrong["ok"] == 0 and wrong["errors"] > 0 and wrong["p99_ms"] is None


def test_stream_load_runs_the_handshake_and_a_closed_loop(tiny_bundle, live):
    m = tiny_bundle.bundle.manifest
    session = session_for(tiny_bundle.name, m.fingerprint, m.bottleneck.code_shape, [(4, 8)])
    messages = [message_from_frame(f, 0, session) for f in frames(tiny_bundle, 4)]
    url = live.url.replace("http://", "ws://") + f"/v2/models/{tiny_bundle.name}/stream"
    load = stream_load(url, session.encode(), messages, 3, 1.0, warmup_s=0.3)
    assert load["errors"] == 0 and load["ok"] > 0
    assert 0 < load["p50_ms"] <= load["p99_ms"]
    refused = stream_load(url.replace(tiny_bundle.name, "nope"), session.encode(), messages, 2, 0.3)
    assert refused["ok"] == 0 and refused["errors"] == 2  # both streams refused, none hung


def test_output_that_is_not_h2loads_is_an_error():
    with pytest.raises(ValueError, match="not h2load's summary"):
        parse_h2load("connect: Connection refused\n", "", 1.0)
