"""Write a Triton model repository for a bundle's tail (needs the `export` extra).

    python -m splitexit_server.triton.export BUNDLE REPOSITORY [--max-batch-size 64]

    REPOSITORY/<name>_tail/config.pbtxt   onnxruntime backend, dynamic batching
                          /labels.txt     class names
                          /1/model.onnx   code UINT8 [N, C, h, w], scale FP32 [N, 1],
                                          zero_point UINT8 [N, 1] ─► logits FP32 [N, K]

Then `tritonserver --model-repository REPOSITORY`. Triton takes the raw quantized code, not a
frame: a client unpacks the frame (`splitexit.codec.decode_frame`), fills the channels it did
not send with the zero point, and sends code / scale / zero_point over the same Open Inference
Protocol (`tritonclient` works unchanged). The graphs come from `splitexit.bundle.onnx`.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path


def export_repository(
    bundle: str | Path, repository: str | Path, *, max_batch_size: int = 64
) -> Path:
    """Put the bundle's Triton raw-tail model into `repository`; returns the model directory.

    A bundle exported with `onnx=True` already holds it (`onnx/triton/<name>_tail`, hashed
    with the rest of the bundle) and it is copied as is; otherwise it is exported now from
    the bundle's TorchScript tail.
    """
    from splitexit.bundle import load_bundle

    loaded = load_bundle(bundle, parts=("head", "exits", "tail"))  # verifies every file
    shipped = sorted((loaded.path / "onnx" / "triton").glob("*/config.pbtxt"))
    with tempfile.TemporaryDirectory(prefix="splitexit-onnx-") as tmp:
        if shipped:
            model_dir = shipped[0].parent
        else:
            from splitexit.bundle.onnx import export_onnx

            paths = export_onnx(loaded, tmp, max_batch_size=max_batch_size)
            model_dir = paths["triton_config"].parent
        dest = Path(repository) / model_dir.name
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(model_dir, dest)
    if shipped and max_batch_size != _max_batch_size(dest / "config.pbtxt"):
        config = dest / "config.pbtxt"
        text = config.read_text()
        config.write_text(
            re.sub(r"max_batch_size: \d+", f"max_batch_size: {max_batch_size}", text, count=1)
        )
    return dest


def _max_batch_size(config: Path) -> int | None:
    found = re.search(r"max_batch_size: (\d+)", config.read_text())
    return int(found.group(1)) if found else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m splitexit_server.triton.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", help="bundle directory or archive")
    p.add_argument("repository", help="Triton model repository to write into")
    p.add_argument("--max-batch-size", type=int, default=64)
    args = p.parse_args(argv)
    try:
        dest = export_repository(args.bundle, args.repository, max_batch_size=args.max_batch_size)
    except ImportError as e:
        print(f"needs the export extra (pip install 'splitexit[export]'): {e}", file=sys.stderr)
        return 2
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
