"""Shared helpers for the device tests (this module holds no tests).

* `device_bundle()`: a tiny bundle (random weights, exported once per process) with an
  accuracy grid over (k, bits) and exit thresholds set from the data, so that some
  Fashion-MNIST test images exit at each exit and the rest offload.
* `image_folder(n)`: the first n Fashion-MNIST test images as PNGs, `<class>/<i>.png`.
* `TailServer`: the real tail server app under uvicorn on a loopback port, in a thread;
  stop and start again on the same port.
* `FaultServer`: a tiny app that misbehaves on purpose (stalls, 500s, garbage, 429, or
  500 on every first attempt), on a loopback port.
"""

from __future__ import annotations

import asyncio
import atexit
import math
import shutil
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from splitexit.bundle import export_bundle, load_bundle, write_thresholds
from splitexit.bundle.load import Bundle
from splitexit.data import FASHION_MNIST_CLASSES
from splitexit.demo import free_port  # re-exported: the device tests import it from here
from splitexit.runtime import HeadRunner, TailRunner

LOOPBACK = "127.0.0.1"
N_IMAGES = 240
CHANNELS, BITS = (2, 4, 8), (2, 4, 8)
CLASS_NAMES = FASHION_MNIST_CLASSES


def grid_accuracy(k: int, bits: int) -> float:
    """A made-up but monotone accuracy grid (more channels or bits: more accurate)."""
    return round(0.70 + 0.05 * math.log2(k) + 0.02 * math.log2(bits), 3)


@dataclass
class DeviceBundle:
    path: Path
    bundle: Bundle  # all parts
    head: HeadRunner
    tail: TailRunner
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray
    folder: Path  # the images as PNGs, <class>/<index>.png

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    def load(self) -> Bundle:
        """A fresh copy with only the device's parts (as the agent loads it)."""
        return quiet(load_bundle, self.path, parts=("head", "exits"))

    def image_id(self, i: int) -> str:
        return f"{folder_name(CLASS_NAMES[int(self.labels[i])])}/{i:04d}.png"


def quiet(f: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*args, **kwargs)


def folder_name(class_name: str) -> str:
    return class_name.replace("/", "_")


_CACHE: dict[str, DeviceBundle] = {}
_ROOT: list[Path] = []


def tmp_root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="splitexit-device-tests-")))
        atexit.register(shutil.rmtree, _ROOT[0], True)
    return _ROOT[0]


def device_bundle() -> DeviceBundle:
    """The shared test bundle (built on first use, about 10 s on a loaded 2-core machine)."""
    if "b" not in _CACHE:
        _CACHE["b"] = _build(tmp_root() / "device")
    return _CACHE["b"]


def other_bundle() -> Path:
    """A bundle with the same name and shape as `device_bundle()` but other weights (so
    another fingerprint): a server serving it answers the device's frames with 409."""
    if "other" not in _CACHE:
        _CACHE["other"] = _build(tmp_root() / "other", seed=1, data=False)
    return _CACHE["other"].path


def _build(root: Path, seed: int = 0, data: bool = True) -> DeviceBundle:
    from splitexit.data import load_fashion_mnist
    from splitexit.models import build_model
    from splitexit.splitnet import SplitExitNet

    torch.manual_seed(seed)
    teacher = build_model("small_resnet", width=8)
    net = SplitExitNet.from_teacher(
        teacher,
        "layer1",
        input_shape=(1, 28, 28),
        channels=8,
        hidden=8,
        downsample=1,
        exit_points=["layer1", "bottleneck"],
    ).eval()
    with torch.no_grad():  # random weights answer almost uniformly: spread the logits
        for m in [*net.tail.modules(), *net.exits.modules()]:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(20.0)
    images, labels = load_fashion_mnist("test")
    images, labels = images[:N_IMAGES], labels[:N_IMAGES]
    pre = {"size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]}
    path = root / "bundle"
    quiet(
        export_bundle,
        net,
        path,
        name="fmnist-tiny",
        architecture={"model": "small_resnet", "width": 8},
        preprocessing=pre,
        class_names=CLASS_NAMES,
        example_input_shape=(1, 28, 28),
        operating_points=[
            {"channels": k, "bits": b, "accuracy": grid_accuracy(k, b)}
            for k in CHANNELS
            for b in BITS
        ],
    )
    bundle = quiet(load_bundle, path)
    head = HeadRunner(bundle)
    if not data:
        return DeviceBundle(path, bundle, head, TailRunner(bundle), images, labels, root)
    x = bundle.preprocess(images)
    # thresholds from the data: ~30% exit at layer1, ~30% of the rest at the bottleneck
    never = {"layer1": 2.0, "bottleneck": 2.0}
    conf = head.run(x, thresholds=never).exit_confidence
    c1 = np.array([c["layer1"] for c in conf])
    t1 = _between(c1, 0.7)
    rest = np.array([c["bottleneck"] for c, a in zip(conf, c1, strict=True) if a < t1])
    t2 = _between(rest, 0.7)
    write_thresholds(path, {"layer1": t1, "bottleneck": t2})
    bundle = quiet(load_bundle, path)
    folder = root / "images"
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        f = folder / folder_name(CLASS_NAMES[int(label)]) / f"{i:04d}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        _save_png(img, f)
    return DeviceBundle(
        path, bundle, HeadRunner(bundle), TailRunner(bundle), images, labels, folder
    )


def _between(values: np.ndarray, q: float) -> float:
    """A threshold halfway between two neighbouring values near quantile q (never equal)."""
    s = np.unique(values)
    i = min(max(int(q * len(s)), 1), len(s) - 1)
    return float((s[i - 1] + s[i]) / 2)


def _save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(img).save(path, format="PNG")


# ---------------------------------------------------------------------------------- servers


def _listen(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, port))
    sock.listen(128)
    return sock


class UvicornThread:
    """An ASGI app under uvicorn on 127.0.0.1:`port` (0: free) in a daemon thread."""

    def __init__(self, app: Any, port: int = 0, server: Any = None) -> None:
        import uvicorn

        self.app = app
        self.port = port or free_port()
        self.server = server or uvicorn.Server(
            uvicorn.Config(app, log_config=None, log_level="warning", lifespan="off")
        )
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> UvicornThread:
        sock = _listen(self.port)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop now: open connections are closed, requests in flight are cut."""
        self.server.should_exit = True
        self.server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            assert not self._thread.is_alive(), "uvicorn thread did not stop"
            self._thread = None

    def __enter__(self) -> UvicornThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TailServer:
    """The real tail server serving `bundle_path` on a loopback port; restartable."""

    def __init__(self, bundle_path: Path, port: int = 0, **settings: Any) -> None:
        self.bundle_path = bundle_path
        self.port = port or free_port()
        self.settings = settings
        self._uv: UvicornThread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> TailServer:
        import httpx

        from splitexit_server.app import create_app
        from splitexit_server.serve import make_server
        from splitexit_server.settings import Settings

        base: dict[str, Any] = {
            "bundles": (self.bundle_path,),
            "host": LOOPBACK,
            "port": self.port,
            "log_level": "warning",
            "max_queue_delay_ms": 1.0,
            "queue_delay_target_ms": 5000.0,  # admission control off, except where tested
        }
        settings = Settings(**{**base, **self.settings})
        app = create_app(settings)
        self._uv = UvicornThread(app, self.port, make_server(app, settings, log_config=None))
        self._uv.start()
        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=self.url, trust_env=False) as c:
            while c.get("/v2/health/ready").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("the tail server did not get ready")
                time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._uv is not None:
            self._uv.stop()
            self._uv = None

    def __enter__(self) -> TailServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FaultServer:
    """A server that fails on purpose. Modes:

    stall: never answers inference (sleeps `stall_s`);  stall_all: nor anything else;
    ok: answers like the real server;  error500: always 500;
    garbage: 200 with a body that is no inference response;  busy: 429 + Retry-After;
    flaky: 500 on the first attempt of every request id, then a real answer from the tail;
    impossible: 200 with class 99 (the bundle has 10).
    Metadata reports `fingerprint` (default: the bundle's). `attempts` counts by request id.
    """

    def __init__(
        self,
        mode: str,
        tb: DeviceBundle,
        *,
        port: int = 0,
        fingerprint: str | None = None,
        stall_s: float = 30.0,
        retry_after: int = 1,
    ) -> None:
        self.mode = mode
        self.tb = tb
        self.fingerprint = fingerprint or tb.bundle.fingerprint
        self.stall_s = stall_s
        self.retry_after = retry_after
        self.attempts: dict[str, int] = {}
        self.times: dict[str, list[float]] = {}
        self._uv = UvicornThread(self._app(), port)

    @property
    def url(self) -> str:
        return self._uv.url

    @property
    def port(self) -> int:
        return self._uv.port

    def __enter__(self) -> FaultServer:
        self._uv.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._uv.stop()

    def _app(self) -> Any:
        from splitexit.protocol.kserve import encode_infer_response, parse_infer_request

        app = FastAPI()
        name = self.tb.name

        @app.get("/v2/health/ready")
        async def ready() -> JSONResponse:
            if self.mode == "stall_all":
                await asyncio.sleep(self.stall_s)
            return JSONResponse({"ready": True})

        @app.get("/v2/models/{model}")
        async def meta(model: str) -> JSONResponse:
            if self.mode == "stall_all":
                await asyncio.sleep(self.stall_s)
            return JSONResponse({"name": name, "parameters": {"fingerprint": self.fingerprint}})

        @app.post("/v2/models/{model}/infer")
        async def infer(model: str, request: Request) -> Response:
            body = await request.body()
            rid = request.headers.get("x-request-id", "")
            self.attempts[rid] = self.attempts.get(rid, 0) + 1
            self.times.setdefault(rid, []).append(time.monotonic())
            if self.mode in ("stall", "stall_all"):
                await asyncio.sleep(self.stall_s)
            if self.mode == "error500" or (self.mode == "flaky" and self.attempts[rid] == 1):
                return JSONResponse({"error": "injected failure"}, status_code=500)
            if self.mode == "garbage":
                return Response(b"\x00not json at all", media_type="application/json")
            if self.mode == "busy":
                return JSONResponse(
                    {"error": "overloaded"},
                    status_code=429,
                    headers={"Retry-After": str(self.retry_after)},
                )
            req = parse_infer_request(
                body,
                header_length=request.headers.get("inference-header-content-length"),
                content_type=request.headers.get("content-type"),
            )
            answer = self.tb.tail.run_frames(req.elements)[0]
            prediction = answer.prediction.numpy()
            if self.mode == "impossible":
                prediction = np.full_like(prediction, 99)
            content, headers = encode_infer_response(
                model_name=name,
                model_version="1",
                request_id=req.id,
                outputs=req.outputs,
                tensors={
                    "class": prediction,
                    "probability": answer.probability.numpy(),
                    "logits": answer.logits.numpy(),
                },
            )
            return Response(content, headers=headers)

        return app


# ------------------------------------------------------------------------------------ runs


def run_agent(agent: Any, source: Any) -> Any:
    """Run an Agent to the end in a fresh event loop; returns its summary."""

    async def go() -> Any:
        try:
            await agent.start()
            return await agent.run(source)
        finally:
            if agent.client is not None:
                await agent.client.aclose()

    return asyncio.run(go())


class ListWriter:
    """A RecordWriter stand-in that keeps the records."""

    def __init__(self) -> None:
        self.records: list[Any] = []

    def write(self, record: Any) -> None:
        self.records.append(record)

    def by_id(self) -> dict[str, Any]:
        return {r.id: r for r in self.records}


def expected_decisions(tb: DeviceBundle, k: int, bits: int) -> Iterator[tuple[str, Any, int]]:
    """(id, decided_by, class) per image, computed in one process: head, then tail."""
    x = tb.bundle.preprocess(tb.images)
    for i in range(len(tb.images)):
        r = tb.head.run(x[i : i + 1])
        answer = r.answer(0)
        if answer is not None:
            yield tb.image_id(i), answer.exit_name, answer.prediction
        else:
            frame = tb.head.frame(r.z, bits, k)
            yield tb.image_id(i), "server", int(tb.tail.run_frames([frame])[0].prediction[0])
