"""A real device install: a fresh venv with `pip install '<checkout>[device]'` holds no torch
and no fastapi, and its agent answers the shipped bundle, local-only and through the real
tail server, as the torch backend does, within the parity the bundle records.

The one test that downloads (the device extra from the package index); it skips, saying
why, when pip cannot reach an index. The venv is built once, under pytest's tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, SHIPPED, assert_same_answers, parity_tolerance, run_agent_cli

pytestmark = pytest.mark.slow

SERVER_TOL = 5e-3  # as in test_runtime_backends: one code value may round the other way
_SKIP_COPY = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "notebooks"
)


def _pip(python: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_clean_env(),
    )


def _clean_env() -> dict[str, str]:
    """The environment without this checkout on PYTHONPATH (the venv runs its own copy)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def in_venv(venv: Path, code: str) -> str:
    """What `code` prints, run by the venv's python outside this checkout."""
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=venv,
        check=True,
    )
    return out.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.getbasetemp() / "device-venv"
    python = root / "bin" / "python"
    if (root / ".installed").exists():
        return root
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    probe = _pip(python, "index", "versions", "onnxruntime", timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach a package index: {probe.stderr.strip()[-300:]}")
    src = root.parent / "device-venv-src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO, src, ignore=_SKIP_COPY)  # pip builds in the tree: keep ours clean
    out = _pip(python, "install", "--quiet", f"{src}[device]", timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    (root / ".installed").touch()
    return root


def test_device_install_has_no_torch_and_no_fastapi(venv: Path) -> None:
    code = (
        "import importlib.util, json\n"
        "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
        "('torch', 'fastapi', 'uvicorn', 'onnxruntime', 'splitexit_device', 'splitexit_server',"
        " 'device', 'server', 'splitexit')}))"
    )
    found = json.loads(in_venv(venv, code))
    assert found == {
        "torch": False,
        "fastapi": False,
        "uvicorn": False,
        "onnxruntime": True,
        "splitexit_device": True,
        "splitexit_server": True,  # installed, but importing it needs the server extra
        "device": False,  # no top-level names that collide with another package's
        "server": False,
        "splitexit": True,
    }


def installed_bundle(venv: Path) -> Path:
    """The shipped bundle as the venv installed it (package data, ONNX graphs included)."""
    code = "from splitexit.zoo import default_bundle_path; print(default_bundle_path())"
    path = Path(in_venv(venv, code).strip())
    assert path.is_relative_to(venv), f"the venv imported splitexit from {path}"
    return path


def test_splitexit_inspect_works_without_torch_and_names_both_runtimes(venv: Path) -> None:
    out = subprocess.run(
        [str(venv / "bin" / "splitexit"), "inspect", str(installed_bundle(venv))],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=venv,
    )
    assert out.returncode == 0, out.stderr
    assert "torch (TorchScript), onnxruntime (ONNX opset 17" in out.stdout
    models = subprocess.run(
        [str(venv / "bin" / "splitexit"), "models"], capture_output=True, text=True, cwd=venv
    )
    assert models.returncode == 2 and "pip install 'splitexit[torch]'" in models.stderr
    assert "Traceback" not in models.stderr


def test_torch_free_agent_answers_like_torch_locally_and_through_the_server(
    venv: Path, fmnist_images: Path, tail_server
) -> None:
    images = fmnist_images
    bundle = installed_bundle(venv)
    env = {**_clean_env(), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    device = {"python": str(venv / "bin" / "python"), "env": env, "cwd": venv}
    local = ["--bundle", str(bundle), "--source", str(images), "--local-only"]

    got, proc = run_agent_cli(local, **device)  # --runtime auto: onnxruntime is all there is
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, proc = run_agent_cli([*local[:4], "--local-only", "--runtime", "torch"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(got) == 40
    assert_same_answers(got, want, parity_tolerance(), SERVER_TOL)

    fixed = ["--policy", "fixed", "--channels", "12", "--bits", "8"]
    server = tail_server(SHIPPED, runtime="torch")
    remote = ["--bundle", str(bundle), "--source", str(images), "--server", server.url]
    got, proc = run_agent_cli([*remote, *fixed], **device)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote[1] = str(SHIPPED)
    want, proc = run_agent_cli([*remote, *fixed, "--runtime", "torch"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(r["decided_by"] == "server" for r in got) > 0
    assert_same_answers(got, want, parity_tolerance(), SERVER_TOL)
