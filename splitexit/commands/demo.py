"""`splitexit demo`: tail server + device agent end to end on Fashion-MNIST."""

from __future__ import annotations

import argparse

HELP = "run tail server + device agent end to end on Fashion-MNIST"
DESCRIPTION: str | None = (
    "Start the tail server on a free loopback port, run the device agent over "
    "the Fashion-MNIST test set through it, and print a report: accuracy against the "
    "teacher's, exit and offload rates, bytes per input against sending the image, "
    "latency percentiles. Uses the shipped small-track bundle unless --bundle is given."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", help="bundle directory or archive (default: the shipped one)")
    parser.add_argument(
        "--data",
        help="a folder of images, one sub-folder per class (default: the Fashion-MNIST test set)",
    )
    parser.add_argument(
        "--link",
        metavar="RATE:RTT",
        help="emulate a link between agent and server, e.g. 5mbit:20ms",
    )
    parser.add_argument("--limit", type=int, help="use only the first N inputs")
    parser.add_argument(
        "--out", help="where records, summary and report go (default: $TMPDIR/splitexit-demo)"
    )
    parser.add_argument(
        "--policy",
        choices=["adaptive", "fixed"],
        default="adaptive",
        help="the agent's offload policy (default: adaptive)",
    )
    parser.add_argument(
        "--deadline-ms",
        type=float,
        help="adaptive policy: per-input latency budget (answer locally when no "
        "offload can meet it)",
    )
    parser.add_argument(
        "--accuracy-floor",
        type=float,
        help="adaptive policy: lowest accuracy an operating point may have",
    )
    parser.add_argument("--local-only", action="store_true", help="no server: answer on the device")


def run(args: argparse.Namespace) -> int:
    from splitexit.demo import run_demo

    agent_args = []
    if args.deadline_ms is not None:
        agent_args += ["--deadline-ms", str(args.deadline_ms)]
    if args.accuracy_floor is not None:
        agent_args += ["--accuracy-floor", str(args.accuracy_floor)]
    return run_demo(
        bundle=args.bundle,
        data=args.data,
        link=args.link,
        limit=args.limit,
        out=args.out,
        policy=args.policy,
        local_only=args.local_only,
        agent_args=agent_args,
    )
