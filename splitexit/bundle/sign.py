"""Bundle signatures: ed25519 over `manifest.json`, which holds the sha256 of every file.

    splitexit sign BUNDLE --key signing.pem ─► BUNDLE/manifest.sig
    load_bundle(BUNDLE, trusted_keys=[signing.pub]) ─ hashes check ─ manifest.sig made by one
        of the trusted keys over these very manifest bytes? ─ else BundleError (unsigned,
        signed by another key, or changed since it was signed)

Since loading refuses a file whose sha256 is not the manifest's and any file the manifest
does not list, a signature over the manifest covers the whole bundle. Editing the manifest
(e.g. `splitexit calibrate` writing thresholds) voids the signature: sign again after it.

Keys are PEM files, made with OpenSSL (the private one stays with whoever publishes bundles;
servers and devices get the public one):

    openssl genpkey -algorithm ed25519 -out signing.pem
    openssl pkey -in signing.pem -pubout -out signing.pub

Needs the `cryptography` package (the `signing` extra).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitexit.errors import BundleError

from .manifest import MANIFEST_FILE

SIGNATURE_FILE = "manifest.sig"
ALGORITHM = "ed25519"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError(
            "bundle signatures need the cryptography package: pip install 'splitexit[signing]'"
        ) from None
    return serialization, ed25519


def _read_key(path: str | os.PathLike[str], private: bool) -> Any:
    serialization, ed25519 = _crypto()
    kind = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read the {kind} key {path}: {e}") from None
    try:
        if private:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise BundleError(
            f"{path} is not a PEM {kind} key ({e}); make one with `openssl genpkey -algorithm "
            "ed25519` (see splitexit.bundle.sign)"
        ) from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise BundleError(f"{path} is not an ed25519 {kind} key; bundles are signed with ed25519")
    return key


def key_id(public_key: Any) -> str:
    """A short name for a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_bundle(bundle_dir: str | os.PathLike[str], key: str | os.PathLike[str]) -> Path:
    """Sign a bundle directory's manifest with the ed25519 private key in `key` (PEM);
    returns the signature file written into the bundle. Re-signing replaces it."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory: sign the directory, then pack it")
    manifest = root / MANIFEST_FILE
    if not manifest.is_file():
        raise BundleError(f"{manifest} not found: {root} is not a splitexit bundle")
    private = _read_key(key, private=True)
    signature = private.sign(manifest.read_bytes())
    doc = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private.public_key()),
        "signature": base64.b64encode(signature).decode(),
    }
    out = root / SIGNATURE_FILE
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return out


def verify_signature(
    bundle_dir: str | os.PathLike[str], trusted_keys: Sequence[str | os.PathLike[str]]
) -> str:
    """Check that one of `trusted_keys` (PEM public keys) signed this bundle's manifest;
    returns that key's id. Raises BundleError saying what is wrong and what to do."""
    root = Path(bundle_dir)
    keys = {key_id(k): k for k in (_read_key(p, private=False) for p in trusted_keys)}
    sig_file = root / SIGNATURE_FILE
    if not sig_file.is_file():
        raise BundleError(
            f"bundle {root} is not signed, and a signed one is required (--trusted-key): "
            "sign it with `splitexit sign BUNDLE --key KEY`"
        )
    try:
        doc = json.loads(sig_file.read_text())
        signature = base64.b64decode(doc["signature"], validate=True)
        algorithm, signer = doc["algorithm"], str(doc.get("key_id"))
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{SIGNATURE_FILE} of bundle {root} is malformed: {e}") from None
    if algorithm != ALGORITHM:
        raise BundleError(f"{SIGNATURE_FILE} of bundle {root} uses {algorithm!r}, not ed25519")
    manifest = (root / MANIFEST_FILE).read_bytes()
    from cryptography.exceptions import InvalidSignature

    for kid, key in keys.items():
        try:
            key.verify(signature, manifest)
            return kid
        except InvalidSignature:
            continue
    trusted = ", ".join(sorted(keys))
    if signer in keys:
        raise BundleError(
            f"bundle {root}: the signature of key {signer} does not match {MANIFEST_FILE}: the "
            "bundle changed after it was signed (calibrated? tampered with?); sign it again"
        )
    raise BundleError(
        f"bundle {root} is signed by key {signer}, which is not trusted here (trusted: "
        f"{trusted}): sign it with a trusted key, or add that key's public half"
    )
