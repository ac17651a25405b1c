"""Accuracy against bytes on the wire for a finished training run, with the baselines.

    python benchmarks/track_report.py runs/fmnist-small [--samples 500]

Reads `results.json` of the run (the test-set accuracy of every (channels, bits) point and
its mean frame size, header included) and measures, on the first `--samples` test images:
the model input sent as PNG (optimised), JPEG q75 / q95 and WebP q90 at the model's input
resolution, and the teacher's unsplit split-point features sent raw as float16 and as an
8-bit frame (same codec, header included). Writes benchmarks/results/<run name>.md / .json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from splitexit.bottleneck import quantize
from splitexit.codec import encode_frame
from splitexit.models.cut import stage_name
from splitexit.preprocess import encode_image
from splitexit.train.experiment_data import load_data
from splitexit.train.export import rebuild_run
from splitexit.train.pipeline import build_teacher

RESULTS = Path(__file__).parent / "results"


def input_as_sent(images: torch.Tensor, size: tuple[int, int], channels: int) -> np.ndarray:
    """uint8 [N, H, W(, C)] at the model's input resolution, as a camera would send it."""
    x = images.float()
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="finished run directory (results.json inside)")
    parser.add_argument("--samples", type=int, default=500, help="test images for baselines")
    args = parser.parse_args(argv)

    cfg, _, pre, classes, results, _ = rebuild_run(args.run)
    data = load_data(cfg)
    test = data.splits["test"]
    n = min(args.samples, len(test))
    images = test.images[:n]

    sent = input_as_sent(images, pre.size, pre.channels)
    baselines: dict[str, float] = {}
    for label, fmt, q in (
        ("PNG", "png", 90),
        ("JPEG q75", "jpeg", 75),
        ("JPEG q95", "jpeg", 95),
        ("WebP q90", "webp", 90),
    ):
        baselines[f"input {label}"] = float(np.mean([len(encode_image(a, fmt, q)) for a in sent]))

    teacher = build_teacher(cfg, len(classes), (pre.channels, *pre.size), load_checkpoint=False)
    state = torch.load(
        args.run / "checkpoints" / "teacher.pt", map_location="cpu", weights_only=True
    )
    teacher.load_state_dict(state["model"])
    teacher.eval()
    with torch.no_grad():
        point = stage_name(cfg.split.point)
        feats = teacher.forward_features(pre(images), [point])[point]
    c, h, w = feats.shape[1:]
    baselines["split-point features float16 (raw)"] = float(c * h * w * 2)
    frames = [len(encode_frame(quantize(feats[i : i + 1], 8), "0" * 64)) for i in range(n)]
    baselines["split-point features 8-bit frame"] = float(np.mean(frames))

    teacher_acc = results["teacher_accuracy"]
    jpeg95 = baselines["input JPEG q95"]
    rows = sorted(results["operating_points"], key=lambda r: r["frame_bytes"])
    lines = [
        f"# {cfg.name}: accuracy against bytes on the wire",
        "",
        f"Run: `splitexit train {cfg.name}`, then `python benchmarks/track_report.py "
        f"runs/{cfg.name}`. Machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}. Test set: {results['test_samples']} images; byte baselines "
        f"over the first {n}.",
        "",
        f"- teacher top-1: **{teacher_acc:.4f}**",
        f"- split model, float (unquantized) code: {results['float_accuracy']:.4f}",
        "- exits alone: " + ", ".join(f"{k} {v:.4f}" for k, v in results["exits"].items()),
        f"- training time: {results.get('train_seconds', 0) / 60:.0f} min",
        "",
        "## Baselines (mean bytes per input)",
        "",
        "| what is sent | bytes |",
        "| --- | ---: |",
        *[f"| {k} | {v:.0f} |" for k, v in baselines.items()],
        "",
        "## Every operating point (frame bytes include the 37-byte header + qparams)",
        "",
        "| channels k | bits | top-1 | vs teacher (points) | frame bytes | vs JPEG q95 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        delta = 100 * (r["accuracy"] - teacher_acc)
        lines.append(
            f"| {r['channels']} | {r['bits']} | {r['accuracy']:.4f} | {delta:+.2f} | "
            f"{r['frame_bytes']:.0f} | {r['frame_bytes'] / jpeg95:.3f} |"
        )
    report = {"name": cfg.name, "samples": n, "baselines": baselines, "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{cfg.name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{cfg.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
