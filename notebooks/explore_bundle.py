# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Explore a bundle
#
# What a bundle holds, what each piece of the head costs on this machine, and how many bytes
# a frame takes at every operating point. Set `SPLITEXIT_BUNDLE` to look at your own.

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from splitexit.bundle import format_manifest, load_bundle
from splitexit.calibrate import held_out_splits
from splitexit.runtime import HeadRunner
from splitexit.zoo import default_bundle_path

BUNDLE = Path(os.environ.get("SPLITEXIT_BUNDLE") or default_bundle_path())
bundle = load_bundle(BUNDLE)
print(format_manifest(bundle.manifest))

# %% [markdown]
# ## The head, piece by piece
#
# Parameters and median time (batch of 1) of every head segment and exit, and the shape
# of what each segment hands on.

# %%
torch.set_num_threads(1)
images, labels = held_out_splits(bundle.manifest)[0]["test"]
x = bundle.preprocess(images[:1])


def median_ms(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


rows = []
f = x
with torch.inference_mode():
    for i, segment in enumerate(bundle.segments):
        params = sum(p.numel() for p in segment.parameters())
        ms = median_ms(lambda s=segment, f=f: s(f))
        f = segment(f)
        rows.append((f"segment {i}", params, ms, tuple(f.shape[1:])))
        for spec in bundle.manifest.exits:
            if spec.segment == i:
                branch = bundle.exits[spec.name]
                ms = median_ms(lambda b=branch, f=f: b(f))
                rows.append((f"exit {spec.name}", sum(p.numel() for p in branch.parameters()),
                             ms, (len(bundle.manifest.class_names),)))
    tail_params = sum(p.numel() for p in bundle.tail.parameters())
    tail_ms = median_ms(lambda: bundle.tail(f))
rows.append(("tail (server)", tail_params, tail_ms, (len(bundle.manifest.class_names),)))
print(f"{'piece':<18}{'params':>10}{'ms':>8}  output")
for name, params, ms, shape in rows:
    print(f"{name:<18}{params:>10,}{ms:>8.3f}  {shape}")

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.barh([r[0] for r in rows][::-1], [r[2] for r in rows][::-1])
ax.set_xlabel("median ms at batch 1 (this machine)")
fig.tight_layout()

# %% [markdown]
# ## Frame bytes at every operating point
#
# Real frames for 200 test images: the 32-byte header, 5 bytes of quantization parameters
# per sample, and the packed (zstd-compressed when that helps) payload.

# %%
runner = HeadRunner(bundle)
with torch.inference_mode():
    result = runner.run(bundle.preprocess(images[:200]), thresholds={}, exits=False)
z = result.z
sizes = {}
for point in bundle.manifest.operating_points:
    frames = [runner.frame(z[i : i + 1], point.bits, point.channels) for i in range(len(z))]
    sizes[(point.channels, point.bits)] = float(np.mean([len(b) for b in frames]))
print(f"{'k':>3} {'bits':>4} {'frame B':>8} {'accuracy':>9}")
for point in bundle.manifest.operating_points:
    k, b = point.channels, point.bits
    acc = f"{point.accuracy:.4f}" if point.accuracy is not None else "-"
    print(f"{k:>3} {b:>4} {sizes[(k, b)]:>8.1f} {acc:>9}")

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for bits in sorted({b for _, b in sizes}):
    ks = sorted(k for k, b in sizes if b == bits)
    ax.plot(ks, [sizes[(k, bits)] for k in ks], "o-", label=f"{bits} bits")
ax.set_xlabel("channels sent (k)")
ax.set_ylabel("mean frame bytes")
ax.legend()
fig.tight_layout()
