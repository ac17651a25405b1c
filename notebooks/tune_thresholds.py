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
# # Tune exit thresholds
#
# Load a bundle's calibration tables (what every exit and every (channels, bits) operating
# point did on each held-out sample), look at the trade-offs, pick thresholds for a goal,
# check them out of sample, and write them back into a bundle.
#
# Tables come from `splitexit calibrate BUNDLE --save-tables DIR`; this notebook records
# them itself when they are missing, on the bundle's own held-out data (what it records it
# was trained on), and caches them per bundle fingerprint. Set `SPLITEXIT_BUNDLE` /
# `SPLITEXIT_TABLES` to use your own.

# %%
import os
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from splitexit.bundle import load_bundle
from splitexit.calibrate import (
    CalibrationTable,
    Goal,
    Replay,
    check_promise,
    evaluate_policy,
    format_selection,
    held_out_splits,
    measure_compute,
    record_table,
    select_thresholds,
    write_selection,
)
from splitexit.cost import CostModel, Link
from splitexit.exits import CONFIDENCE_MEASURES
from splitexit.zoo import default_bundle_path

BUNDLE = Path(os.environ.get("SPLITEXIT_BUNDLE") or default_bundle_path())
bundle = load_bundle(BUNDLE)
TABLES = Path(os.environ.get("SPLITEXIT_TABLES") or Path("data") / bundle.fingerprint[:16])
print(bundle.manifest.name, bundle.fingerprint[:16], [e.name for e in bundle.manifest.exits])

# %%
def tables(limit: int | None = None) -> dict[str, CalibrationTable]:
    """Calibration and test tables: loaded when saved, else recorded (and saved)."""
    out = {}
    for split in ("calibration", "test"):
        path = TABLES / f"{split}.npz"
        if path.exists():
            out[split] = CalibrationTable.load(path)
    if len(out) == 2:
        return out
    splits = held_out_splits(bundle.manifest)[0]
    for split in ("calibration", "test"):
        images, labels = splits[split]
        if limit:
            images, labels = images[:limit], labels[:limit]
        out[split] = record_table(bundle, images, labels)
        TABLES.mkdir(parents=True, exist_ok=True)
        out[split].save(TABLES / f"{split}.npz")
    return out


t = tables(limit=int(os.environ.get("SPLITEXIT_NOTEBOOK_LIMIT", "0")) or None)
calib, test = t["calibration"], t["test"]
print(f"calibration: {len(calib.labels)} samples, test: {len(test.labels)} samples")
print("operating points:", [p.key for p in calib.points])

# %% [markdown]
# ## Accuracy against offload rate, per confidence measure
#
# One threshold shared by every exit, swept from "always exit" to "never exit": each point
# is (fraction of inputs sent to the server, overall accuracy). Higher and further left is
# better.

# %%
widest = calib.widest_point
fig, ax = plt.subplots(figsize=(6, 4))
for measure in CONFIDENCE_MEASURES:
    replay = Replay(calib, measure, widest)
    curve = []
    for thr in np.linspace(0.0, 1.0, 101):
        s = replay.stats(np.full(len(calib.exit_names), thr))
        curve.append((s["offload"], s["accuracy"]))
    xs, ys = zip(*curve, strict=True)
    ax.plot(xs, ys, label=measure)
tail_acc = Replay(calib, "max_prob", widest).stats(np.full(len(calib.exit_names), 2.0))["accuracy"]
ax.axhline(tail_acc, color="grey", ls="--", lw=0.8, label="tail only")
ax.set_xlabel("offload rate")
ax.set_ylabel("accuracy")
ax.set_title(f"accuracy vs offload (tail at k={widest.channels}, {widest.bits} bits)")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## How confident is each exit?

# %%
fig, axes = plt.subplots(1, len(calib.exit_names), figsize=(4 * len(calib.exit_names), 3))
for ax, (i, name) in zip(np.atleast_1d(axes), enumerate(calib.exit_names), strict=True):
    conf = calib.scores("max_prob")[:, i]
    right = calib.exit_correct[:, i]
    ax.hist([conf[right], conf[~right]], bins=20, stacked=True, label=["correct", "wrong"])
    ax.set_title(f"exit {name}: max_prob")
    ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Accuracy against bytes, every (channels, bits)

# %%
fig, ax = plt.subplots(figsize=(6, 4))
acc = calib.tail_correct.mean(axis=0)
size = calib.frame_bytes.mean(axis=0)
for bits in sorted({p.bits for p in calib.points}):
    idx = [j for j, p in enumerate(calib.points) if p.bits == bits]
    ax.plot(size[idx], acc[idx], "o-", label=f"{bits} bits")
    for j in idx:
        ax.annotate(str(calib.points[j].channels), (size[j], acc[j]), fontsize=7)
ax.set_xscale("log")
ax.set_xlabel("mean frame bytes (header included; labels: channels k)")
ax.set_ylabel("tail accuracy")
ax.legend()
fig.tight_layout()
best = sorted(zip(size, acc, [p.key for p in calib.points], strict=True))
print("smallest frames:", [(p, round(float(s)), round(float(a), 4)) for s, a, p in best[:5]])

# %% [markdown]
# ## Expected latency against bandwidth
#
# Local-only runs the whole model on the device; full offload sends the input image
# (PNG) and runs everything on the server; split-only always sends the bottleneck;
# split + exit answers locally when an exit is confident. Timings are measured on this
# machine and priced by `splitexit.cost.CostModel`; `DEVICE_SPEED` makes the device that
# much slower than this machine.

# %%
DEVICE_SPEED = float(os.environ.get("SPLITEXIT_DEVICE_SPEED", "4"))
here = measure_compute(bundle, repeats=5)  # this machine: the server
device = here.scaled(DEVICE_SPEED)
png_bytes = 509.0  # mean optimised PNG of a 28x28 Fashion-MNIST image (benchmarks/)
thresholds = {e.name: e.threshold for e in bundle.manifest.exits}
rates = np.logspace(-1, 2.3, 30)  # Mbit/s
rtt = 20.0
curves = {"local only": [], "full offload (PNG)": [], "split only": [], "split + exit": []}
for mbps in rates:
    cost = CostModel(Link.mbit(mbps, rtt), device, here, calib.exit_segments)
    curves["local only"].append(cost.local_s() * 1e3)
    curves["full offload (PNG)"].append(cost.image_s(png_bytes) * 1e3)
    never = dict.fromkeys(calib.exit_names, 2.0)
    split = evaluate_policy(calib, never, point=widest, cost=cost)
    curves["split only"].append(split.expected_latency_ms)
    exits = evaluate_policy(calib, thresholds, point=widest, cost=cost)
    curves["split + exit"].append(exits.expected_latency_ms)
fig, ax = plt.subplots(figsize=(6, 4))
for label, ys in curves.items():
    ax.plot(rates, ys, label=label)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("bandwidth (Mbit/s), RTT 20 ms")
ax.set_ylabel("expected latency per input (ms)")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Pick thresholds by goal, check them out of sample

# %%
for conservative in (False, True):
    sel = select_thresholds(calib, Goal.accuracy(max_drop=1.0), conservative=conservative)
    check = check_promise(sel, test)
    print(format_selection(sel))
    for promise in check.promises:
        print(f"held out: {promise.to_dict()}")
    print(f"promise kept: {check.kept}\n")

# %% [markdown]
# ## Write them back into a bundle
#
# Here into a copy, so the shipped bundle stays as it is; point it at your own bundle to
# deploy the thresholds (the fingerprint does not change: devices and servers keep working).

# %%
chosen = select_thresholds(calib, Goal.accuracy(max_drop=1.0), conservative=True)
with tempfile.TemporaryDirectory() as tmp:
    copy = Path(tmp) / BUNDLE.name
    shutil.copytree(BUNDLE, copy)
    write_selection(copy, chosen, check_promise(chosen, test))
    reloaded = load_bundle(copy)
    print({e.name: round(e.threshold, 4) for e in reloaded.manifest.exits})
    assert reloaded.fingerprint == bundle.fingerprint
