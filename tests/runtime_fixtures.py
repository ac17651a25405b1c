"""Shared helpers for the runtime-backend tests: Fashion-MNIST test images as PNG folders,
the device agent run as a real subprocess (optionally with torch made unimportable), and
the comparison of two runs' records.

Import what a test module needs: `from runtime_fixtures import fmnist_folder, run_agent_cli`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from splitexit.bundle import load_bundle
from splitexit.zoo import default_bundle_path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = default_bundle_path()

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


def fmnist_folder(root: Path, n: int = 40) -> Path:
    """The first `n` Fashion-MNIST test images as PNGs in class folders under `root`."""
    from splitexit.errors import DatasetError
    from splitexit.preprocess import encode_image

    try:
        from splitexit.data import load_fashion_mnist

        images, labels = load_fashion_mnist("test", download=False)
    except DatasetError as e:
        pytest.skip(f"Fashion-MNIST is not installed here (make data): {e}")
    names = load_bundle(SHIPPED, parts=()).manifest.class_names
    for i in range(n):
        folder = root / names[int(labels[i])].replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(encode_image(images[i]))
    return root


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


def imported_blocked(proc: subprocess.CompletedProcess[str]) -> list[str]:
    for line in proc.stderr.splitlines():
        if line.startswith("IMPORTED "):
            return json.loads(line[len("IMPORTED ") :])
    raise AssertionError(f"the agent did not report its imports:\n{proc.stderr[-2000:]}")


def parity_tolerance(bundle_path: Path = SHIPPED) -> float:
    """How far two backends' confidences may differ: twice the largest logit difference
    the bundle's manifest records for an exit or the tail (softmax moves no more than its
    logits, per measure at most twice), and never under float32 noise."""
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
