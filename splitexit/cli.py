"""The `splitexit` command: the entry point that registers `splitexit.commands`.

splitexit models                 the splittable architectures and their split points
splitexit train CONFIG           run (or resume) a whole experiment from one TOML file
splitexit export RUN_DIR         turn a finished run into a deployment bundle
splitexit onnx BUNDLE            add ONNX graphs (checked for parity) to a bundle in place
splitexit calibrate BUNDLE       choose exit thresholds for a goal, check them, write them
splitexit profile MODEL          time and size every split point of a model; recommend one
splitexit demo                   tail server + device agent end to end on Fashion-MNIST
splitexit sign BUNDLE --key KEY  sign a bundle (servers and devices check it: --trusted-key)
splitexit inspect BUNDLE         print a bundle's manifest readably

Each subcommand is one module of `splitexit.commands` (its arguments and `run`); `main`
turns a `SplitexitError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from .commands import COMMANDS
from .errors import SplitexitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitexit",
        description="Split computing with a learned bottleneck and early exits for edge devices.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `splitexit COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SplitexitError as exc:
        print(f"splitexit: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        print(
            f"splitexit: error: `splitexit {args.command}` needs torch, which a device install "
            "leaves out: pip install 'splitexit[torch]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("splitexit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
