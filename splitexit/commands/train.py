"""`splitexit train CONFIG`: run (or resume) a whole experiment from one TOML file."""

from __future__ import annotations

import argparse

from splitexit.train.config import resolve_config, shipped_configs
from splitexit.train.resume import STAGES

HELP = "run or resume an experiment from a TOML config"
DESCRIPTION: str | None = (
    "Train teacher, bottleneck (head distillation + KD fine-tuning) and exits "
    "as the config says, evaluate every (channels, bits) point on the test set, and export "
    "a bundle. Re-running the same config resumes from the last finished epoch; a changed "
    "config is refused unless --restart-from names the stage to retrain from. Runs "
    "unchanged under `torchrun --nproc-per-node N -m splitexit train CONFIG`."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        help="TOML config path, or a shipped config: " + ", ".join(sorted(shipped_configs())),
    )
    parser.add_argument("--output", help="run directory (default: the config's, runs/<name>)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config")
    parser.add_argument("--no-export", action="store_true", help="do not write a bundle at the end")
    parser.add_argument(
        "--restart-from",
        choices=STAGES,
        help="retrain this stage and every later one (deletes their checkpoints, results and "
        "bundle); needed when the config changed since the run was trained",
    )


def run(args: argparse.Namespace) -> int:
    from splitexit.train.config import load_config
    from splitexit.train.pipeline import run_experiment

    cfg = load_config(resolve_config(args.config))
    if args.output:
        cfg.output = args.output
    if args.device:
        cfg.device = args.device
    run_experiment(cfg, export=not args.no_export, restart_from=args.restart_from)
    return 0
