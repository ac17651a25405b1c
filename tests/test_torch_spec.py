"""`scripts/torch-spec` (what `make setup` installs first) picks PyTorch's CPU wheel index
when it answers, says so when it does not, and leaves GPU machines the default build.

`curl` and `nvidia-smi` are stand-ins on PATH: the script's decision is what is tested, the
network answer is what each stand-in says.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "torch-spec"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torch_spec(tmp_path: Path, **tools: int) -> subprocess.CompletedProcess[str]:
    """Run the script with only `sh` and the given stand-in tools (name -> exit status)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, status in tools.items():
        tool = bin_dir / name.replace("_", "-")
        tool.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/{tool.name}.args"\nexit {status}\n')
        tool.chmod(0o755)
    sh = shutil.which("sh")
    assert sh is not None
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return subprocess.run(
        [sh, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30, check=True
    )


def test_without_a_gpu_the_cpu_build_comes_from_pytorchs_cpu_index(tmp_path):
    out = torch_spec(tmp_path, curl=0)
    assert out.stdout.split() == ["--index-url", CPU_INDEX, "torch==2.13.0"]
    assert out.stderr == ""
    assert f"{CPU_INDEX}/torch/" in (tmp_path / "curl.args").read_text()


def test_an_unreachable_index_falls_back_to_the_pin_and_says_so(tmp_path):
    out = torch_spec(tmp_path, curl=6)  # curl: could not resolve host
    assert out.stdout.split() == ["torch==2.13.0"]
    assert "not reachable" in out.stderr and "CUDA build" in out.stderr and "TORCH=" in out.stderr


def test_a_machine_with_an_nvidia_driver_gets_the_default_torch(tmp_path):
    out = torch_spec(tmp_path, nvidia_smi=0, curl=0)
    assert out.stdout.split() == ["torch"]
    assert not (tmp_path / "curl.args").exists()  # no probe needed


def test_the_real_probe_ends_in_a_torch_requirement_within_seconds():
    # whatever this machine's network says (here: only PyPI answers), setup gets a pin
    out = subprocess.run(
        ["sh", str(SCRIPT)], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.split()[-1] in ("torch==2.13.0", "torch")
