"""`splitexit sign BUNDLE --key KEY`: sign a bundle (servers and devices check it)."""

from __future__ import annotations

import argparse

HELP = "sign a bundle with an ed25519 key (servers and devices: --trusted-key)"
DESCRIPTION: str | None = (
    "Write BUNDLE/manifest.sig, an ed25519 signature of its manifest (which "
    "holds every file's sha256). Make a key with `openssl genpkey -algorithm ed25519 -out "
    "signing.pem` and give servers and devices its public half (`openssl pkey -in "
    "signing.pem -pubout -out signing.pub`). Sign again after calibrating."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (sign it, then pack it)")
    parser.add_argument("--key", required=True, help="ed25519 private key, PEM")


def run(args: argparse.Namespace) -> int:
    from splitexit.bundle.sign import sign_bundle

    out = sign_bundle(args.bundle, args.key)
    print(f"signed {args.bundle}: {out}")
    return 0
