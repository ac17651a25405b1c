"""Schemathesis, driven by the server's own /openapi.json, finds no 5xx: valid and invalid
requests to every documented operation get an answer or a 4xx, never a server error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_fixtures import LiveServer, tiny_bundle
from server_fixtures import settings as server_settings

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES = 150  # bounded: about 10 s on two shared cores


@pytest.fixture(scope="module")
def live():
    a = tiny_bundle("tiny-a", 0)
    with LiveServer(server_settings(a, max_body_bytes=256 * 1024), [a]) as server:
        yield server


def test_openapi_documents_the_inference_protocol(live):
    import httpx

    doc = httpx.get(f"{live.url}/openapi.json").json()
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert {"application/json", "application/octet-stream"} <= set(infer["requestBody"]["content"])
    assert {"200", "400", "409", "413", "429", "503", "504"} <= set(infer["responses"])
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/metrics"):
        assert path in doc["paths"]


def test_generated_requests_never_get_a_5xx(live):
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )
    seen: dict[int, int] = {}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
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
