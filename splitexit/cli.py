"""The `splitexit` command: train, export, inspect, and list the model zoo.

splitexit models                 the splittable architectures and their split points
splitexit train CONFIG           run (or resume) a whole experiment from one TOML file
splitexit export RUN_DIR         turn a finished run into a deployment bundle
splitexit onnx BUNDLE            add ONNX graphs (checked for parity) to a bundle in place
splitexit inspect BUNDLE         print a bundle's manifest readably
splitexit sign BUNDLE --key KEY  sign a bundle (servers and devices check it: --trusted-key)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import SplitexitError
from .train.config import resolve_config, shipped_configs
from .train.resume import STAGES


def cmd_models(args: argparse.Namespace) -> int:
    from .models import get_spec, list_models

    if args.model:
        return _describe_reference(args.model, args.kwargs)
    for name in list_models():
        spec = get_spec(name)
        pre = spec.preprocessing
        print(f"{name}: {spec.description}")
        print(f"    input {pre.channels}x{pre.size[0]}x{pre.size[1]}, {spec.num_classes} classes")
        print(f"    split points {', '.join(spec.split_points)} (default {spec.default_split})")
        print(f"    exit points {', '.join(spec.exit_points)}")
    return 0


def _describe_reference(ref: str, kwargs_json: str | None) -> int:
    """Print the split / exit points of one model: a zoo name or the user's factory."""
    from .models import get_spec, valid_split_points
    from .models.reference import build_reference, is_zoo_name

    if is_zoo_name(ref):
        try:
            spec = get_spec(ref)
        except ValueError as e:
            raise SplitexitError(f"{e}; or name your own model as module:factory") from None
        print(f"{ref}: {spec.description}")
        print(f"    split points {', '.join(spec.split_points)} (default {spec.default_split})")
        print(f"    exit points {', '.join(spec.exit_points)}")
        return 0
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as e:
        raise SplitexitError(f"--kwargs must be a JSON object: {e}") from None
    if not isinstance(kwargs, dict):
        raise SplitexitError("--kwargs must be a JSON object, e.g. '{\"width\": 16}'")
    model = build_reference(ref, kwargs)
    points = valid_split_points(model)
    print(f"{ref}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} params")
    print(f"    split and exit points (in execution order): {', '.join(points) or '(none)'}")
    print("    (use them as split.point and exits.points; dots become _ in the bundle's names)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train.config import load_config
    from .train.pipeline import run_experiment

    cfg = load_config(resolve_config(args.config))
    if args.output:
        cfg.output = args.output
    if args.device:
        cfg.device = args.device
    run_experiment(cfg, export=not args.no_export, restart_from=args.restart_from)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .train.export import export_run, rebuild_run

    if args.triton and not args.onnx:
        raise SplitexitError("--triton goes with --onnx (the Triton model is the ONNX tail)")
    if args.onnx:
        _require_onnx()
    cfg, net, pre, classes, results, provenance = rebuild_run(args.run, args.class_names)
    path = export_run(
        cfg,
        net,
        pre,
        classes,
        results,
        provenance,
        args.output or Path(args.run) / "bundle",
        onnx=args.onnx,
        keep_calibration=not args.reset_thresholds,
    )
    if args.triton:
        import shutil

        for model in sorted((path / "onnx" / "triton").iterdir()):  # written by onnx=True
            shutil.copytree(model, Path(args.triton) / model.name, dirs_exist_ok=True)
            print(f"Triton model written to {Path(args.triton) / model.name}")
    print(f"bundle written to {path}")
    return 0


def _require_onnx() -> None:
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise SplitexitError(
            f"--onnx needs {' and '.join(missing)}: pip install 'splitexit[export]'"
        )


def cmd_onnx(args: argparse.Namespace) -> int:
    from .bundle.onnx import add_onnx

    _require_onnx()
    record = add_onnx(args.bundle, triton=args.triton)
    worst = max(record["max_abs_diff"].values())
    agree = min(record["argmax_agreement"].values())
    print(
        f"ONNX graphs added to {args.bundle} (opset {record['opset']}): max abs difference "
        f"{worst:.2g}, argmax agreement {agree:.1%} on {record['samples']} samples; "
        "fingerprint unchanged"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

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


def cmd_inspect(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .bundle.inspect import format_manifest

    bundle = load_bundle(args.bundle, verify=not args.no_verify, parts=())
    print(format_manifest(bundle.manifest))
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from .bundle.sign import sign_bundle

    out = sign_bundle(args.bundle, args.key)
    print(f"signed {args.bundle}: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitexit",
        description="Split computing with a learned bottleneck and early exits for edge devices.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `splitexit COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "models",
        help="list the splittable architectures, or one model's split points",
        description="Without MODEL: the zoo. With MODEL (a zoo name, package.module:factory "
        "or path/to/file.py:factory): where that model can be cut and where exits may go.",
    )
    p.add_argument("model", nargs="?", help="a zoo name or module:factory reference")
    p.add_argument("--kwargs", help="JSON object of keyword arguments for the factory")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "train",
        help="run or resume an experiment from a TOML config",
        description="Train teacher, bottleneck (head distillation + KD fine-tuning) and exits "
        "as the config says, evaluate every (channels, bits) point on the test set, and export "
        "a bundle. Re-running the same config resumes from the last finished epoch; a changed "
        "config is refused unless --restart-from names the stage to retrain from. Runs "
        "unchanged under `torchrun --nproc-per-node N -m splitexit train CONFIG`.",
    )
    p.add_argument(
        "config",
        help="TOML config path, or a shipped config: " + ", ".join(sorted(shipped_configs())),
    )
    p.add_argument("--output", help="run directory (default: the config's, runs/<name>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config")
    p.add_argument("--no-export", action="store_true", help="do not write a bundle at the end")
    p.add_argument(
        "--restart-from",
        choices=STAGES,
        help="retrain this stage and every later one (deletes their checkpoints, results and "
        "bundle); needed when the config changed since the run was trained",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export",
        help="write a bundle from a finished run directory",
        description="Rebuild a finished run's model from its config.json (model reference and "
        "kwargs) and model.pt, and write its bundle. Exporting over the run's bundle keeps "
        "its fingerprint and its calibrated thresholds (same weights, same fingerprint), "
        "so deployed devices keep working.",
    )
    p.add_argument("run", help="run directory holding config.json, model.pt and results.json")
    p.add_argument("--output", help="bundle directory (default: RUN/bundle)")
    p.add_argument("--class-names", nargs="+", help="class names (default: the dataset's)")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write ONNX graphs of head, exits and tail into the bundle (export extra)",
    )
    p.add_argument(
        "--triton",
        metavar="DIR",
        help="with --onnx: also write a Triton model repository for the tail to DIR",
    )
    p.add_argument(
        "--reset-thresholds",
        action="store_true",
        help="drop the calibrated exit thresholds of the bundle being replaced",
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "onnx",
        help="add ONNX graphs of head, exits and tail to a bundle (fingerprint unchanged)",
        description="Export a bundle directory's TorchScript pieces to ONNX into its onnx/ "
        "folder, check them against TorchScript on sample inputs (the parity goes into the "
        "manifest), and list them, so `--runtime onnxruntime` can run it without torch. "
        "The fingerprint covers the weights, not the files: deployed devices keep working.",
    )
    p.add_argument("bundle", help="bundle directory")
    p.add_argument(
        "--triton", action="store_true", help="also keep a Triton model of the tail in onnx/triton"
    )
    p.set_defaults(func=cmd_onnx)

    from . import profile as profile_cmd
    from .calibrate import add_arguments as calibrate_arguments
    from .calibrate import calibrate_main

    p = sub.add_parser(
        "calibrate",
        help="choose exit thresholds for a goal, check them on held-out data, write them",
    )
    calibrate_arguments(p)
    p.set_defaults(func=calibrate_main)

    p = sub.add_parser("profile", help="time and size every split point of a model; recommend one")
    profile_cmd.add_arguments(p)
    p.set_defaults(func=profile_cmd.profile_main)

    p = sub.add_parser(
        "demo",
        help="run tail server + device agent end to end on Fashion-MNIST",
        description="Start the tail server on a free loopback port, run the device agent over "
        "the Fashion-MNIST test set through it, and print a report: accuracy against the "
        "teacher's, exit and offload rates, bytes per input against sending the image, "
        "latency percentiles. Uses the shipped small-track bundle unless --bundle is given.",
    )
    p.add_argument("--bundle", help="bundle directory or archive (default: the shipped one)")
    p.add_argument(
        "--data",
        help="a folder of images, one sub-folder per class (default: the Fashion-MNIST test set)",
    )
    p.add_argument(
        "--link",
        metavar="RATE:RTT",
        help="emulate a link between agent and server, e.g. 5mbit:20ms",
    )
    p.add_argument("--limit", type=int, help="use only the first N inputs")
    p.add_argument(
        "--out", help="where records, summary and report go (default: $TMPDIR/splitexit-demo)"
    )
    p.add_argument(
        "--policy",
        choices=["adaptive", "fixed"],
        default="adaptive",
        help="the agent's offload policy (default: adaptive)",
    )
    p.add_argument(
        "--deadline-ms",
        type=float,
        help="adaptive policy: per-input latency budget (answer locally when no "
        "offload can meet it)",
    )
    p.add_argument(
        "--accuracy-floor",
        type=float,
        help="adaptive policy: lowest accuracy an operating point may have",
    )
    p.add_argument("--local-only", action="store_true", help="no server: answer on the device")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "sign",
        help="sign a bundle with an ed25519 key (servers and devices: --trusted-key)",
        description="Write BUNDLE/manifest.sig, an ed25519 signature of its manifest (which "
        "holds every file's sha256). Make a key with `openssl genpkey -algorithm ed25519 -out "
        "signing.pem` and give servers and devices its public half (`openssl pkey -in "
        "signing.pem -pubout -out signing.pub`). Sign again after calibrating.",
    )
    p.add_argument("bundle", help="bundle directory (sign it, then pack it)")
    p.add_argument("--key", required=True, help="ed25519 private key, PEM")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("inspect", help="print a bundle's manifest readably")
    p.add_argument("bundle", help="bundle directory or archive")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
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
