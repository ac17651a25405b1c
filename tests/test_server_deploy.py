"""Deployment files agree with the app (no Docker engine or cluster here: they are parsed and
cross-checked), the Triton export answers like the server, the server never imports the
device, and the Ray Serve entry point serves the app (opt-in: SPLITEXIT_TEST_RAY=1)."""

from __future__ import annotations

import ast
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from support import server_settings

from splitexit_server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server"
DOCKER_INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
SETTING_NAMES = {ENV_PREFIX + f.upper() for f in Settings.__dataclass_fields__}


@pytest.fixture(scope="module")
def routes(tiny_bundle) -> dict[str, set[str]]:
    from splitexit_server.app import create_app

    a = tiny_bundle
    doc = create_app(server_settings(a), bundles=[a.bundle]).openapi()
    return {path: set(ops) for path, ops in doc["paths"].items()}


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out = []
    logical = ""
    for line in text.splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        logical += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            word, _, rest = logical.partition(" ")
            out.append((word.upper(), rest.strip()))
            logical = ""
    assert not logical, "dangling line continuation"
    return out


def test_dockerfile_parses_and_matches_the_app(routes):
    steps = dockerfile_instructions((SERVER / "Dockerfile").read_text())
    assert {i for i, _ in steps} <= DOCKER_INSTRUCTIONS
    assert steps[0][0] in ("ARG", "FROM")
    for instr, args in steps:
        if instr == "COPY" and "--from" not in args:
            for src in shlex.split(args)[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} is missing"
        if instr == "ENV":
            for name in re.findall(r"(SPLITEXIT_SERVER_\w+)=", args):
                assert name in SETTING_NAMES, name
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("EXPOSE", "8000") in steps
    assert ("ENTRYPOINT", '["splitexit-server"]') in steps
    health = next(a for i, a in steps if i == "HEALTHCHECK")
    assert "/v2/health/ready" in health and "/v2/health/ready" in routes


def test_compose_file_matches_the_app(routes):
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((SERVER / "compose.yaml").read_text())
    tail = doc["services"]["tail"]
    assert tail["build"]["dockerfile"] == "server/Dockerfile"
    assert all(v.endswith(":ro") for v in tail["volumes"])
    assert all(p.startswith("127.0.0.1:") for p in tail["ports"])
    assert set(tail["environment"]) <= SETTING_NAMES
    assert any("/v2/health/ready" in part for part in tail["healthcheck"]["test"])


def test_kubernetes_manifests_match_the_app(routes):
    yaml = pytest.importorskip("yaml")
    docs = {}
    for path in sorted((SERVER / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    deploy, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = deploy["spec"]["template"]
    container = pod["spec"]["containers"][0]
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"] == labels == service["spec"]["selector"]
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) <= SETTING_NAMES and int(env[f"{ENV_PREFIX}PORT"]) == port
    probes = {k: container[k]["httpGet"]["path"] for k in container if k.endswith("Probe")}
    assert probes["readinessProbe"] == "/v2/health/ready"
    assert probes["livenessProbe"] == "/v2/health/live"
    assert all(path in routes for path in probes.values())
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    drain = float(env[f"{ENV_PREFIX}DRAIN_S"]) + float(env[f"{ENV_PREFIX}GRACEFUL_TIMEOUT_S"])
    assert grace > drain, "Kubernetes would kill the pod before in-flight requests finish"
    assert (
        "/metrics" in routes and pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    )


def test_server_never_imports_the_device():
    for path in SERVER.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "device" or n.startswith("device.") for n in names), path


@pytest.mark.parametrize(
    ("name", "shipped"), [("tiny-onnx", True), ("tiny-a", False)], ids=["shipped", "exported"]
)
def test_triton_export_answers_like_the_server(tmp_path, name, shipped, make_tiny_bundle):
    """The bundle's shipped Triton model is copied; a bundle without one is exported now."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from splitexit.codec import decode_frame
    from splitexit_server.triton.export import export_repository

    a = make_tiny_bundle(name, 0, onnx=shipped)
    assert (a.path / "onnx").exists() == shipped
    model_dir = export_repository(a.path, tmp_path / "repo", max_batch_size=16)
    config = (model_dir / "config.pbtxt").read_text()
    c, h, w = a.bundle.manifest.bottleneck.code_shape
    assert "dynamic_batching" in config and f"dims: [ {c}, {h}, {w} ]" in config
    assert "max_batch_size: 16" in config
    assert (model_dir / "labels.txt").read_text().split() == list(a.bundle.manifest.class_names)

    frame = a.frame(a.inputs(2, seed=4), 2, 8)  # 2 of 4 channels sent
    qt = decode_frame(frame).tensor
    code = np.empty((2, c, h, w), dtype=np.uint8)
    code[:] = qt.zero_point.numpy().reshape(-1, 1, 1, 1)  # unsent channels dequantize to 0
    code[:, :2] = qt.values.numpy()
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"))
    (logits,) = session.run(
        None, {"code": code, "scale": qt.scale.numpy(), "zero_point": qt.zero_point.numpy()}
    )
    np.testing.assert_allclose(logits, a.local(frame).logits.numpy(), atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("SPLITEXIT_TEST_RAY") != "1",
    reason="opt-in (SPLITEXIT_TEST_RAY=1): Ray starts a local cluster (~20 s, ~1 GB) whose "
    "GCS, raylet and dashboard agent listen on all interfaces, not only loopback",
)
def test_ray_serve_entry_point_serves_the_app(tiny_bundle):  # pragma: no cover - opt-in
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    import socket
    import time

    import httpx

    from splitexit.protocol.kserve import HEADER_LENGTH, build_binary_request, decode_infer_response
    from splitexit_server.ray_serve import deployment

    a = tiny_bundle
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        one = {"min_replicas": 1, "max_replicas": 1}
        serve.run(deployment(server_settings(a), autoscaling_config=one), route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + 120
            while c.get("/v2/health/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            frame = a.frame(a.inputs(1, 3), 4, 8)
            body, headers = build_binary_request("frame", [frame], outputs=["class", "logits"])
            r = c.post(f"/v2/models/{a.name}/infer", content=body, headers=headers)
            got = decode_infer_response(r.content, r.headers.get(HEADER_LENGTH))
            np.testing.assert_allclose(got["logits"], a.local(frame).logits.numpy(), atol=2e-5)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_batcher_seam_used_by_the_ray_entry_point(tiny_bundle, live_server):
    """create_app(batcher_factory=...) swaps the batcher; the app answers the same."""
    import httpx

    from splitexit.protocol.kserve import HEADER_LENGTH, build_binary_request, decode_infer_response
    from splitexit_server.batcher import DynamicBatcher

    made = []

    def factory(process, **kw):
        made.append(kw["name"])
        return DynamicBatcher(process, **kw)

    a = tiny_bundle
    live = live_server(server_settings(a, warmup=False), [a], batcher_factory=factory)
    frame = a.frame(a.inputs(1, 6), 4, 4)
    body, headers = build_binary_request("frame", [frame], outputs=["class"])
    r = httpx.post(f"{live.url}/v2/models/{a.name}/infer", content=body, headers=headers)
    got = decode_infer_response(r.content, r.headers.get(HEADER_LENGTH))
    assert got["class"].tolist() == a.local(frame).prediction.tolist()
    assert made == [a.name]
