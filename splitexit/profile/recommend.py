"""Predicting and choosing: each option's end-to-end latency over a link from the measured
times and bytes (`splitexit.cost`), the fastest option, and the reason it wins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from splitexit.cost import Compute, CostModel, Link

if TYPE_CHECKING:
    from .result import SplitProfile


def split_cost(link: Link, head_ms: float, encoder_ms: float, server_ms: float) -> CostModel:
    """The cost model of a split: the head and encoder on the device, the rest served."""
    device = Compute(segment_s=(head_ms / 1e3,), encode_s=encoder_ms / 1e3)
    return CostModel(link, device, Compute(tail_s=server_ms / 1e3))


def offload_ms(link: Link, input_bytes: int, full_ms: float) -> float:
    """Full offload: the encoded input over `link`, the whole model on the server."""
    return float(
        1e3 * CostModel(link, Compute(), Compute(model_s=full_ms / 1e3)).image_s(input_bytes)
    )


def best_option(
    link: Link, local: float, offload: float, splits: Sequence[SplitProfile]
) -> tuple[str, float]:
    """The fastest option over `link`: "local", "offload" or "split:<point>", and its ms."""
    options = {"local": local, "offload": offload}
    options.update({f"split:{s.point}": s.predict(link) for s in splits})
    name = min(options, key=lambda k: options[k])
    return name, options[name]


def recommend(
    rate: float,
    rtt_ms: float,
    local: float,
    full_ms: float,
    input_bytes: int,
    fmt: str,
    splits: Sequence[SplitProfile],
    best: dict[float, str],
) -> tuple[str, str]:
    """(recommendation, reason) for a `rate` Mbit/s link; `best` (rate -> option) says at
    which of the profiled rates the chosen option also wins."""
    link = Link.mbit(rate, rtt_ms)
    offload = offload_ms(link, input_bytes, full_ms)
    choice, latency = best_option(link, local, offload, splits)
    wins = [f"{r:g}" for r, b in best.items() if b == choice]
    where = f"; of the rates profiled it wins at {', '.join(wins)} Mbit/s" if wins else ""
    if choice.startswith("split:"):
        s = next(s for s in splits if f"split:{s.point}" == choice)
        others = sorted((x.predict(link), x.point) for x in splits if x.point != s.point)
        runner = f", the next best split ({others[0][1]}) {others[0][0]:.2f} ms" if others else ""
        text = f"split after {s.point!r} at {rate:g} Mbit/s"
        reason = (
            f"it predicts {latency:.2f} ms end to end vs {local:.2f} ms local-only and "
            f"{offload:.2f} ms full offload{runner}; it sends a {s.bottleneck_bytes} B frame "
            f"instead of the {input_bytes} B {fmt.upper()} input"
            f"{where}"
        )
    elif choice == "local":
        text = f"run locally at {rate:g} Mbit/s (no split pays off)"
        fastest = min(splits, key=lambda s: s.predict(link), default=None)
        split_part = (
            f" and {fastest.predict(link):.2f} ms for the best split ({fastest.point})"
            if fastest
            else ""
        )
        reason = (
            f"the whole model takes {local:.2f} ms on the device, while any offload pays the "
            f"{rtt_ms:g} ms RTT and more: {offload:.2f} ms full offload{split_part}{where}"
        )
    else:
        text = f"offload the whole input at {rate:g} Mbit/s"
        reason = (
            f"sending the {input_bytes} B {fmt.upper()} input and running the full model "
            f"on the server ({offload:.2f} ms) beats {local:.2f} ms local-only and every split"
            f"{where}"
        )
    return text, reason
