"""The `splitexit-device` command (placeholder until its issue lands)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="splitexit-device", description="The splitexit device agent. Not implemented yet."
    )
    parser.parse_args(argv)
    parser.print_help()
    return 0
