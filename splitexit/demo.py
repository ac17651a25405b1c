"""`splitexit demo`: the whole system on real data, on one machine, in a few minutes.

    Fashion-MNIST test images ─► splitexit-device run ──[emulated link]──► splitexit-server
          (PNG files on disk)     head + exits, frames      (optional)       tail, batching
                                        │
                                        ▼
                       records.jsonl + summary.json ─► report.md

The server and the agent run as their own processes, started from their console entry points
exactly as a user would deploy them (splitexit itself imports neither). The server is shut
down cleanly at the end, on failure and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from .errors import SplitexitError
from .processes import server_process, wait_ready

if TYPE_CHECKING:
    from .bundle.manifest import Manifest

READY_TIMEOUT_S = 180.0


@dataclass
class DemoPaths:
    out: Path
    inputs: Path
    records: Path
    summary: Path
    report: Path
    server_log: Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now (the OS's pick); for servers started on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_fashion_mnist_inputs(dest: Path, limit: int | None) -> Path:
    """The Fashion-MNIST test images as PNGs, `dest/<class>/<index>.png`, kept between runs."""
    from .data import FASHION_MNIST_CLASSES, load_fashion_mnist
    from .preprocess import encode_image

    images, labels = load_fashion_mnist("test")
    n = len(labels) if not limit else min(limit, len(labels))
    marker = dest / f".complete-{n}"
    if marker.exists():
        return dest
    for name in FASHION_MNIST_CLASSES:
        (dest / _safe(name)).mkdir(parents=True, exist_ok=True)
    for i in tqdm(range(n), desc="writing test images", unit="img", disable=None, leave=False):
        path = dest / _safe(FASHION_MNIST_CLASSES[labels[i]]) / f"{i:05d}.png"
        if not path.exists():
            path.write_bytes(encode_image(images[i], "png"))
    marker.touch()
    return dest


def _safe(name: str) -> str:
    return name.replace("/", "-").replace(" ", "_")


def mean_file_bytes(root: Path) -> float:
    sizes = [p.stat().st_size for p in root.rglob("*.png")]
    return float(np.mean(sizes)) if sizes else 0.0


@contextlib.contextmanager
def tail_server(
    bundle: Path, port: int, log: Path, *, max_batch: int = 16, cpus: Collection[int] | None = None
) -> Iterator[str]:
    """Run `splitexit-server` on a loopback port until the block ends (in its own process
    group, stopped whole, on `cpus` if given); yield its URL once ready."""
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "splitexit_server.cli",
        "--bundle",
        str(bundle),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch),
        "--threads",
        "1",
    ]
    with (
        log.open("w") as log_file,
        server_process(cmd, stdout=log_file, stderr=subprocess.STDOUT, cpus=cpus) as proc,
    ):
        wait_ready(f"{url}/v2/health/ready", proc, log, READY_TIMEOUT_S)
        yield url


def run_agent(
    bundle: Path,
    url: str | None,
    paths: DemoPaths,
    *,
    link: str | None,
    policy: str,
    limit: int | None,
    extra: list[str],
) -> int:
    cmd = [
        sys.executable,
        "-m",
        "splitexit_device.cli",
        "run",
        "--bundle",
        str(bundle),
        "--source",
        str(paths.inputs),
        "--out",
        str(paths.records),
        "--summary-json",
        str(paths.summary),
        "--policy",
        policy,
        "--window",
        "8",
        "--threads",
        "1",
    ]
    cmd += ["--server", url] if url else ["--local-only"]
    if link:
        cmd += ["--link", link]
    if limit:
        cmd += ["--limit", str(limit)]
    if sys.stderr.isatty():
        cmd += ["--progress"]
    return subprocess.call(cmd + extra)


def format_report(
    manifest: Manifest,
    summary: dict,
    image_bytes: float,
    paths: DemoPaths,
    link: str | None,
    seconds: float,
) -> str:
    n = summary["inputs"]
    acc = summary.get("accuracy")
    teacher = manifest.teacher_accuracy
    lat = summary["latency_ms"]
    sent = summary["bytes_sent"]
    per_input = sent["total"] / max(n, 1)
    frame_per_offload = sent["frame_per_offload"] or 0.0
    lines = [
        f"splitexit demo: {manifest.name} over {n} Fashion-MNIST test images "
        f"({'link ' + link if link else 'loopback, no link emulation'}), {seconds:.0f} s",
        "",
        f"accuracy         {acc:.4f}"
        + (f"   (teacher, whole model: {teacher:.4f})" if teacher else "")
        if acc is not None
        else "accuracy         - (no labels)",
        "answered by      "
        + ", ".join(f"exit {k} {v:.1%}" for k, v in summary["exit_rate"].items())
        + f", server {summary['offload_rate']:.1%}, local fallback {summary['fallback_rate']:.1%}",
        f"operating points {summary['operating_points'] or '-'}",
        f"bytes per input  {per_input:.1f} on the wire incl. HTTP "
        f"({frame_per_offload:.1f} B per offloaded frame) vs {image_bytes:.0f} B to send the PNG",
        f"latency (ms)     mean {lat['mean']:.2f}  p50 {lat['p50']:.2f}  p95 {lat['p95']:.2f}"
        f"  max {lat['max']:.2f}",
        "",
        f"records   {paths.records}",
        f"summary   {paths.summary}",
        f"report    {paths.report}",
        f"server    {paths.server_log}",
    ]
    return "\n".join(lines)


def run_demo(
    *,
    bundle: str | Path | None = None,
    data: str | Path | None = None,
    link: str | None = None,
    limit: int | None = None,
    out: str | Path | None = None,
    policy: str = "adaptive",
    local_only: bool = False,
    agent_args: list[str] | None = None,
) -> int:
    """Run server + agent over the data and print a report; returns the agent's exit status."""
    from .bundle import load_bundle

    began = time.perf_counter()
    out_dir = Path(out) if out else Path(tempfile.gettempdir()) / "splitexit-demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle_path = Path(bundle) if bundle else ensure_default_bundle()
    manifest = load_bundle(bundle_path, parts=()).manifest
    if data is None:
        inputs = write_fashion_mnist_inputs(out_dir / "fashion-mnist-test", limit)
    else:
        inputs = Path(data)
        if not inputs.is_dir():
            raise SplitexitError(
                f"--data {inputs} is not a folder of images (one folder per class)"
            )
    paths = DemoPaths(
        out_dir,
        inputs,
        out_dir / "records.jsonl",
        out_dir / "summary.json",
        out_dir / "report.md",
        out_dir / "server.log",
    )
    print(f"bundle {bundle_path} ({manifest.name}, fingerprint {manifest.fingerprint[:16]})")
    with contextlib.ExitStack() as stack:
        url = None
        if not local_only:
            print("starting the tail server on a loopback port ...", flush=True)
            url = stack.enter_context(tail_server(bundle_path, free_port(), paths.server_log))
            print(f"tail server ready at {url}", flush=True)
        print(f"running the device agent over {inputs} ...", flush=True)
        status = run_agent(
            bundle_path,
            url,
            paths,
            link=link,
            policy=policy,
            limit=limit,
            extra=list(agent_args or []),
        )
    if not paths.summary.exists():
        raise SplitexitError(f"the device agent failed (exit status {status}); see above")
    summary = json.loads(paths.summary.read_text())
    report = format_report(
        manifest, summary, mean_file_bytes(inputs), paths, link, time.perf_counter() - began
    )
    paths.report.write_text(report + "\n")
    print("\n" + report)
    return status


def ensure_default_bundle() -> Path:
    """The shipped small-track bundle; trained quickly (with progress) only if it is missing."""
    from .zoo import default_bundle_path

    try:
        return default_bundle_path()
    except SplitexitError:
        pass
    from .train.config import load_config, resolve_config
    from .train.pipeline import run_experiment

    print("the shipped bundle is missing: training a quick one (a few minutes) ...")
    cfg = load_config(resolve_config("fmnist-small"))
    cfg.data.train_subset = 10000
    for optim in (cfg.teacher.optim, cfg.stage1.optim, cfg.stage2.optim, cfg.exits.optim):
        optim.epochs = max(1, optim.epochs // 4)
    cfg.output = str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "splitexit"
        / "quick-fmnist-small"
    )
    results = run_experiment(cfg)
    return Path(results["bundle"])
