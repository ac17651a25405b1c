"""Two plots per track: latency against link rate per strategy and transport, accuracy
against bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .strategies import STRATEGIES, cell_name, label

COLORS = {
    "local": "#555555",
    "offload-jpeg95": "#d62728",
    "offload-png": "#ff7f0e",
    "split": "#1f77b4",
    "split-exit": "#2ca02c",
    "split-exit-adaptive": "#9467bd",
}


def _pyplot() -> Any:
    """pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# a line's style by transport: how a split strategy offloads (None: it does not)
LINE = {None: ("o", "-"), "http": ("o", "-"), "stream": ("s", "--")}


def _cells(doc: dict[str, Any]) -> dict[tuple[str, float | None], dict[str, Any]]:
    """Stats by (cell name, rate)."""
    return {
        (cell_name(c["strategy"], c.get("transport")), c["rate_mbit"]): c["stats"]
        for c in doc["cells"]
    }


def latency_plot(doc: dict[str, Any], path: Path) -> Path:
    """Latency against link rate, one line per (strategy, transport): the mean thick (solid
    over HTTP or without a split transport, dashed over the stream), the p95 thin dotted."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    rates = doc["config"]["rates_mbit"]
    transports = doc["config"].get("transports") or ["http"]
    cells = _cells(doc)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for s in STRATEGIES:
        if s.key == "local":
            st = cells.get(("local", None))
            if st and st.get("inputs"):
                lat = st["latency_ms"]
                ax.axhline(lat["mean"], color=COLORS[s.key], lw=2, label=f"{s.label} (no link)")
                ax.axhline(lat["p95"], color=COLORS[s.key], lw=1, ls=":")
            continue
        for t in transports if s.kind == "split" else [None]:
            name = cell_name(s.key, t)
            pts = [(r, cells[(name, r)]) for r in rates if cells.get((name, r), {}).get("inputs")]
            if not pts:
                continue
            xs = [r for r, _ in pts]
            marker, ls = LINE[t]
            mean = [st["latency_ms"]["mean"] for _, st in pts]
            ax.plot(xs, mean, marker=marker, ls=ls, color=COLORS[s.key], lw=2, label=label(name))
            p95 = [st["latency_ms"]["p95"] for _, st in pts]
            ax.plot(xs, p95, ls=":", color=COLORS[s.key], lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(  # 2, 3, 5 (x 10^n) labelled: readable milliseconds
        FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else "")
    )
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set_xlabel("link rate (Mbit/s each way)")
    ax.set_ylabel("end-to-end latency (ms)")
    cfg = doc["config"]
    ax.set_title(
        f"{doc['track']} track: latency vs bandwidth, {cfg['rtt_ms']:g} ms RTT, "
        f"device speed F={cfg['device_speed']:g}\n(thick: mean, dashed over the stream; "
        "dotted: p95; user-space link emulator)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def accuracy_plot(doc: dict[str, Any], path: Path) -> Path:
    """Left: accuracy against payload bytes per wire format. Right: the strategies, accuracy
    against the bytes they put on the wire per input (HTTP included) at the reference rate."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    rows = doc["wire"]["rows"]
    frames = [r for r in rows if r["kind"] == "frame" and r.get("accuracy") is not None]
    for bits in sorted({r["bits"] for r in frames}):
        pts = sorted(
            (r["payload_bytes"], r["accuracy"], r["channels"]) for r in frames if r["bits"] == bits
        )
        left.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"bottleneck {bits}-bit")
    for r in rows:
        if r["kind"] == "image":
            left.plot(r["payload_bytes"], r["accuracy"], "s", ms=8, label=r["what"])
        elif r["kind"] == "features":
            left.axvline(r["payload_bytes"], color="#888888", ls=":", lw=1)
            left.annotate(
                r["what"].replace("split-point features, ", "features "),
                (r["payload_bytes"], 0.02),
                xycoords=("data", "axes fraction"),
                rotation=90,
                fontsize=7,
                color="#555555",
            )
    left.set_xscale("log")
    left.set_xlabel("payload bytes per offloaded input (frame header included)")
    left.set_ylabel(f"accuracy ({doc['wire']['inputs']} test images)")
    left.set_title("wire formats", fontsize=9)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)

    ref = doc["config"]["reference_rate_mbit"]
    for c in doc["cells"]:
        st = c["stats"]
        if c["rate_mbit"] not in (None, ref) or not st.get("inputs") or st["accuracy"] is None:
            continue
        x = max(st["bytes_per_input"]["request"], 1.0)
        right.plot(
            x,
            st["accuracy"],
            LINE[c.get("transport")][0],
            ms=9,
            mfc="none" if c.get("transport") == "stream" else None,
            color=COLORS[c["strategy"]],
            label=label(cell_name(c["strategy"], c.get("transport"))),
        )
    right.set_xscale("log")
    right.set_xlabel("bytes up per input incl. protocol (local-only: 0, drawn at 1)")
    right.set_ylabel("accuracy")
    right.set_title(f"strategies at {ref:g} Mbit/s", fontsize=9)
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(f"{doc['track']} track: accuracy vs bytes", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
