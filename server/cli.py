"""The `splitexit-server` command (placeholder until its issue lands)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="splitexit-server",
        description="The splitexit tail server (Open Inference Protocol). Not implemented yet.",
    )
    parser.parse_args(argv)
    parser.print_help()
    return 0
