"""A bundle that cannot load stops the server and the agent with one clear line and exit
status 2, never a traceback: damaged TorchScript behind recomputed hashes, a damaged archive,
a manifest that lies or is no JSON, preprocessing that cannot work."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from splitexit.bundle.manifest import MANIFEST_FILE, Manifest, sha256_file
from splitexit.preprocess import encode_image
from splitexit_device.cli import main as device_main
from splitexit_server.cli import main as server_main


def rehash(root: Path) -> None:
    """Recompute every file's sha256 and the fingerprint: damage no hash check can see."""
    d = json.loads((root / MANIFEST_FILE).read_text())
    d["files"] = {rel: sha256_file(root / rel) for rel in d["files"]}
    d["fingerprint"] = Manifest.from_dict({**d, "fingerprint": "0" * 64}).compute_fingerprint()
    (root / MANIFEST_FILE).write_text(json.dumps(d))


def truncate(rel: str) -> Callable[[Path], Path]:
    def damage(root: Path) -> Path:
        f = root / rel
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        rehash(root)
        return root

    return damage


def replace(rel: str, data: bytes) -> Callable[[Path], Path]:
    def damage(root: Path) -> Path:
        (root / rel).write_bytes(data)
        rehash(root)
        return root

    return damage


def edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def damage(root: Path) -> Path:
        d = json.loads((root / MANIFEST_FILE).read_text())
        change(d)
        (root / MANIFEST_FILE).write_text(json.dumps(d))
        rehash(root)
        return root

    return damage


def not_json(root: Path) -> Path:
    (root / MANIFEST_FILE).write_text('{"format": "splitexit-bundle", ')
    return root


def flipped_byte(root: Path) -> Path:
    f = root / "tail.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return root


def truncated_archive(root: Path) -> Path:
    archive = root.parent / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="bundle")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    return archive


def std_zero(d: dict) -> None:
    d["preprocessing"] = {**d["preprocessing"], "std": [0.0]}


def nan_accuracy(root: Path) -> Path:
    """No rehash: accuracies are not in the fingerprint, the manifest not in `files`."""
    d = json.loads((root / MANIFEST_FILE).read_text())
    d["operating_points"][0]["accuracy"] = float("nan")  # json.dumps writes NaN, loads reads it
    (root / MANIFEST_FILE).write_text(json.dumps(d))
    return root


def missing(root: Path) -> Path:
    return root.parent / "no-such-bundle"


# (name, damage, refused by the server, refused by the agent): both load head and tail (the
# agent may finish the tail itself), the agent also the exits
CASES = [
    ("truncated-tail", truncate("tail.pt"), True, True),
    ("truncated-head", truncate("head/segment_0.pt"), True, True),
    ("garbage-head", replace("head/segment_0.pt", b"\x00not torchscript" * 64), True, True),
    ("empty-tail", replace("tail.pt", b""), True, True),
    ("manifest-not-json", not_json, True, True),
    ("hash-mismatch", flipped_byte, True, True),
    ("truncated-archive", truncated_archive, True, True),
    ("preprocessing-std-zero", edit_manifest(std_zero), True, True),
    ("accuracy-nan", nan_accuracy, True, True),
    ("missing", missing, True, True),
]


@pytest.fixture(scope="module")
def png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("input") / "x.png"
    path.write_bytes(encode_image(np.zeros((28, 28), dtype=np.uint8)))
    return path


@pytest.fixture
def damaged(tiny_bundle, tmp_path: Path) -> Callable[[Callable[[Path], Path]], Path]:
    """`damaged(damage)`: a copy of the tiny bundle, then `damage(copy)`."""

    def make(damage: Callable[[Path], Path]) -> Path:
        root = tmp_path / "b"
        shutil.copytree(tiny_bundle.path, root)
        assert (root / "head" / "segment_0.pt").is_file()
        return damage(root)

    return make


def one_clear_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@dataclasses.dataclass
class Case:
    name: str
    damage: Callable[[Path], Path]
    server: bool
    agent: bool


@pytest.mark.parametrize("case", [Case(*c) for c in CASES], ids=[c[0] for c in CASES])
def test_a_bundle_that_cannot_load_is_one_line_and_exit_2(case: Case, damaged, png, capsys):
    path = damaged(case.damage)
    code = server_main(["--bundle", str(path), "--check", "--log-level", "critical"])
    err = capsys.readouterr().err
    if case.server:
        assert code == 2
        line = one_clear_line(err)
        assert line.startswith("splitexit-server: refusing to start:"), line
    else:
        assert code == 0, err

    args = ["run", "--bundle", str(path), "--local-only", "--no-progress", "--source", str(png)]
    code = device_main(args)
    err = capsys.readouterr().err
    if case.agent:
        assert code == 2
        assert one_clear_line(err).startswith("splitexit-device: cannot use the bundle:")
    else:
        assert code == 0, err


def test_a_nan_accuracy_is_refused_at_load_naming_it(damaged, capsys):
    """Served, it made the metadata endpoint answer 500 (NaN is not JSON)."""
    path = damaged(nan_accuracy)
    assert server_main(["--bundle", str(path), "--check", "--log-level", "critical"]) == 2
    line = one_clear_line(capsys.readouterr().err)
    assert "accuracy must be a fraction in [0, 1] or null, got nan" in line, line
