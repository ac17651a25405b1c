"""The `splitexit` subcommands: one module each, all of one shape.

A module holds one subcommand's arguments and the glue from them to the library:

    HELP                  the line `splitexit --help` lists it with
    DESCRIPTION           what `splitexit NAME --help` says above the options (or None)
    add_arguments(parser) its arguments; imports no torch (the parser is built first)
    run(args) -> int      the work, done by the library; returns the exit status

`splitexit.cli` registers `COMMANDS` in this order and turns a `SplitexitError` into one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
from typing import Protocol

from . import calibrate, demo, export, inspect, models, onnx, profile, sign, train


class Command(Protocol):
    """The shape of a subcommand module (a module satisfies it, as type checkers see)."""

    HELP: str
    DESCRIPTION: str | None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


#: name -> module, in the order `splitexit --help` lists them
COMMANDS: dict[str, Command] = {
    "models": models,
    "train": train,
    "export": export,
    "onnx": onnx,
    "calibrate": calibrate,
    "profile": profile,
    "demo": demo,
    "sign": sign,
    "inspect": inspect,
}

__all__ = ["COMMANDS", "Command"]
