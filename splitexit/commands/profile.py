"""`splitexit profile MODEL`: time and size every split point of a model; recommend one."""

from __future__ import annotations

import argparse
from typing import Any

from splitexit.errors import SplitexitError
from splitexit.profile import DEFAULT_LINKS

HELP = "time and size every split point of a model; recommend one"
DESCRIPTION: str | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a model-zoo name (see `splitexit models`), package.module:factory or "
        "path/to/file.py:factory returning an nn.Module (then give --input-shape)",
    )
    parser.add_argument(
        "--input-shape",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        help="input shape (default: the zoo entry's)",
    )
    parser.add_argument("--points", nargs="+", help="split points to try (default: all)")
    parser.add_argument(
        "--device-speed",
        type=float,
        default=1.0,
        help="how many times slower the device is than this machine (1.0)",
    )
    parser.add_argument("--channels", type=int, default=12, help="bottleneck channels C (12)")
    parser.add_argument("--hidden", type=int, default=48, help="bottleneck conv width (48)")
    parser.add_argument(
        "--downsample",
        type=int,
        default=2,
        help="bottleneck stride-2 convs: code at 1/2**d resolution (2)",
    )
    parser.add_argument(
        "--bits", type=int, choices=(2, 4, 8), default=4, help="bits per bottleneck value (4)"
    )
    parser.add_argument(
        "--links",
        type=float,
        nargs="+",
        default=list(DEFAULT_LINKS),
        help="uplink rates in Mbit/s (1 5 20 100)",
    )
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip ms (20)")
    parser.add_argument(
        "--target-mbps", type=float, default=5.0, help="link rate to recommend for (5)"
    )
    parser.add_argument("--image", help="an image file whose encoded size full offload sends")
    parser.add_argument(
        "--image-format",
        choices=("png", "jpeg"),
        help="how full offload encodes the input (png for gray, else jpeg)",
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per piece (20)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the profile as JSON")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options: dict[str, Any] = {
        "points": args.points,
        "device_speed": args.device_speed,
        "channels": args.channels,
        "hidden": args.hidden,
        "downsample": args.downsample,
        "bits": args.bits,
        "links": args.links,
        "rtt_ms": args.rtt_ms,
        "target_mbps": args.target_mbps,
        "image_format": args.image_format,
        "repeats": args.repeats,
    }
    from splitexit.models.reference import build_reference, is_zoo_name
    from splitexit.profile import load_image, profile_model

    if not is_zoo_name(args.model):
        model = build_reference(args.model)
        if not args.input_shape:
            raise SplitexitError(f"give --input-shape C H W for the user model {args.model}")
        shape = tuple(args.input_shape)
    else:
        from splitexit.models import build_model, get_spec

        try:
            spec = get_spec(args.model)
        except ValueError as e:
            raise SplitexitError(f"{e}; or name your own model as module:factory") from None
        model = build_model(args.model)
        shape = tuple(args.input_shape or (spec.preprocessing.channels, *spec.preprocessing.size))
        if args.points is None:
            options["points"] = spec.split_points
    if args.image:
        options["image"] = load_image(args.image, shape)
    profile = profile_model(model, input_shape=shape, name=args.model, **options)
    print(profile.format())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(profile.to_json())
    return 0
