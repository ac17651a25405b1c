"""The two runtimes side by side: TorchScript (torch) against ONNX Runtime, same bundle.

    python benchmarks/runtime_backends.py [--reps 200] [--threads 1,2] [--large-bundle PATH]
        [--device-venv PATH]

Measures, on the shipped small-track bundle (and `--large-bundle` if given):
- head (every segment and exit, no early exit) and tail time per backend and thread count,
  batch 1, median of `--reps` calls through `HeadRunner` / `TailRunner`;
- tail throughput per backend and bundle at batch 1..32 (samples/s of `TailRunner.run_codes`,
  what a server worker runs per batch; one thread);
- agent start-up: `splitexit-device run --local-only` on one image, wall time and peak RSS
  of the process, with --runtime torch and --runtime onnxruntime (which imports no torch),
  and in a torch-free device venv;
- the installed size of that device venv (`pip install '.[device]'`; built in a temporary
  directory unless `--device-venv` names one).
Writes benchmarks/results/runtime_backends.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from suite.report import machine, machine_line

from splitexit.bundle import load_bundle
from splitexit.preprocess import encode_image
from splitexit.runtime import HeadRunner, TailRunner
from splitexit.runtime.backends import RuntimeOptions
from splitexit.zoo import default_bundle_path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BACKENDS = ("torch", "onnxruntime")
BATCHES = (1, 2, 4, 8, 16, 32)


def median_ms(call: Any, reps: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def compute_times(path: Path, threads: list[int], reps: int) -> list[dict[str, Any]]:
    """Head and tail ms at batch 1 per backend and thread count."""
    bundle = load_bundle(path, parts=())
    never = {e.name: 2.0 for e in bundle.manifest.exits}  # every exit computed, none taken
    x = np.random.default_rng(0).normal(size=(1, *bundle.manifest.input_shape)).astype("float32")
    rows = []
    for n in threads:
        for name in BACKENDS:
            opts = RuntimeOptions(name, threads=n)
            head = HeadRunner(bundle, thresholds=never, runtime=opts)
            tail = TailRunner(bundle, runtime=opts)
            xi = head.backend.input(x)
            z = head.run(xi).z
            code = [head.encode(z, max(bundle.manifest.bottleneck.bits))]
            rows.append(
                {
                    "bundle": bundle.manifest.name,
                    "backend": name,
                    "threads": n,
                    "head_ms": median_ms(lambda h=head, xi=xi: h.run(xi), reps),
                    "tail_ms": median_ms(lambda t=tail, c=code: t.run_codes(c), reps),
                }
            )
    return rows


def tail_throughput(path: Path, reps: int) -> list[dict[str, Any]]:
    """Samples/s of one tail call on a batch of b one-sample codes, per backend."""
    bundle = load_bundle(path, parts=())
    head = HeadRunner(bundle, runtime="torch")
    x = torch.randn((max(BATCHES), *bundle.manifest.input_shape), generator=torch.Generator())
    z = head.run(x, exits=False).z
    bits = max(bundle.manifest.bottleneck.bits)
    codes = [head.encode(z[i : i + 1], bits).numpy() for i in range(max(BATCHES))]
    rows = []
    for name in BACKENDS:
        tail = TailRunner(bundle, runtime=RuntimeOptions(name, threads=1))
        for b in BATCHES:
            ms = median_ms(lambda t=tail, c=codes[:b]: t.run_codes(c), reps)
            rows.append(
                {
                    "bundle": bundle.manifest.name,
                    "backend": name,
                    "batch": b,
                    "ms": ms,
                    "samples_per_s": b / ms * 1e3,
                }
            )
    return rows


#: The agent's CLI, then its own peak RSS (VmHWM of its address space: getrusage's maxrss
#: would include the benchmark process it was forked from, torch and all).
AGENT = """\
import sys
from splitexit_device.cli import main
rc = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("VMHWM_KB", hwm, file=sys.stderr)
sys.exit(rc)
"""


def run_rss(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one agent process."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    kb = next(line.split()[1] for line in proc.stderr.splitlines() if line.startswith("VMHWM_KB"))
    return wall, int(kb) / 1024


def startup(bundle: Path, venv: Path | None, repeats: int = 3) -> list[dict[str, Any]]:
    """Agent start-up on one image (median of `repeats`), per runtime and install."""
    tmp = Path(tempfile.mkdtemp(prefix="splitexit-bench-"))
    image = tmp / "one.png"
    image.write_bytes(encode_image(np.zeros((28, 28, 1), np.uint8)))
    code = AGENT
    args = ["run", "--bundle", str(bundle), "--source", str(image), "--local-only"]
    here = {**os.environ, "PYTHONPATH": str(ROOT)}
    cases = [
        ("torch", "this checkout, torch installed", sys.executable, here, ROOT),
        ("onnxruntime", "this checkout, torch installed", sys.executable, here, ROOT),
    ]
    if venv is not None:
        clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        cases.append(("onnxruntime", "device venv, no torch", str(venv / "bin/python"), clean, tmp))
    rows = []
    for runtime, where, python, env, cwd in cases:
        runs = [
            run_rss([python, "-c", code, *args, "--runtime", runtime], env, cwd)
            for _ in range(repeats)
        ]
        rows.append(
            {
                "runtime": runtime,
                "install": where,
                "startup_s": statistics.median(r[0] for r in runs),
                "rss_mib": statistics.median(r[1] for r in runs),
            }
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


def device_venv(path: Path | None) -> tuple[Path, bool]:
    """A torch-free device venv: the one given, or a fresh one (returned, made=True)."""
    if path is not None:
        return path, False
    root = Path(tempfile.mkdtemp(prefix="splitexit-device-venv-")) / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    src = root.parent / "src"
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info")
    )
    subprocess.run(
        [str(root / "bin/python"), "-m", "pip", "install", "--quiet", f"{src}[device]"],
        check=True,
        capture_output=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    shutil.rmtree(src)
    return root, True


def du_mib(path: Path) -> float:
    return (
        sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20
    )


def venv_size(venv: Path) -> dict[str, Any]:
    site = next((venv / "lib").glob("python*/site-packages"))
    tops: dict[str, float] = {}
    for p in site.iterdir():
        if p.name.endswith((".dist-info", ".pth")) or p.name.startswith("_"):
            continue
        tops[p.name] = du_mib(p) if p.is_dir() else p.stat().st_size / 2**20
    biggest = dict(sorted(tops.items(), key=lambda kv: -kv[1])[:6])
    return {"venv_mib": du_mib(venv), "site_packages_mib": du_mib(site), "largest_mib": biggest}


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Runtime backends: TorchScript against ONNX Runtime",
        "",
        f"`{report['command']}` on {machine_line(m)}; torch {m['torch']}, onnxruntime "
        f"{report['onnxruntime']}, load average {m['load_average']} at the start (the cores "
        "are shared with other jobs: read ratios, not absolute times; a second thread on two "
        "busy cores mostly waits).",
        "",
        "## Head and tail at batch 1 (median ms)",
        "",
        "Head: every segment and exit (no early exit), through `HeadRunner.run`; tail: one "
        "8-bit all-channel code through `TailRunner.run_codes` (dequantize, zero-fill, tail, "
        "softmax).",
        "",
        "| bundle | threads | torch head | onnxruntime head | torch tail | onnxruntime tail |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    by = {(r["bundle"], r["threads"], r["backend"]): r for r in report["compute"]}
    for bundle, n in dict.fromkeys((r["bundle"], r["threads"]) for r in report["compute"]):
        t, o = by[(bundle, n, "torch")], by[(bundle, n, "onnxruntime")]
        lines.append(
            f"| {bundle} | {n} | {t['head_ms']:.3f} | {o['head_ms']:.3f} | {t['tail_ms']:.3f} "
            f"| {o['tail_ms']:.3f} |"
        )
    lines += [
        "",
        "## Tail throughput by batch size (one thread, samples/s)",
        "",
        "What a server worker runs per batch: `TailRunner.run_codes` on b one-sample codes.",
        "",
        "| bundle | batch | torch | onnxruntime |",
        "| --- | ---: | ---: | ---: |",
    ]
    tp = {(r.get("bundle", ""), r["backend"], r["batch"]): r for r in report["throughput"]}
    for name in dict.fromkeys(r.get("bundle", "") for r in report["throughput"]):
        for b in BATCHES:
            lines.append(
                f"| {name} | {b} | {tp[(name, 'torch', b)]['samples_per_s']:,.0f} | "
                f"{tp[(name, 'onnxruntime', b)]['samples_per_s']:,.0f} |"
            )
    lines += [
        "",
        "## Agent start-up (one image, local-only; median of 3)",
        "",
        "| runtime | install | start-up to exit (s) | peak RSS (MiB) |",
        "| --- | --- | ---: | ---: |",
    ]
    for r in report["startup"]:
        lines.append(
            f"| {r['runtime']} | {r['install']} | {r['startup_s']:.2f} | {r['rss_mib']:.0f} |"
        )
    v = report.get("venv")
    if v:
        largest = ", ".join(f"{k} {mib:.0f}" for k, mib in v["largest_mib"].items())
        lines += [
            "",
            "## The torch-free device venv",
            "",
            f"`pip install '.[device]'` into a fresh venv: **{v['venv_mib']:.0f} MiB** in all "
            f"({v['site_packages_mib']:.0f} MiB of site-packages; largest, MiB: {largest}). "
            "For comparison, issue 15 measured a Raspberry Pi OS (arm64) venv with torch from "
            "PyPI at 5.5 GB.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=200, help="timed calls per cell (200)")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated (1,2)")
    p.add_argument("--large-bundle", type=Path, help="also time this (large-track) bundle")
    p.add_argument("--device-venv", type=Path, help="a device venv to measure (default: build)")
    p.add_argument("--no-venv", action="store_true", help="skip the device venv")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    import onnxruntime

    threads = [int(t) for t in args.threads.split(",")]
    bundles = [default_bundle_path()] + ([args.large_bundle] if args.large_bundle else [])
    report: dict[str, Any] = {
        "command": "python benchmarks/runtime_backends.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "onnxruntime": onnxruntime.__version__,
        "compute": [row for b in bundles for row in compute_times(b, threads, args.reps)],
        "throughput": [row for b in bundles for row in tail_throughput(b, args.reps)],
    }
    venv, made = (None, False) if args.no_venv else device_venv(args.device_venv)
    report["startup"] = startup(bundles[0], venv)
    if venv is not None:
        report["venv"] = venv_size(venv)
        if made:
            shutil.rmtree(venv.parent, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runtime_backends.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "runtime_backends.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
