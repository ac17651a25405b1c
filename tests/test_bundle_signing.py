"""Bundle signing: `splitexit sign` writes an ed25519 signature of the manifest; a server or
an agent given `--trusted-key` loads only bundles signed by a trusted key and unchanged since,
and says in one line (exit 2) why it refuses the others."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from splitexit.bundle import load_bundle
from splitexit.bundle.manifest import MANIFEST_FILE, Manifest, sha256_file
from splitexit.bundle.sign import SIGNATURE_FILE
from splitexit.cli import main as splitexit_main
from splitexit.errors import BundleError
from splitexit.preprocess import encode_image
from splitexit_device.cli import main as device_main
from splitexit_server.cli import main as server_main

pytest.importorskip("cryptography")


def keypair(root: Path, name: str) -> tuple[Path, Path]:
    """An ed25519 key pair as the README makes it (openssl when present, else the library)."""
    private, public = root / f"{name}.pem", root / f"{name}.pub"
    if shutil.which("openssl"):
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], check=True
        )
        subprocess.run(
            ["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True
        )
        return private, public
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.fixture
def bundle(tmp_path: Path, tiny_bundle) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, root)
    return root


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: keypair(tmp_path, name) for name in ("fleet", "other")}


def sign(bundle: Path, key: Path) -> None:
    assert splitexit_main(["sign", str(bundle), "--key", str(key)]) == 0


def test_a_signed_bundle_loads_with_its_key_and_anywhere_without_one(bundle, keys, tmp_path):
    sign(bundle, keys["fleet"][0])
    assert (bundle / SIGNATURE_FILE).is_file()
    assert load_bundle(bundle, parts=("tail",), trusted_keys=[keys["fleet"][1]])
    assert load_bundle(bundle, parts=("tail",))  # the signature file is no unlisted file
    trusted = [keys["other"][1], keys["fleet"][1]]  # one of several trusted keys is enough
    assert load_bundle(bundle, parts=("tail",), trusted_keys=trusted)
    archive = tmp_path / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="bundle")
    assert load_bundle(archive, parts=("tail",), trusted_keys=[keys["fleet"][1]])


def rewrite_everything(bundle: Path) -> None:
    """Change a weight file and recompute every hash and the fingerprint: what passes every
    check but a signature."""
    f = bundle / "weights.pt"
    f.write_bytes(f.read_bytes() + b"\0")
    d = json.loads((bundle / MANIFEST_FILE).read_text())
    d["files"] = {rel: sha256_file(bundle / rel) for rel in d["files"]}
    d["fingerprint"] = Manifest.from_dict({**d, "fingerprint": "0" * 64}).compute_fingerprint()
    (bundle / MANIFEST_FILE).write_text(json.dumps(d))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unsigned", "is not signed"),
        ("other key", "not trusted here"),
        ("rewritten after signing", "changed after it was signed"),
    ],
)
def test_a_bundle_not_signed_by_a_trusted_key_is_refused(bundle, keys, case, message):
    if case == "other key":
        sign(bundle, keys["other"][0])
    elif case == "rewritten after signing":
        sign(bundle, keys["fleet"][0])
        rewrite_everything(bundle)
        assert load_bundle(bundle, parts=("tail",))  # every hash checks out
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle, parts=("tail",), trusted_keys=[keys["fleet"][1]])


def test_server_and_agent_refuse_an_untrusted_bundle_in_one_line_exit_2(
    bundle, keys, tmp_path, capsys
):
    sign(bundle, keys["other"][0])
    capsys.readouterr()
    trusted = str(keys["fleet"][1])
    quiet = ["--log-level", "critical"]  # main() configures logging onto captured stderr
    code = server_main(["--bundle", str(bundle), "--trusted-key", trusted, "--check", *quiet])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "not trusted here" in err, err
    png = tmp_path / "x.png"
    png.write_bytes(encode_image(np.zeros((28, 28), dtype=np.uint8)))
    args = ["run", "--bundle", str(bundle), "--trusted-key", trusted, "--local-only"]
    code = device_main([*args, "--no-progress", "--source", str(png)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "not trusted here" in err, err
    # with the right key both start
    sign(bundle, keys["fleet"][0])
    assert server_main(["--bundle", str(bundle), "--trusted-key", trusted, "--check", *quiet]) == 0


def test_signing_with_a_public_key_or_an_archive_says_what_to_do(bundle, keys, tmp_path, capsys):
    assert splitexit_main(["sign", str(bundle), "--key", str(keys["fleet"][1])]) == 2
    assert "not a PEM private key" in capsys.readouterr().err
    archive = tmp_path / "b.tar"
    archive.write_bytes(b"")
    assert splitexit_main(["sign", str(archive), "--key", str(keys["fleet"][0])]) == 2
    assert "sign the directory, then pack it" in capsys.readouterr().err
