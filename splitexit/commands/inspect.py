"""`splitexit inspect BUNDLE`: print a bundle's manifest readably."""

from __future__ import annotations

import argparse

HELP = "print a bundle's manifest readably"
DESCRIPTION: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory or archive")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")


def run(args: argparse.Namespace) -> int:
    from splitexit.bundle import load_bundle
    from splitexit.bundle.inspect import format_manifest

    bundle = load_bundle(args.bundle, verify=not args.no_verify, parts=())
    print(format_manifest(bundle.manifest))
    return 0
