"""`splitexit onnx BUNDLE`: add ONNX graphs (checked for parity) to a bundle in place."""

from __future__ import annotations

import argparse
import importlib.util

from splitexit.errors import SplitexitError

HELP = "add ONNX graphs of head, exits and tail to a bundle (fingerprint unchanged)"
DESCRIPTION: str | None = (
    "Export a bundle directory's TorchScript pieces to ONNX into its onnx/ "
    "folder, check them against TorchScript on sample inputs (the parity goes into the "
    "manifest), and list them, so `--runtime onnxruntime` can run it without torch. "
    "The fingerprint covers the weights, not the files: deployed devices keep working."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument(
        "--triton", action="store_true", help="also keep a Triton model of the tail in onnx/triton"
    )


def run(args: argparse.Namespace) -> int:
    from splitexit.bundle.onnx import add_onnx

    require_onnx()
    record = add_onnx(args.bundle, triton=args.triton)
    worst = max(record["max_abs_diff"].values())
    agree = min(record["argmax_agreement"].values())
    print(
        f"ONNX graphs added to {args.bundle} (opset {record['opset']}): max abs difference "
        f"{worst:.2g}, argmax agreement {agree:.1%} on {record['samples']} samples; "
        "fingerprint unchanged"
    )
    return 0


def require_onnx() -> None:
    """Raise a one-line SplitexitError when the export extra (onnx, onnxruntime) is missing."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise SplitexitError(
            f"--onnx needs {' and '.join(missing)}: pip install 'splitexit[export]'"
        )
