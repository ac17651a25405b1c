"""`splitexit models [MODEL]`: the zoo, or where one model can be cut and exits may go."""

from __future__ import annotations

import argparse
import json

from splitexit.errors import SplitexitError

HELP = "list the splittable architectures, or one model's split points"
DESCRIPTION: str | None = (
    "Without MODEL: the zoo. With MODEL (a zoo name, package.module:factory "
    "or path/to/file.py:factory): where that model can be cut and where exits may go."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="a zoo name or module:factory reference")
    parser.add_argument("--kwargs", help="JSON object of keyword arguments for the factory")


def run(args: argparse.Namespace) -> int:
    from splitexit.models import get_spec, list_models

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
    from splitexit.models import get_spec, valid_split_points
    from splitexit.models.reference import build_reference, is_zoo_name

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
