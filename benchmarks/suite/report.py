"""The results of one track as markdown (`suite_<track>.md`) and JSON (`suite_<track>.json`)."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .strategies import STRATEGIES, cell_name, label

PIECE_LABELS = {
    "preprocess": "preprocess",
    "head": "head",
    "exits": "exit scoring",
    "quantize": "quantize",
    "frame": "frame (pack+zstd)",
    "image_encode": "image encode",
    "tail": "tail",
}
LINK_NOTE = (
    "`splitexit.link.LinkEmulator`, a user-space TCP shaping proxy on 127.0.0.1 in its own "
    "process, one per rate (one token bucket per direction at the link rate, RTT/2 of delay "
    "each way, delivered by threads that sleep and then spin to the due time; no loss, no "
    "jitter, no kernel queues; its own cost per round trip is measured beside the results, "
    "section 2). Not `tc netem`: the kernel of the machines this suite was built on has no "
    "`sch_netem`."
)


def machine() -> dict[str, Any]:
    """What the numbers ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # AVX2, AVX512, ...
        "platform": platform.platform(),
    }


def _cpus_text(cpus: list[int] | None) -> str:
    if not cpus:
        return "not pinned to cores"
    return f"the device on core {cpus[0]}, the server and the link emulator on core {cpus[1]}"


def machine_line(m: dict[str, Any]) -> str:
    """The machine in a few words: CPU, its vector unit as torch uses it, cores."""
    isa = f" ({m['cpu_capability']})" if m.get("cpu_capability") else ""
    return f"{m['cpu']}{isa}, {m['usable_cores']} usable of {m['cores']} cores"


def _name(row: dict[str, Any]) -> str:
    """The cell name of a results row with "strategy" and (split strategies) "transport"."""
    return cell_name(row["strategy"], row.get("transport"))


def _names(doc: dict[str, Any]) -> list[str]:
    """Every strategy of the run, a split one once per transport, in the suite's order."""
    transports = doc["config"].get("transports") or ["http"]
    return [
        cell_name(s.key, t)
        for s in STRATEGIES
        for t in (transports if s.kind == "split" else [None])
    ]


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], right_from: int = 1) -> list[str]:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _strategies(doc: dict[str, Any]) -> list[str]:
    rates = doc["config"]["rates_mbit"]
    cells = {(_name(c), c["rate_mbit"]): c["stats"] for c in doc["cells"]}
    local = cells.get(("local", None))
    head = ["strategy", *(f"{r:g} Mbit/s" for r in rates)]
    lat = []
    for name in _names(doc):
        row = [label(name)]
        for r in rates:
            st = local if name == "local" else cells.get((name, r))
            lm = (st or {}).get("latency_ms") or {}
            row.append(f"{_ms(lm.get('mean'))} / {_ms(lm.get('p95'))}" if lm else "-")
        if any(cell != "-" for cell in row[1:]):
            lat.append(row)
    long_rows = []
    for name, rate in [(_name(c), c["rate_mbit"]) for c in doc["cells"]]:
        st = cells[(name, rate)]
        if not st.get("inputs"):
            continue
        b = st["bytes_per_input"]
        local_share = 1 - (st["offload_rate"] or 0)
        long_rows.append(
            [
                label(name),
                "-" if rate is None else f"{rate:g}",
                _ms(st["latency_ms"]["mean"]),
                _ms(st["latency_ms"]["p95"]),
                "-" if st["accuracy"] is None else f"{st['accuracy']:.4f}",
                f"{b['request']:.0f}",
                f"{b['response']:.0f}",
                "-" if st["payload_per_offload"] is None else f"{st['payload_per_offload']:.0f}",
                _pct(local_share),
                ", ".join(f"{k}: {v}" for k, v in st["points"].items()) or "-",
            ]
        )
    return [
        "## 1. Strategies",
        "",
        "Mean / p95 end-to-end latency in ms (pixels in memory on the device to the answer on "
        "the device), one input at a time:",
        "",
        *_table(head, lat),
        "",
        "Everything per cell. Bytes per input are averaged over all inputs (0 for an input "
        "answered on the device) and count the whole request / response as it crossed the "
        "link (HTTP, or the stream's messages); payload is the frame or image alone, per "
        "offloaded input.",
        "",
        *_table(
            [
                "strategy",
                "Mbit/s",
                "mean ms",
                "p95 ms",
                "accuracy",
                "B up / input",
                "B down / input",
                "payload B / offload",
                "answered on device",
                "points (k x bits)",
            ],
            long_rows,
            right_from=1,
        ),
    ]


def _ideal(doc: dict[str, Any]) -> list[str]:
    rows = []
    for r in doc["ideal_vs_achieved"]:
        off = r.get("offloaded") or {}
        rows.append(
            [
                label(_name(r)),
                f"{r['rate_mbit']:g}",
                _pct(r["offload_rate"]),
                _ms(r["floor_ms"]),
                _ms(r["measured_ms"]),
                f"{r['gap_ms']:.1f} ({r['gap_pct']:+.1f}%)",
                _ms(off.get("floor_ms")),
                _ms(off.get("measured_ms")),
                "-" if not off else f"{off['gap_pct']:+.1f}%",
                _ms(off.get("server_ms")),
                _ms(off.get("network_ms")),
                _ms(off.get("agent_ms")),
                _ms(off.get("link_emulator_ms")),
                (
                    "-"
                    if off.get("gap_pct_without_emulator") is None
                    else f"{off['gap_pct_without_emulator']:+.1f}%"
                ),
            ]
        )
    bare = [
        [
            b.get("transport", "http"),
            "direct, no emulator" if b["rate_mbit"] is None else f"{b['rate_mbit']:g}",
            f"{b['request_bytes']:.0f} / {b['response_bytes']:.0f}",
            _ms(b["floor_ms"]),
            _ms(b["measured_ms"]),
            f"{b['gap_ms']:.1f} ({b['gap_pct']:+.1f}%)",
            _ms(b.get("link_emulator_ms")),
        ]
        for b in doc.get("bare_requests", [])
    ]
    tail = doc["tail_compute_ms"]
    return [
        "## 2. Ideal vs achieved (split strategies)",
        "",
        "Floor per input = its own device compute x F + (request + response bytes) x 8 / rate "
        "+ RTT + tail compute for an offloaded input, the tail compute being what the server "
        "reported computing for that request (Server-Timing `compute`; warm in-process median: "
        f"{tail:.2f} ms); its device compute x F for one answered at an exit. Both halves' "
        "compute counts as it ran, so the gap is what the framework and the machine add "
        "around it; for offloaded inputs, the agent's records split it "
        "(means, ms): *server* = the server's own time (its Server-Timing) beyond its "
        "compute: parsing, batcher, decoding; *network* = the round trip beyond the server's "
        "time, bytes x 8 / rate and RTT: the HTTP client, the link emulator, uvicorn's I/O, "
        "the OS; *agent* = the rest: the agent's worker thread, event loop, policy and "
        "records. *Link emulator* is the emulator's own share of *network*: a raw TCP "
        "exchange of the same bytes through it, less the same exchange straight, less "
        "bytes x 8 / rate and RTT (`suite/link_check.py`); a real link has no proxy in the "
        "middle, so *gap less emulator* is the framework's overhead on such a link.",
        "",
        *_table(
            [
                "strategy",
                "Mbit/s",
                "offloaded",
                "floor ms",
                "measured ms",
                "gap ms",
                "offloaded: floor",
                "measured",
                "gap",
                "of which server",
                "network",
                "agent",
                "of network: link emulator",
                "gap less emulator",
            ],
            rows,
        ),
        "",
        "Bare requests: the agent's client's `infer` of one frame at the split strategies' "
        "point, per transport, closed loop, no agent, through the same link (floor = bytes "
        "x 8 / rate + RTT + tail), and straight to the server (floor = tail):",
        "",
        *_table(
            [
                "transport",
                "Mbit/s",
                "B up / down",
                "floor ms",
                "measured ms",
                "gap",
                "of which link emulator",
            ],
            bare,
            right_from=2,
        ),
    ]


def _wire(doc: dict[str, Any]) -> list[str]:
    w = doc["wire"]
    rows = []
    for r in w["rows"]:
        rows.append(
            [
                r["what"],
                f"{r['payload_bytes']:.0f}",
                str(r.get("frame_header_bytes", "-")),
                f"{r['http_overhead_bytes']:.0f}",
                f"{r['wire_bytes']:.0f}",
                "-" if r.get("accuracy") is None else f"{r['accuracy']:.4f}",
                "-" if r.get("manifest_accuracy") is None else f"{r['manifest_accuracy']:.4f}",
            ]
        )
    per_transport = [
        [
            r["transport"],
            str(r["offloads"]),
            f"{r['payload_bytes']:.0f}",
            f"{r['request_bytes']:.0f}",
            f"{r['response_bytes']:.0f}",
            f"{r['protocol_bytes']:.0f}",
        ]
        for r in doc.get("offload_bytes", [])
    ]
    k, bits = w["server_point"]
    teacher = w.get("teacher_accuracy")
    return [
        "## 3. Wire size",
        "",
        f"Bytes per offloaded input, mean over the {w['inputs']} inputs. Payload includes the "
        "frame header and quantization parameters where there are any. HTTP overhead (request "
        "line, headers, inference JSON header, BYTES length prefix), apart: for frames (and "
        "features, which would travel the same way) the mean over split-only's live requests; "
        "for images, a real request as the full-offload runs send it. Accuracy on the same "
        "inputs: images through the server's "
        f"path (decode, head, code at k={k}, {bits}-bit, tail); frames through the tail (where "
        "'-': not scored, to bound the time; the manifest's accuracy is the test set's). The "
        f"float (unquantized) code gives {w['float_code_accuracy']:.4f} (the local-only model)"
        + (f"; the teacher scored {teacher:.4f} on the full test set." if teacher else "."),
        "",
        *_table(
            [
                "what is sent",
                "payload B",
                "of which header",
                "HTTP B",
                "total B",
                "accuracy (these inputs)",
                "accuracy (manifest, test set)",
            ],
            rows,
        ),
        *_per_transport(per_transport),
    ]


def _per_transport(rows: Sequence[Sequence[str]]) -> list[str]:
    if not rows:
        return []
    return [
        "",
        "Bytes per offloaded input by transport, as they crossed the link (split-only's "
        "offloads over every rate): the frame, the request and the response, and what the "
        "protocol adds to both (the stream sends the frame without the header its session "
        "stated once).",
        "",
        *_table(
            ["transport", "offloads", "frame B", "B up", "B down", "protocol B (up + down)"],
            rows,
        ),
    ]


def _cost(doc: dict[str, Any]) -> list[str]:
    pieces = [p for p in PIECE_LABELS if any(p in r["pieces_ms"] for r in doc["device_cost"])]
    rows = []
    for r in doc["device_cost"]:
        total = r["latency_ms"]
        cells = []
        for p in pieces:
            v = r["pieces_ms"].get(p)
            cells.append("-" if v is None else f"{v:.2f} ({_pct(v / total if total else None)})")
        rows.append(
            [
                label(_name(r)),
                *cells,
                f"{r['device_ms']:.2f}",
                _ms(total),
                _pct(r["device_share"]),
            ]
        )
    ref = doc["config"]["reference_rate_mbit"]
    return [
        "## 4. Device-side cost",
        "",
        f"Mean ms per input on the device (x F = {doc['config']['device_speed']:g}; share of "
        f"the mean end-to-end latency), at {ref:g} Mbit/s; quantize and frame count 0 for "
        "inputs answered at an exit.",
        "",
        *_table(
            [
                "strategy",
                *(PIECE_LABELS[p] for p in pieces),
                "device ms",
                "latency ms",
                "device share",
            ],
            rows,
        ),
    ]


def _wins(doc: dict[str, Any]) -> list[str]:
    p = doc["projections"]
    speeds = p["speeds"]
    acc = {(_name(c), c["rate_mbit"]): c["stats"].get("accuracy") for c in doc["cells"]}
    rows = []
    for rate, by_speed in p["fastest"].items():
        cells = []
        for f in speeds:
            name = by_speed[f"{f:g}"]
            a = acc.get((name, None if name == "local" else float(rate)))
            cells.append(label(name) + ("" if a is None else f" ({a:.3f})"))
        rows.append([f"{rate} Mbit/s", *cells])
    variants = [n for n in _names(doc) if n.split("/")[0] in _VARIANTS]
    variants = [n for n in variants if any(n in r for r in p["split_exit_wins"].values())]
    ranges = []
    for rate, by_name in p["split_exit_wins"].items():
        ranges.append([f"{rate} Mbit/s", *(_range(by_name.get(n)) for n in variants)])
    f = doc["config"]["device_speed"]
    return [
        "## 5. Where split + exit wins",
        "",
        f"Fastest mean latency per link rate (its accuracy in parentheses), measured at F = "
        f"{f:g} and projected to other device speeds F' (a device F' times slower than this "
        "machine's CPU) by scaling the measured device compute: latency(F') = measured + "
        "(F' - F) x device compute. Projections, not measurements.",
        "",
        *_table(["link", *(f"F'={s:g}" for s in speeds)], rows),
        "",
        "Device speeds F' at which each split + exit variant has a lower mean latency than "
        "local-only and both full offloads (same projection):",
        "",
        *_table(["link", *(label(n) for n in variants)], ranges),
    ]


_VARIANTS = ("split-exit", "split-exit-adaptive")


def _goals(doc: dict[str, Any]) -> list[str]:
    meant = doc.get("split_pays") or {}
    rows = []
    for g in doc.get("goals", []):
        acts = ", ".join(f"{k}: {v}" for k, v in (g.get("actions") or {}).items()) or "-"
        model = g.get("split_meant_to_pay")
        pays = bool(model and model["pays"])
        goal = "-"
        if "best_baseline" in g:
            goal = f"{g['vs_best_baseline_pct']:+.1f}% " + ("yes" if g["below_by_30pct"] else "no")
            goal = f"**{goal}**" if pays else f"{goal} (not a goal here)"
        rows.append(
            [
                f"{g['rate_mbit']:g}",
                g.get("transport") or "-",
                _ms(g["adaptive_ms"]),
                _ms(g.get("expected_ms")),
                _link_estimate(g.get("link_estimate_mbit")),
                "-" if g["adaptive_accuracy"] is None else f"{g['adaptive_accuracy']:.4f}",
                f"{label(g['best_fixed'])} {_ms(g['best_fixed_ms'])}",
                f"{g['vs_best_fixed_pct']:+.1f}% " + ("yes" if g["within_5pct"] else "**no**"),
                f"{label(g['best_baseline'])} {_ms(g['best_baseline_ms'])}"
                if "best_baseline" in g
                else "-",
                "-"
                if model is None
                else f"{'yes' if pays else 'no'} ({model['vs_best_baseline_pct']:+.1f}%)",
                goal,
                acts,
            ]
        )
    return [
        "## 0. Goals: the adaptive policy against the fixed strategies",
        "",
        "Mean latency of split + exit + adaptive (per transport) against the best fixed "
        "strategy in the same cell, over every fixed row of that rate, either transport "
        "(goal: within 5%), and against the best of local-only and full offload (goal where "
        "splitting is meant to pay: 30% or more below; in bold there), with the actions it "
        "took (image: sent the image; exit; offload at (k, bits); tail: finished the tail on "
        "the device; local: the best exit, for the deadline); *expected* is the mean of what "
        "its cost model expected each input to take when it chose, *link estimate* the "
        "agent's bandwidth estimate at the end of the cell (*no limit seen*: its small and "
        "large requests took alike, so it prices bytes at nothing). *Split meant to pay "
        "(model)*: "
        "the cost model's split + exit plan against the better of local-only and full "
        "offload, priced with this run's measured compute (device x F, server), bytes and "
        "the link's rate and RTT, not with the measured latencies (`suite/split_pays.py`); "
        "yes where it is 30% or more below.",
        "",
        *_table(
            [
                "Mbit/s",
                "transport",
                "adaptive ms",
                "expected ms",
                "link estimate Mbit/s",
                "accuracy",
                "best fixed",
                "vs best fixed",
                "best of local / full offload",
                "split meant to pay (model)",
                "vs it (>= 30% below?)",
                "actions",
            ],
            rows,
            right_from=2,
        ),
        *(["", meant["why"]] if meant.get("why") else []),
    ]


def _range(r: dict[str, Any] | None) -> str:
    if not r:
        return "-"
    if not r["wins"]:
        return "never"
    lo = "F' > 0" if r["from"] <= 0 else f"F' > {r['from']:g}"
    return lo + ("" if r["to"] is None else f" and F' < {r['to']:g}")


def write_report(doc: dict[str, Any], out: Path, plots: Sequence[Path]) -> tuple[Path, Path]:
    """Write `suite_<track>.md` and `.json` into `out`; returns their paths."""
    import json

    track = doc["track"]
    cfg = doc["config"]
    m = doc["machine"]
    md = out / f"suite_{track}.md"
    js = out / f"suite_{track}.json"
    lines = [
        f"# Benchmark suite: {track} track ({doc['bundle']['name']})",
        "",
        f"`{doc['command']}`, {doc['started']}, {doc['seconds']:.0f} s."
        + (" **Quick run: few inputs, not the reference numbers.**" if cfg["quick"] else ""),
        "",
        f"- Inputs: the first {cfg['inputs']} Fashion-MNIST test images at the model's input "
        "size, the same for every strategy; one input in flight at a time, each arriving "
        f"{cfg['gap_ms']:g} ms after the previous answer (every strategy idles alike between "
        "inputs; the gap is not in the latency).",
        f"- Link: {', '.join(f'{r:g}' for r in cfg['rates_mbit'])} Mbit/s each way, "
        f"{cfg['rtt_ms']:g} ms RTT, through {LINK_NOTE}",
        f"- Device speed F = {cfg['device_speed']:g}: device-side compute is followed by a "
        "sleep of (F - 1) x its time (F = 1: this machine's CPU).",
        f"- Machine: {machine_line(m)}, load "
        f"average (1, 5, 15 min) at start {m['load_average']}, at the end "
        f"{m.get('load_average_end')}; Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} thread on the device side; the server, on the same machine, "
        f"one runtime thread, default batching; {_cpus_text(cfg.get('cpus'))}).",
        f"- Bundle: `{doc['bundle']['path']}`, fingerprint {doc['bundle']['fingerprint'][:16]}, "
        f"exit thresholds {doc['bundle']['thresholds']}; split-only and split + exit send at "
        f"{_point(doc['bundle'])}; adaptive policy: {doc['adaptive']}.",
        *(f"- Note: {n}" for n in doc.get("notes", [])),
        "",
        *_goals(doc),
        "",
        *_strategies(doc),
        "",
        *_ideal(doc),
        "",
        *_wire(doc),
        "",
        *_cost(doc),
        "",
        *_wins(doc),
        "",
        "## Plots",
        "",
        *(f"![{p.stem}]({p.name})" for p in plots),
        "",
    ]
    md.write_text("\n".join(lines))
    js.write_text(json.dumps(doc, indent=2) + "\n")
    return md, js


def _point(bundle: dict[str, Any]) -> str:
    """ "k x bits" of the point the fixed-policy split strategies send at."""
    point = bundle.get("split_point")
    return "the widest point" if not point else f"k={point[0]} x {point[1]} bits"


def _link_estimate(mbit: float | None) -> str:
    """The agent's bandwidth estimate for section 0 (above 10 Gbit/s: bytes cost it nothing)."""
    if mbit is None:
        return "-"
    return "no limit seen" if mbit > 1e4 else f"{mbit:.3g}"
