"""Constants and pure helpers the tests share (nothing here starts or stops anything; what
does is a fixture in `tests/fixtures/`, requested by name).

* server: `OPERATING_POINTS`, `server_settings(*bundles, **changes)`.
* device: `ListWriter` (a record writer that keeps them), `run_agent`, `stream_agent`,
  `expected_decisions`, `grid_accuracy`, `quiet`.
* models: `tiny_split_net(exits)`, a five-stage split network on 1x16x16 inputs.
* training: `TINY_EXPERIMENT`, `experiment(out, **changes)`, `write_toml`.
* runtime: `run_agent_cli` (the agent CLI in a subprocess), `interrupt_agent` (Ctrl-C
  while inputs are in flight), `imported_blocked`,
  `parity_tolerance`, `assert_same_answers`, `SHIPPED` (the zoo's default bundle).

A free loopback port is `splitexit.demo.free_port()`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from splitexit.zoo import default_bundle_path

if TYPE_CHECKING:
    from fixtures.device import DeviceBundle
    from fixtures.server import TinyBundle

    from splitexit.splitnet import SplitExitNet
    from splitexit_device.agent import Agent, AgentConfig
    from splitexit_device.stream import StreamClient, StreamConfig
    from splitexit_server.settings import Settings

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
SHIPPED = default_bundle_path()

# ------------------------------------------------------------------------------------ server

OPERATING_POINTS = [(1, 8), (2, 4), (4, 2), (4, 4), (4, 8)]  # (k channels, bits)


def server_settings(*bundles: TinyBundle, **changes: Any) -> Settings:
    """Test settings: loopback, any port, quiet logs, the given bundles."""
    from splitexit_server.settings import Settings

    base: dict[str, Any] = {
        "bundles": tuple(b.path for b in bundles),
        "host": LOOPBACK,
        "port": 0,
        "log_level": "warning",
        "max_batch_size": 8,
        "max_queue_delay_ms": 5.0,
        "queue_delay_target_ms": 600_000.0,  # admission control off, except where tested
    }
    base.update(changes)
    return Settings(**base)


# ------------------------------------------------------------------------------------ models

_TINY_CHANNELS = {"stem": 8, "layer1": 16, "bottleneck": 4}


def tiny_split_net(
    exits: Mapping[str, Mapping[str, Any]], seed: int = 0, bn_stats: bool = True
) -> SplitExitNet:
    """stem [8,16,16] ─ layer1 [16,8,8] ─ bottleneck code [4,4,4] (bits 4/8) ─ layer2 ─
    classifier [10], in eval mode; `exits` names where branches go ("stem", "layer1",
    "bottleneck") with their ExitBranch options; `bn_stats`: non-trivial batch-norm
    statistics."""
    from collections import OrderedDict

    import torch
    from torch import nn

    from splitexit.bottleneck import Bottleneck
    from splitexit.exits import ExitBranch
    from splitexit.splitnet import SplitExitNet

    def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    torch.manual_seed(seed)
    head = nn.Sequential(OrderedDict(stem=conv(1, 8), layer1=conv(8, 16, 2)))
    tail = nn.Sequential(
        OrderedDict(
            layer2=conv(16, 16, 2),
            classifier=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 10)),
        )
    )
    bottleneck = Bottleneck((16, 8, 8), channels=4, hidden=8, downsample=1, bits=(4, 8))
    branches = {at: ExitBranch(_TINY_CHANNELS[at], 10, **kw) for at, kw in exits.items()}
    net = SplitExitNet(head, bottleneck, tail, branches)
    if bn_stats:
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


# ------------------------------------------------------------------------------------ device


def grid_accuracy(k: int, bits: int) -> float:
    """A made-up but monotone accuracy grid (more channels or bits: more accurate)."""
    return round(0.70 + 0.05 * math.log2(k) + 0.02 * math.log2(bits), 3)


def quiet(f: Any, *args: Any, **kwargs: Any) -> Any:
    """`f(*args, **kwargs)` with its warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*args, **kwargs)


def run_agent(agent: Any, source: Any) -> Any:
    """Run an Agent to the end in a fresh event loop (its client closed after); returns its
    summary."""

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


def stream_agent(
    url: str,
    tb: DeviceBundle,
    config: AgentConfig,
    stream: StreamConfig | None = None,
    log: Any = None,
    timing: bool = False,
    **client: Any,
) -> tuple[Agent, ListWriter, StreamClient]:
    """An Agent offloading through a StreamClient to `url` (closed by `run_agent`)."""
    from splitexit_device.agent import Agent
    from splitexit_device.client import ClientConfig, OffloadClient
    from splitexit_device.stream import StreamClient, bundle_session

    http = OffloadClient(url, tb.name, ClientConfig(**client))
    c = StreamClient(http, bundle_session(tb.load(), tb.name, timing=timing), stream, log=log)
    writer = ListWriter()
    agent = Agent(tb.load(), config, c, writer=writer, log=log)  # type: ignore[arg-type]
    return agent, writer, c


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


# ----------------------------------------------------------------------------------- runtime

#: Run `splitexit_device.cli.main` with torch, fastapi and uvicorn unimportable (a meta-path finder
#: refuses them), then report on stderr whether any of them got imported after all.
BLOCKED_RUNNER = """\
import importlib.abc, sys
BLOCKED = ("torch", "fastapi", "uvicorn")
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Refuse())
from splitexit_device.cli import main
rc = main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print("IMPORTED " + json.dumps(loaded), file=sys.stderr)
sys.exit(rc)
"""
PLAIN_RUNNER = "import sys\nfrom splitexit_device.cli import main\nsys.exit(main(sys.argv[1:]))\n"


def run_agent_cli(
    args: list[str],
    *,
    python: str = sys.executable,
    block_torch: bool = False,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = 240,
) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    """Run `splitexit-device run ARGS` in a subprocess; returns (records, the process).

    By default the checkout's code runs (PYTHONPATH); give another `python`, `env` and a
    `cwd` outside the checkout to run an installed copy. With `block_torch`, the process
    also reports which blocked modules it imported (`imported_blocked(proc)`).
    """
    code = ("import json\n" + BLOCKED_RUNNER) if block_torch else PLAIN_RUNNER
    base = {**os.environ, "PYTHONPATH": str(REPO)} if env is None else env
    proc = subprocess.run(
        [python, "-c", code, "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=base,
        cwd=cwd,
    )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return records, proc


def interrupt_agent(
    args: list[str], out: Path, in_flight: Callable[[], object], timeout: float = 60
) -> tuple[int, str, list[dict[str, Any]]]:
    """Run `splitexit-device run ARGS --out OUT` as a real process and, once `in_flight()`
    is true, press Ctrl-C (SIGINT); returns (exit status, stderr, the records written)."""
    cmd = [sys.executable, "-m", "splitexit_device.cli", "run", *args, "--out", str(out)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + timeout
        while not in_flight():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    return proc.returncode, err, records


def imported_blocked(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The blocked modules a `run_agent_cli(..., block_torch=True)` process imported."""
    for line in proc.stderr.splitlines():
        if line.startswith("IMPORTED "):
            return json.loads(line[len("IMPORTED ") :])
    raise AssertionError(f"the agent did not report its imports:\n{proc.stderr[-2000:]}")


def parity_tolerance(bundle_path: Path = SHIPPED) -> float:
    """How far two backends' confidences may differ: twice the largest logit difference
    the bundle's manifest records for an exit or the tail (softmax moves no more than its
    logits, per measure at most twice), and never under float32 noise."""
    from splitexit.bundle import load_bundle

    diffs = load_bundle(bundle_path, parts=()).manifest.onnx["max_abs_diff"]
    worst = max(v for k, v in diffs.items() if k.startswith("exit_") or k == "tail")
    return max(2 * worst, 1e-6)


def assert_same_answers(
    a: list[dict[str, Any]], b: list[dict[str, Any]], tol: float, server_tol: float
) -> None:
    """Every input answered by the same exit or the server, with the same class; confidences
    within `tol` (local) or `server_tol` (the tail: one code value may round the other way).
    Records come in answer order; they are compared by input id."""
    a, b = (sorted(records, key=lambda r: r["id"]) for records in (a, b))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert (ra["decided_by"], ra["exit"], ra["class"]) == (
            rb["decided_by"],
            rb["exit"],
            rb["class"],
        ), (ra, rb)
        limit = server_tol if ra["decided_by"] == "server" else tol
        assert abs(ra["confidence"] - rb["confidence"]) <= limit + 1e-6, (ra, rb)


# ---------------------------------------------------------------------------------- training

#: A tiny experiment on Fashion-MNIST subsets (small_resnet, width 8): seconds per stage.
TINY_EXPERIMENT: dict[str, Any] = {
    "name": "tiny",
    "seed": 3,
    "data": {"train_subset": 256, "test_subset": 128, "calibration": 128},
    "teacher": {
        "model": "small_resnet",
        "kwargs": {"width": 8},
        "optim": {"epochs": 2, "optimizer": "sgd", "lr": 0.05, "batch_size": 64},
    },
    "split": {"point": "layer1", "channels": 4, "hidden": 8, "downsample": 2},
    "stage1": {"optim": {"epochs": 1, "batch_size": 64}},
    "stage2": {"optim": {"epochs": 1, "batch_size": 64}},
    "exits": {"optim": {"epochs": 1, "batch_size": 64}},
}


def experiment(out: Path, **changes: Any) -> dict[str, Any]:
    """`TINY_EXPERIMENT` writing to `out`, with dotted-key changes ("exits.optim.epochs": 2;
    a key without a dot replaces that whole entry)."""
    table = json.loads(json.dumps(TINY_EXPERIMENT))
    table["output"] = str(out)
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = table
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return table


def write_toml(table: dict[str, Any], path: Path) -> Path:
    """`table` (a config: top-level values, then one table per section) as TOML at `path`."""

    def value(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    lines += [
        f"[{k}]\n" + "\n".join(f"{a} = {value(b)}" for a, b in v.items())
        for k, v in table.items()
        if isinstance(v, dict)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
