"""Where splitting is meant to pay: decided by the one cost model, not by measured latencies.

Per link rate and transport, `splitexit.cost.CostModel` prices three plans with the run's
measured inputs (device compute per piece x F, the server's compute, the link's rate and
RTT, each strategy's bytes per offload, request and response):

    split + exit   head ─ the exits that pay, at calibration's leave rates ─ the faster of
                   offload (encode ─ link(frame's bytes) ─ server tail) and the tail here
    local-only     head ─ tail, on the device
    full offload   image encode ─ link(image's bytes) ─ server: whole model (best format)

A cell is one where splitting pays when the split + exit plan is at least `PAYS_BELOW`
below the better of local-only and full offload: there issue 13's "30% below" goal applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from splitexit.cost import Compute, CostModel, Link
from splitexit_device.policy import exit_plan

from .analysis import Cell
from .samples import Sample
from .strategies import label

PAYS_BELOW = 0.30


def split_plan_s(cost: CostModel, leave: Sequence[float], frame_bytes: float) -> float:
    """Expected seconds of split + exit: the exits that pay (the agent's `exit_plan`) at
    `leave` rates, then the faster of the offload (a frame whose round trip moves
    `frame_bytes`) and the tail here."""
    after = min(float(cost.offload_s(frame_bytes)), cost.tail_here_s())
    return cost.head_path_s(leave, after, exit_plan(cost, leave, after))


def price(
    cost: CostModel,
    leave: Sequence[float],
    frame_bytes: float,
    images: Mapping[str, tuple[float, float]],
) -> dict[str, Any]:
    """The split + exit plan against local-only and full offload (`images`: per strategy key,
    the device's (seconds to encode, bytes both ways) of an image): ms of each, the better
    baseline, the plan against it in percent (negative: below), and whether it is at least
    `PAYS_BELOW` below."""
    split = split_plan_s(cost, leave, frame_bytes)
    base = {"local": cost.local_s()}
    base |= {k: float(cost.image_s(nbytes, enc)) for k, (enc, nbytes) in images.items()}
    best = min(base, key=lambda k: base[k])
    return {
        "split_ms": round(1e3 * split, 3),
        "baselines_ms": {k: round(1e3 * v, 3) for k, v in base.items()},
        "best_baseline": best,
        "vs_best_baseline_pct": round(100 * (split / base[best] - 1), 1),
        "pays": split <= (1.0 - PAYS_BELOW) * base[best],
    }


@dataclass(frozen=True)
class ModelInputs:
    """What the run measured that the model needs: the device's compute (unslowed) and the
    server's, the exits' segments and calibrated leave rates, the bytes both ways of an
    offloaded frame per transport, and per full-offload strategy an image's (encode
    seconds, unslowed; bytes both ways)."""

    device: Compute
    server: Compute
    exit_segments: tuple[int, ...]
    leave: tuple[float, ...]
    frame_bytes: dict[str, float]
    images: dict[str, tuple[float, float]]
    exit_names: tuple[str, ...] = ()

    def cost(self, rate_mbit: float, rtt_ms: float, speed: float) -> CostModel:
        """The cost model of a device `speed` times slower on a link of `rate_mbit`."""
        link = Link.mbit(rate_mbit, rtt_ms)
        return CostModel(link, self.device.scaled(speed), self.server, self.exit_segments)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _spread(total: float, shares: Sequence[float]) -> tuple[float, ...]:
    """`total` split in proportion to `shares` (equally where they sum to nothing)."""
    whole = sum(shares)
    if whole <= 0:
        return tuple(total / len(shares) for _ in shares) if shares else ()
    return tuple(total * s / whole for s in shares)


def model_inputs(
    cells: Sequence[Cell],
    profile: Compute,
    leave: Sequence[float],
    exit_segments: Sequence[int],
    tail_ms: float,
    bare_bytes: Mapping[str, float] | None = None,
    exit_names: Sequence[str] = (),
) -> ModelInputs | None:
    """The model's inputs from the run's cells (`analysis.Cell`): preprocess, head and tail
    as local-only measured them (the same compute on both sides of the comparison), the
    head spread over its segments and the exits' total over the exits in `profile`'s
    proportions (`splitexit.calibrate.measure_compute`); the exits' total as a share of
    the head and the encode from split inputs that reached the bottleneck (every exit
    run), the exits at local-only's pace; the server's reported compute; and bytes
    as the strategies sent them (a frame: split-only's and split + exit's, at the fixed
    point; a transport where they offloaded nothing: its bare requests' `bare_bytes`).
    None without a local-only cell."""
    local = next((c for c in cells if c.strategy == "local" and c.samples), None)
    if local is None:
        return None
    piece = {
        k: _mean([s.device_ms.get(k, 0.0) for s in local.samples]) or 0.0
        for k in ("preprocess", "head", "tail")
    }
    split = [c for c in cells if c.transport is not None]
    reached = [s for c in split for s in c.samples if "frame" in s.device_ms]
    ran = [s for s in reached if "exits" in s.device_ms and s.device_ms.get("head")]
    if ran:  # every exit, against the head, on the same inputs
        per_head = sum(s.device_ms["exits"] for s in ran) / sum(s.device_ms["head"] for s in ran)
    else:  # no input ran every exit: the profile's
        per_head = sum(profile.exit_s) / sum(profile.segment_s) if sum(profile.segment_s) else 0.0
    exits_ms = per_head * piece["head"]  # at local-only's pace
    encode_ms = _mean(
        [
            s.device_ms["quantize"] + s.device_ms["frame"]
            for s in reached
            if "quantize" in s.device_ms
        ]
    )
    offloaded = [s for c in split for s in c.samples if s.offloaded]
    server_tail = _mean([s.tail_ms for s in offloaded if s.tail_ms is not None])
    frames: dict[str, float] = dict(bare_bytes or {})
    fixed_point = [c for c in split if c.strategy in ("split", "split-exit")]
    for transport in {c.transport for c in fixed_point}:
        sent = _wire([s for c in fixed_point if c.transport == transport for s in c.samples])
        if sent is not None:
            frames[transport] = sent
    image_cells = [c for c in cells if c.strategy.startswith("offload-") and c.samples]
    images = {}
    for key in sorted({c.strategy for c in image_cells}):
        samples = [s for c in image_cells if c.strategy == key for s in c.samples]
        enc, nbytes = _mean([s.device_ms.get("image_encode", 0.0) for s in samples]), _wire(samples)
        if enc is not None and nbytes is not None:
            images[key] = (enc / 1e3, nbytes)
    whole = _mean(
        [s.tail_ms for c in image_cells for s in c.samples if s.offloaded and s.tail_ms is not None]
    )
    device = Compute(
        segment_s=_spread(piece["head"] / 1e3, profile.segment_s),
        exit_s=_spread(exits_ms / 1e3, profile.exit_s),
        preprocess_s=piece["preprocess"] / 1e3,
        encode_s=(encode_ms if encode_ms is not None else 1e3 * profile.encode_s) / 1e3,
        tail_s=piece["tail"] / 1e3,
    )
    server = Compute(
        tail_s=(server_tail if server_tail is not None else tail_ms) / 1e3,
        model_s=None if whole is None else whole / 1e3,
    )
    return ModelInputs(
        device, server, tuple(exit_segments), tuple(leave), frames, images, tuple(exit_names)
    )


def _wire(samples: Sequence[Sample]) -> float | None:
    """Mean request + response bytes of the offloaded samples (None: none offloaded)."""
    return _mean([s.request_bytes + s.response_bytes for s in samples if s.offloaded])


def where_split_pays(
    inputs: ModelInputs, rates: Sequence[float], rtt_ms: float, speed: float
) -> list[dict[str, Any]]:
    """Per transport and rate: the model's plans (`price`), split pays or not."""
    rows = []
    for transport in sorted(inputs.frame_bytes):
        for rate in rates:
            cost = inputs.cost(rate, rtt_ms, speed)
            images = {k: (enc * speed, n) for k, (enc, n) in inputs.images.items()}
            priced = price(cost, inputs.leave, inputs.frame_bytes[transport], images)
            rows.append({"transport": transport, "rate_mbit": rate, **priced})
    return rows


def why(inputs: ModelInputs, rows: Sequence[Mapping[str, Any]], speed: float) -> str:
    """One line: in which cells splitting is meant to pay, and why (from the model)."""
    cost = inputs.cost(1.0, 0.0, speed)  # the link plays no part in what follows
    local, head = cost.local_s(), cost.bottleneck_s(exits=False)
    on_device = cost.head_path_s(inputs.leave, cost.tail_here_s())
    pays = [r for r in rows if r["pays"]]
    where = ", ".join(f"{r['rate_mbit']:g} Mbit/s ({r['transport']})" for r in pays)
    line = (
        f"Splitting is meant to pay (the cost model's split + exit plan at least "
        f"{100 * PAYS_BELOW:.0f}% below the better of local-only and full offload) in: "
        f"{where or 'no cell of this run'}. Preprocessing and the head are "
        f"{100 * head / local:.0f}% of the model's device compute ({1e3 * head:.1f} of "
        f"{1e3 * local:.1f} ms at F = {speed:g}) "
        f"and calibration's exits answer {100 * sum(inputs.leave):.0f}% of inputs"
        f"{_exits(inputs, cost)}, so on the device alone the plan is "
        f"{_vs(on_device / local)} local-only"
    )
    if pays:
        return (
            line
            + "; where it pays, the plan against the better baseline: "
            + ", ".join(
                f"{r['rate_mbit']:g} Mbit/s ({r['transport']}) {r['split_ms']:.1f} ms against "
                f"{label(r['best_baseline'])} {r['baselines_ms'][r['best_baseline']]:.1f} ms"
                for r in pays
            )
            + "."
        )
    if not rows:
        return line + "."
    vs = [r["vs_best_baseline_pct"] for r in rows]
    lo, hi = f"{min(vs):+.0f}%", f"{max(vs):+.0f}%"
    return (
        line + f"; over these rates the plan (offload or tail here) is "
        f"{lo if lo == hi else f'{lo} to {hi}'} against the better baseline: short of "
        f"{100 * PAYS_BELOW:.0f}% below everywhere."
    )


def _exits(inputs: ModelInputs, cost: CostModel) -> str:
    """ " (name: p% after q% of the head's compute, ...)" for the exits that answer any."""
    head = cost.bottleneck_s()
    names = inputs.exit_names or tuple(f"exit {e}" for e in range(len(inputs.leave)))
    parts = [
        f"{name}: {100 * p:.0f}% after {100 * cost.exit_s(e) / head:.0f}% of the head"
        for e, (name, p) in enumerate(zip(names, inputs.leave, strict=True))
        if p > 0
    ]
    return f" ({', '.join(parts)})" if parts and head > 0 else ""


def _vs(ratio: float) -> str:
    return f"{100 * (1 - ratio):.0f}% below" if ratio <= 1 else f"{100 * (ratio - 1):.0f}% above"
