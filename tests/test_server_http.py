"""The tail server over real HTTP (uvicorn on a loopback port, httpx and tritonclient):
right answers at every operating point, batching without cross-talk across two models,
Server-Timing on answers, every bad input answered with its 4xx while the server stays
healthy, and a client that disconnects mid-body logged in one line and counted apart."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import socket
import time

import httpx
import numpy as np
import pytest
import torch
from support import OPERATING_POINTS, server_settings

from splitexit.bottleneck.quantize import QuantizedTensor, quantize
from splitexit.codec import encode_frame
from splitexit.protocol.kserve import HEADER_LENGTH, build_binary_request, decode_infer_response
from splitexit_server.logs import JsonFormatter

ATOL = 2e-5  # batching changes float summation order a little; answers differ by >1e-3


@pytest.fixture(scope="module")
def bundles(tiny_bundles):
    return tiny_bundles


@pytest.fixture(scope="module")
def live(bundles, module_live_server):
    server = module_live_server(server_settings(*bundles, max_queue_delay_ms=20.0), bundles)
    yield server


@pytest.fixture
def client(live):
    with httpx.Client(base_url=live.url, timeout=10) as c:
        yield c


def infer(client, model, frames, outputs=("class", "probability", "logits"), **kw):
    body, headers = build_binary_request("frame", frames, outputs=outputs, **kw)
    return client.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def answer(response):
    assert response.status_code == 200, response.text
    return decode_infer_response(response.content, response.headers.get(HEADER_LENGTH))


# ------------------------------------------------------------------------ health, metadata


def test_health_and_metadata_endpoints(client, bundles):
    a, _ = bundles
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "splitexit" and "binary_tensor_data" in server["extensions"]
    meta = client.get(f"/v2/models/{a.name}").json()
    assert meta["name"] == a.name
    assert meta["versions"] == [a.fingerprint[:16]]
    assert meta["parameters"]["fingerprint"] == a.fingerprint
    points = {(p["channels"], p["bits"]) for p in meta["parameters"]["operating_points"]}
    assert points == set(OPERATING_POINTS)
    assert [i["name"] for i in meta["inputs"]] == ["frame", "image"]
    assert {o["name"] for o in meta["outputs"]} == {"class", "probability", "logits"}
    version = meta["versions"][0]
    assert client.get(f"/v2/models/{a.name}/versions/{version}").json() == meta
    assert client.get(f"/v2/models/{a.name}/ready").json() == {"name": a.name, "ready": True}
    assert client.get(f"/v2/models/{a.name}/versions/{version}/ready").status_code == 200


def test_unknown_models_and_versions_are_404_with_an_error_body(client, bundles):
    a, _ = bundles
    for path in ("/v2/models/nope", "/v2/models/nope/ready", f"/v2/models/{a.name}/versions/1"):
        r = client.get(path)
        assert r.status_code == 404 and "error" in r.json(), path
    r = infer(client, "nope", [b"x"])
    assert r.status_code == 404 and a.name in r.json()["error"]
    assert client.get("/no/such/route").json() == {"error": "Not Found"}


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize(("k", "bits"), OPERATING_POINTS)
def test_answers_equal_local_head_and_tail(client, bundles, k, bits):
    for i, b in enumerate(bundles):
        frame = b.frame(b.inputs(3, seed=10 * k + bits + i), k, bits)
        local = b.local(frame)
        got = answer(infer(client, b.name, [frame]))
        np.testing.assert_allclose(got["logits"], local.logits.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_array_equal(got["class"], local.prediction.numpy())
        np.testing.assert_allclose(got["probability"], local.probability.numpy(), atol=ATOL)
        assert got["class"].dtype == np.int64 and got["probability"].dtype == np.float32


def test_json_request_with_base64_frames_answers_in_json(client, bundles):
    a, _ = bundles
    frames = [a.frame(a.inputs(1, seed=s), 4, 8) for s in (1, 2)]
    doc = {
        "id": "req-7",
        "inputs": [
            {
                "name": "frame",
                "shape": [2],
                "datatype": "BYTES",
                "data": [base64.b64encode(f).decode() for f in frames],
            }
        ],
    }
    r = client.post(f"/v2/models/{a.name}/infer", json=doc)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == a.name
    assert "model_version" not in body  # not asked for: the URL names no version
    assert [o["name"] for o in body["outputs"]] == ["class", "probability"]  # no logits unasked
    want = [int(a.local(f).prediction[0]) for f in frames]
    assert body["outputs"][0]["data"] == want


def test_image_input_runs_the_whole_model_at_the_best_operating_point(client, bundles):
    from splitexit.preprocess import encode_image

    a, _ = bundles
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (28, 28, 1), dtype=np.uint8)
    png = encode_image(pixels)
    body, headers = build_binary_request("image", [png], outputs=["class", "logits"])
    got = answer(client.post(f"/v2/models/{a.name}/infer", content=body, headers=headers))
    x = a.bundle.preprocess.one(pixels)[None]
    with torch.inference_mode():
        for segment in a.bundle.segments:
            x = segment(x)
    local = a.tail.run_codes([quantize(x, 8, channels=4)])[0]
    np.testing.assert_allclose(got["logits"], local.logits.numpy(), atol=ATOL)


def test_answers_carry_server_timing_in_milliseconds(client, bundles):
    from splitexit_device.client import server_seconds  # what the device reads from it

    a, _ = bundles
    frame = a.frame(a.inputs(1, seed=21), 4, 8)
    start = time.perf_counter()
    r = infer(client, a.name, [frame])
    elapsed_ms = (time.perf_counter() - start) * 1e3
    assert r.status_code == 200, r.text
    timings = {}
    for entry in r.headers["server-timing"].split(","):
        m = re.fullmatch(r"\s*([A-Za-z][\w-]*);dur=(\d+(?:\.\d+)?)\s*", entry)
        assert m, r.headers["server-timing"]
        timings[m[1]] = float(m[2])
    assert set(timings) == {"queue", "compute", "total"}
    assert 0 < timings["total"] <= elapsed_ms
    assert timings["queue"] + timings["compute"] <= timings["total"] + 0.02  # each rounded
    assert server_seconds(r) == pytest.approx(timings["total"] / 1e3)
    version = a.fingerprint[:16]
    body, headers = build_binary_request("frame", [frame], binary_outputs=False)
    r = client.post(f"/v2/models/{a.name}/versions/{version}/infer", content=body, headers=headers)
    assert r.json()["model_version"] == version and "total;dur=" in r.headers["server-timing"]


# -------------------------------------------------------------------------- tritonclient


def test_tritonclient_binary_extension_conformance(live, bundles):
    http = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    a, b = bundles
    client = http.InferenceServerClient(url=live.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(a.name)
        assert client.get_model_metadata(a.name)["name"] == a.name
        frame = a.frame(a.inputs(1, seed=3), 2, 4)
        local = a.local(frame)
        inp = http.InferInput("frame", [1], "BYTES")
        inp.set_data_from_numpy(np.array([frame], dtype=np.object_), binary_data=True)
        outputs = [
            http.InferRequestedOutput("class", binary_data=True),
            http.InferRequestedOutput("logits", binary_data=True),
        ]
        result = client.infer(a.name, [inp], outputs=outputs, request_id="t1")
        assert result.get_response()["id"] == "t1"
        np.testing.assert_array_equal(result.as_numpy("class"), local.prediction.numpy())
        np.testing.assert_allclose(result.as_numpy("logits"), local.logits.numpy(), atol=ATOL)
        result = client.infer(a.name, [inp])  # no outputs named: binary_data_output=true
        np.testing.assert_array_equal(result.as_numpy("class"), local.prediction.numpy())
        assert result.as_numpy("logits") is None
        with pytest.raises(InferenceServerException) as err:
            client.infer(b.name, [inp])
        assert a.fingerprint[:16] in str(err.value) and b.fingerprint in str(err.value)
    finally:
        client.close()


# ---------------------------------------------------------------------------- batching


def test_concurrent_requests_to_two_models_are_batched_without_cross_talk(live, bundles):
    cases = []
    for i in range(48):
        b = bundles[i % 2]
        k, bits = OPERATING_POINTS[i % len(OPERATING_POINTS)]
        frame = b.frame(b.inputs(1 + i % 2, seed=100 + i), k, bits)
        cases.append((b, frame, b.local(frame)))
    logits = [c[2].logits for c in cases]
    assert (
        min((x[0] - y[0]).abs().max().item() for i, x in enumerate(logits) for y in logits[i + 1 :])
        > 50 * ATOL
    ), "test inputs must give distinguishable answers"

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=20) as c:

            async def one(b, frame):
                body, headers = build_binary_request("frame", [frame], outputs=["logits"])
                return await c.post(f"/v2/models/{b.name}/infer", content=body, headers=headers)

            return await asyncio.gather(*(one(b, f) for b, f, _ in cases))

    responses = asyncio.run(main())
    for (_, _, local), r in zip(cases, responses, strict=True):
        np.testing.assert_allclose(answer(r)["logits"], local.logits.numpy(), atol=ATOL, rtol=0)
    metrics = live.state.metrics
    for b in bundles:
        counts = metrics.batch_size.counts(model=b.name)
        assert sum(n for size, n in counts.items() if size > 1) > 0, counts
        inferences = metrics.inference_count.value(model=b.name)
        executions = metrics.execution_count.value(model=b.name)
        assert inferences > executions


def test_metrics_are_valid_prometheus_text(client, bundles):
    parser = pytest.importorskip("prometheus_client.parser")
    infer(client, bundles[0].name, [bundles[0].frame(bundles[0].inputs(1, 1), 1, 8)])
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in parser.text_string_to_metric_families(r.text)}
    for name in (
        "splitexit_inference_requests",
        "splitexit_inference_count",
        "splitexit_inference_exec_count",
        "splitexit_batch_size",
        "splitexit_pending_requests",
        "splitexit_queue_duration_seconds",
        "splitexit_decode_duration_seconds",
        "splitexit_compute_duration_seconds",
        "splitexit_request_duration_seconds",
        "splitexit_received_bytes",
        "splitexit_frames",
    ):
        assert name in families, name
    mix = {
        (s.labels["channels"], s.labels["bits"])
        for s in families["splitexit_frames"].samples
        if s.labels["model"] == bundles[0].name
    }
    assert ("1", "8") in mix


# --------------------------------------------------------------------------- bad input


def _frame_with(a, **changes):
    """A valid frame of bundle `a`, then re-encoded with `changes` to its tensor or stamp."""
    qt = quantize(a.head.run(a.inputs(1, 5), exits=False).z, 8, channels=4)
    fields = {"values": qt.values, "scale": qt.scale, "zero_point": qt.zero_point}
    fields.update({k: v for k, v in changes.items() if k in fields})
    fp = changes.get("fingerprint", a.fingerprint)
    channels = changes.get("channels", 4)
    return encode_frame(QuantizedTensor(**fields, bits=8, channels=channels), fp)


def _bad_cases(a, b):
    good = a.frame(a.inputs(1, 9), 4, 8)
    corrupted = bytearray(good)
    corrupted[-1] ^= 0xFF
    bomb = bytearray(good)
    bomb[20:24] = (0xFFFF).to_bytes(2, "little") * 2  # H = W = 65535: a huge claimed size
    many = a.frame(a.inputs(9, 9), 4, 8)  # 9 samples > max_batch_size 8
    wide = _frame_with(a, values=torch.zeros((1, 5, 4, 4), dtype=torch.uint8), channels=5)
    return [
        ("garbage body", b"\x00garbage", {}, 400, "not valid JSON"),
        ("garbage frame", None, {"frame": b"not a frame at all"}, 400, "bad frame"),
        ("truncated frame", None, {"frame": good[:-5]}, 400, "bad frame"),
        ("corrupted frame", None, {"frame": bytes(corrupted)}, 400, "crc32"),
        ("bomb frame", None, {"frame": bytes(bomb)}, 400, "refused before decompressing"),
        ("too many samples", None, {"frame": many}, 400, "outside 1..8"),
        ("wrong code shape", None, {"frame": wide}, 400, "expects C=4"),
        ("other bundle's frame", None, {"frame": b.frame(b.inputs(1, 9), 4, 8)}, 409, b.name),
        ("unknown fingerprint", None, {"frame": _frame_with(a, fingerprint="ab" * 32)}, 409,
         a.fingerprint),
        ("not an image", None, {"image": b"\x89PNG broken"}, 400, "image"),
        ("wrong content type", json.dumps({"inputs": []}).encode(),
         {"content-type": "text/plain"}, 415, "Content-Type"),
        ("compressed body", json.dumps({"inputs": []}).encode(),
         {"content-type": "application/json", "content-encoding": "gzip"}, 415, "Encoding"),
    ]  # fmt: skip


def test_bad_inputs_get_their_4xx_and_the_server_stays_healthy(client, bundles):
    a, b = bundles
    for what, body, extra, status, match in _bad_cases(a, b):
        if body is None:
            ((name, element),) = extra.items()
            body, headers = build_binary_request(name, [element])
        else:
            headers = extra
        r = client.post(f"/v2/models/{a.name}/infer", content=body, headers=headers)
        assert r.status_code == status, (what, r.text)
        error = r.json()["error"]
        assert match in error, (what, error)
        assert "Traceback" not in r.text and 'File "' not in r.text
    assert client.get("/v2/health/ready").status_code == 200
    good = a.frame(a.inputs(1, 1), 4, 8)
    np.testing.assert_array_equal(answer(infer(client, a.name, [good]))["class"],
                                  a.local(good).prediction.numpy())  # fmt: skip


def test_fingerprint_mismatch_names_both_fingerprints(client, bundles):
    a, b = bundles
    r = infer(client, a.name, [b.frame(b.inputs(1, 2), 4, 8)])
    assert r.status_code == 409
    error = r.json()["error"]
    assert b.fingerprint[:16] in error and a.fingerprint in error


def test_request_deadline_from_the_timeout_parameter_gives_504(client, bundles):
    a, _ = bundles
    body, headers = build_binary_request("frame", [a.frame(a.inputs(1, 1), 4, 8)])
    doc = json.loads(body[: int(headers[HEADER_LENGTH])])
    doc["parameters"]["timeout"] = 1  # 1 µs: gone before the 20 ms batching window closes
    head = json.dumps(doc).encode()
    binary = body[int(headers[HEADER_LENGTH]) :]
    r = client.post(
        f"/v2/models/{a.name}/infer",
        content=head + binary,
        headers={**headers, HEADER_LENGTH: str(len(head))},
    )
    assert r.status_code == 504 and "deadline" in r.json()["error"]
    assert client.get("/v2/health/ready").status_code == 200


def test_request_id_is_echoed_or_made_up(client):
    assert (
        client.get("/v2/health/live", headers={"X-Request-ID": "dev-42"}).headers["x-request-id"]
        == "dev-42"
    )
    made_up = client.get("/v2/health/live", headers={"X-Request-ID": "bad id\twith space"})
    assert len(made_up.headers["x-request-id"]) == 32
    r = client.post("/v2/models/nope/infer", content=b"{}")
    assert r.status_code == 404 and r.headers["x-request-id"]


def test_a_client_gone_mid_body_is_logged_in_one_line_and_counted_apart(
    live, client, bundles, caplog
):
    a, _ = bundles
    metrics = live.state.metrics
    route = {"route": "/v2/models/{name}/infer", "method": "POST"}
    errors, gone = (metrics.http_requests.value(**route, code=c) for c in (500, 499))
    outcome = metrics.requests.value(model=a.name, outcome="client_disconnect")
    caplog.set_level(logging.INFO, logger="server")
    body, headers = build_binary_request("frame", [a.frame(a.inputs(1, 1), 4, 8)])
    host, port = live.url.removeprefix("http://").rsplit(":", 1)
    head = f"POST /v2/models/{a.name}/infer HTTP/1.1\r\nHost: {host}\r\nX-Request-ID: gone-1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(body) + 1000}\r\n\r\n"  # 1000 bytes never come
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + body)
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    while metrics.http_requests.value(**route, code=499) == gone:  # counted after the log line
        assert time.monotonic() < deadline, "the server never noticed the client leave"
        time.sleep(0.02)
    assert metrics.requests.value(model=a.name, outcome="client_disconnect") == outcome + 1
    assert metrics.http_requests.value(**route, code=500) == errors
    assert 'outcome="client_disconnect"' in client.get("/metrics").text
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "gone-1"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO  # its access log line only
    doc = json.loads(JsonFormatter().format(lines[0]))
    assert doc["path"] == f"/v2/models/{a.name}/infer" and doc["status"] == 499
    assert doc["client_disconnect"] is True and "exception" not in doc
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text
    assert client.get("/v2/health/ready").status_code == 200
    good = a.frame(a.inputs(1, 2), 4, 8)
    np.testing.assert_array_equal(
        answer(infer(client, a.name, [good]))["class"], a.local(good).prediction.numpy()
    )
