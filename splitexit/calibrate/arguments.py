"""The arguments of `splitexit calibrate` and its entry point, importable without torch.

p = sub.add_parser("calibrate", help=...)
add_arguments(p)
p.set_defaults(func=calibrate_main)
"""

from __future__ import annotations

import argparse

# the same as goals.GOALS and exits.CONFIDENCE_MEASURES (a test keeps them in sync), written
# out so that building the parser imports no torch
GOAL_CHOICES = ("accuracy", "offload", "latency")
MEASURE_CHOICES = ("max_prob", "margin", "entropy", "auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `calibrate` command's arguments to `parser`."""
    parser.add_argument("bundle", help="bundle directory (its manifest is rewritten in place)")
    data = parser.add_argument_group("data (default: Fashion-MNIST, held out as training does)")
    data.add_argument(
        "--config",
        help="experiment config (TOML, shipped name, or a run's "
        "config.json): use exactly its calibration and test splits",
    )
    data.add_argument("--images", help="image folder (root/<class>/<image>) to calibrate on")
    data.add_argument("--test-images", help="image folder to check the promise on")
    data.add_argument("--seed", type=int, default=0, help="Fashion-MNIST split seed (0)")
    data.add_argument(
        "--calibration-size",
        type=int,
        default=5000,
        help="Fashion-MNIST images held out of training for calibration (5000)",
    )
    data.add_argument("--subset", type=int, help="use at most this many samples per split")
    data.add_argument(
        "--load-tables",
        metavar="DIR",
        help="read DIR/calibration.npz (and DIR/test.npz) instead of running",
    )
    data.add_argument("--save-tables", metavar="DIR", help="write the recorded tables to DIR")
    data.add_argument("--batch-size", type=int, default=256)
    data.add_argument("--device", default="cpu", help="torch device to run the bundle on")

    goal = parser.add_argument_group("goal")
    goal.add_argument(
        "--goal",
        choices=GOAL_CHOICES,
        default="accuracy",
        help="accuracy: stay within --max-drop of the tail, offload least; "
        "offload: offload at most --offload-rate, most accurate; "
        "latency: least expected latency with an accuracy floor",
    )
    goal.add_argument(
        "--max-drop",
        type=float,
        default=None,
        help="accuracy floor in points below the tail's (default 1.0; none for the offload goal)",
    )
    goal.add_argument("--min-accuracy", type=float, help="absolute accuracy floor, percent")
    goal.add_argument("--offload-rate", type=float, help="offload goal: at most this, percent")
    goal.add_argument(
        "--measure",
        choices=MEASURE_CHOICES,
        default="auto",
        help="confidence measure of the exits; auto tries each (default)",
    )
    goal.add_argument(
        "--point",
        help="operating point K,BITS offloads are sent at (default "
        "the widest; the latency goal searches all)",
    )
    goal.add_argument(
        "--conservative",
        action="store_true",
        help="hold the floor with Clopper-Pearson lower bounds on exit accuracy",
    )
    goal.add_argument(
        "--confidence", type=float, default=0.95, help="confidence level of the bounds (0.95)"
    )
    goal.add_argument(
        "--candidates",
        type=int,
        default=100,
        help="candidate thresholds per exit (confidence quantiles, 100)",
    )
    goal.add_argument(
        "--sweep",
        action="store_true",
        help="also report target vs achieved for X = 0.5, 1, 2, plain and conservative",
    )

    link = parser.add_argument_group("latency goal: link and timings")
    link.add_argument(
        "--link",
        metavar="SPEC",
        help="the link as RATE:RTT, e.g. 5mbit:20ms (overrides --bandwidth-mbps/--rtt-ms)",
    )
    link.add_argument("--bandwidth-mbps", type=float, default=5.0, help="uplink Mbit/s (5)")
    link.add_argument("--rtt-ms", type=float, default=20.0, help="round trip ms (20)")
    link.add_argument(
        "--overhead-bytes",
        type=float,
        default=0.0,
        help="per-request bytes on top of the frame (HTTP, protocol header)",
    )
    link.add_argument("--segment-ms", type=float, nargs="+", help="device ms per head segment")
    link.add_argument("--exit-ms", type=float, nargs="+", help="device ms per exit")
    link.add_argument("--encode-ms", type=float, default=None, help="device ms to frame")
    link.add_argument("--tail-ms", type=float, help="server ms for the tail")
    link.add_argument(
        "--device-speed",
        type=float,
        default=1.0,
        help="device slowdown vs this machine for measured head times (1.0)",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--dry-run", action="store_true", help="do not rewrite the manifest")
    out.add_argument(
        "--force",
        action="store_true",
        help="write thresholds even if the goal is not met on the calibration split or the "
        "promise is missed on the test split (exit status 1 either way)",
    )
    out.add_argument("--json", metavar="PATH", help="write the selection and check as JSON")


def calibrate_main(args: argparse.Namespace) -> int:
    """Run `splitexit calibrate` with parsed arguments; returns the exit code (0: thresholds
    meet the goal and, when a test split is given, keep the promise there; 1 otherwise)."""
    from .command import run

    return run(args)
