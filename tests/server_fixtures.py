"""Shared helpers for the server tests: tiny bundles (built once per process) and a real
uvicorn server on a loopback port, run in a background thread.

Import what a test module needs: `from server_fixtures import LiveServer, tiny_bundles`.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from splitexit.bundle import export_bundle, load_bundle
from splitexit.bundle.load import Bundle
from splitexit.runtime import HeadRunner, TailRunner
from splitexit_server.app import create_app
from splitexit_server.serve import bind, make_server
from splitexit_server.settings import Settings

LOOPBACK = "127.0.0.1"
OPERATING_POINTS = [(1, 8), (2, 4), (4, 2), (4, 4), (4, 8)]  # (k channels, bits)


@dataclass
class TinyBundle:
    """A tiny exported bundle, loaded, with local head and tail runners."""

    path: Path
    bundle: Bundle
    head: HeadRunner
    tail: TailRunner

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def fingerprint(self) -> str:
        return self.bundle.fingerprint

    def inputs(self, n: int, seed: int) -> torch.Tensor:
        """n random inputs, each with its own amplitude and offset (distinct answers)."""
        g = torch.Generator().manual_seed(seed)
        amplitude = torch.rand((n, 1, 1, 1), generator=g) * 4 + 0.1
        offset = torch.rand((n, 1, 1, 1), generator=g) * 4 - 2
        return torch.randn((n, 1, 28, 28), generator=g) * amplitude + offset

    def frame(self, x: torch.Tensor, k: int, bits: int) -> bytes:
        z = self.head.run(x, exits=False).z
        assert z is not None
        return self.head.frame(z, bits, k)

    def local(self, frame: bytes) -> Any:
        return self.tail.run_frames([frame])[0]


def _build(dest: Path, name: str, seed: int, onnx: bool = False) -> Path:
    from splitexit.models import build_model
    from splitexit.splitnet import SplitExitNet

    torch.manual_seed(seed)
    teacher = build_model("small_resnet", width=8)
    net = SplitExitNet.from_teacher(
        teacher, "layer2", input_shape=(1, 28, 28), channels=4, hidden=8, exit_points=("layer1",)
    ).eval()
    linear = [m for m in net.tail.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # random weights answer almost uniformly: spread the logits out
        linear.weight.mul_(40.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_bundle(
            net,
            dest,
            name=name,
            architecture={"model": "small_resnet", "width": 8},
            preprocessing={"size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]},
            class_names=[f"class{i}" for i in range(10)],
            example_input_shape=(1, 28, 28),
            operating_points=[{"channels": k, "bits": b} for k, b in OPERATING_POINTS],
            onnx=onnx,
        )
    return dest


_CACHE: dict[str, TinyBundle] = {}
_ROOT: list[Path] = []


def tiny_bundle(name: str = "tiny-a", seed: int = 0, onnx: bool = False) -> TinyBundle:
    """A tiny bundle (random weights), exported and loaded once per test process; `onnx`
    also exports its ONNX graphs and Triton model into the bundle (needs the export extra)."""
    if name not in _CACHE:
        if not _ROOT:
            _ROOT.append(Path(tempfile.mkdtemp(prefix="splitexit-server-tests-")))
            atexit.register(shutil.rmtree, _ROOT[0], True)
        path = _build(_ROOT[0] / name, name, seed, onnx)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bundle = load_bundle(path, parts=("head", "exits", "tail"))
        _CACHE[name] = TinyBundle(path, bundle, HeadRunner(bundle), TailRunner(bundle))
    return _CACHE[name]


def tiny_bundles() -> tuple[TinyBundle, TinyBundle]:
    """Two tiny bundles with different weights (so different fingerprints)."""
    return tiny_bundle("tiny-a", 0), tiny_bundle("tiny-b", 1)


class LiveServer:
    """The real app under uvicorn on 127.0.0.1:<free port>, in a background thread."""

    def __init__(
        self,
        settings: Settings,
        bundles: Sequence[TinyBundle] | None = None,
        wait: bool = True,
        batcher_factory: Any = None,
    ) -> None:
        self.settings = settings
        self.app = create_app(
            settings,
            bundles=None if bundles is None else [b.bundle for b in bundles],
            batcher_factory=batcher_factory,
        )
        self.server = make_server(self.app, settings, log_config=None)
        self._wait = wait
        self._thread: threading.Thread | None = None
        self.url = ""

    @property
    def state(self) -> Any:
        return self.app.state.splitexit

    def __enter__(self) -> LiveServer:
        sock = bind(LOOPBACK, 0)
        self.url = f"http://{LOOPBACK}:{sock.getsockname()[1]}"
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        if self._wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url) as c:
            while c.get("/v2/health/ready").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not ready: {self.state.phase} {self.state.error}")
                time.sleep(0.02)

    def stop(self, timeout: float = 20.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "server thread did not stop"

    def __exit__(self, *exc: object) -> None:
        self.stop()


def settings(*bundles: TinyBundle, **changes: Any) -> Settings:
    """Test settings: loopback, any port, quiet logs, the given bundles."""
    base: dict[str, Any] = {
        "bundles": tuple(b.path for b in bundles),
        "host": LOOPBACK,
        "port": 0,
        "log_level": "warning",
        "max_batch_size": 8,
        "max_queue_delay_ms": 5.0,
        "queue_delay_target_ms": 5000.0,  # admission control off, except where tested
    }
    base.update(changes)
    return Settings(**base)
