"""Schemathesis, driven by the server's own /openapi.json, finds no 5xx: valid and invalid
requests to every documented operation get an answer or a 4xx, never a server error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import server_settings

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES = 150  # bounded: about 10 s on two shared cores
#: Each fuzzing test: EXAMPLES cases, no deadline (a loaded machine), no example database.
fuzzed = settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module")
def live(tiny_bundle, module_live_server):
    a = tiny_bundle
    server = module_live_server(server_settings(a, max_body_bytes=256 * 1024), [a])
    yield server


def cases(live) -> st.SearchStrategy:
    """Requests from the server's own schema: valid ones and ones that break it."""
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    return st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )


def test_openapi_documents_the_inference_protocol(live):
    import httpx

    doc = httpx.get(f"{live.url}/openapi.json").json()
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    assert {"200", "400", "409", "413", "429", "503", "504"} <= set(infer["responses"])
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/metrics"):
        assert path in doc["paths"]


def test_generated_requests_never_get_a_5xx(live):
    seen: dict[int, int] = {}

    @fuzzed
    @given(case=cases(live))
    def check(case):
        response = case.call(base_url=live.url, timeout=10)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, response.text[:500])
        if response.status_code >= 400:
            assert "Traceback" not in response.text

    check()
    print("status codes seen:", seen)
    assert any(code < 300 for code in seen) and any(400 <= code < 500 for code in seen), seen
    assert live.state.ready


def test_every_status_answered_is_documented_and_invalid_requests_are_refused(live):
    """Schemathesis' own checks: each answer's status is one the schema documents for that
    operation, and a request that breaks the schema is never accepted."""
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import negative_data_rejection, status_code_conformance

    checks = [not_a_server_error, status_code_conformance, negative_data_rejection]

    @fuzzed
    @given(case=cases(live))
    def check(case):
        response = case.call(base_url=live.url, timeout=10)
        case.validate_response(response, checks=checks)

    check()


def test_the_two_mismatches_found_by_fuzzing_are_gone(live):
    """octet-stream without Inference-Header-Content-Length was documented and answered 415
    (now 400, a bad request, as documented); `shape: []` was allowed and answered 400 (now
    the schema asks for 1..8 dimensions)."""
    import httpx

    doc = httpx.get(f"{live.url}/openapi.json").json()
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    request = infer["requestBody"]["content"]["application/json"]["schema"]
    shape = request["properties"]["inputs"]["items"]["properties"]["shape"]
    assert shape["minItems"] == 1 and shape["maxItems"] == 8
    assert "Inference-Header-Content-Length" in [p["name"] for p in infer["parameters"]]
    assert "422" not in infer["responses"]  # invalid requests are answered 400
    name = infer["parameters"][0]["schema"]["enum"][0]
    r = httpx.post(
        f"{live.url}/v2/models/{name}/infer",
        content=b"\x00\x01binary",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]
