"""What the link and this device are doing now, learned from the agent's own work.

Every answered request (inference, or a small readiness probe) is a sample: n bytes both
ways, answered t seconds after it was sent (less the server's own time, when it says).
The path is modelled as

    t = base_latency + n * 8 / bandwidth

and estimated the way BBR does it, from two optimistic filters (delays on a path only ever
add time, so the quickest samples are the truest):

* base: the quickest sample of the last `window_s` seconds, (t0, n0) (small probes keep it
  close to the round trip; it keeps its value while no samples come);
* seconds per byte: the least of the last few (t - t0) / (n - n0) over samples clearly
  larger than n0 (a sample of about the base's size says nothing about bandwidth; one
  clearly smaller than a base that is large says its extra bytes cost less than the noise,
  and teaches 0); a sample quicker than predicted lowers it at once,

and predicts t = t0 + max(0, n - n0) * seconds per byte.

Requests in flight share the link: `reserve` keeps a virtual first-in-first-out queue of
the bytes sent (each takes n * seconds per byte), so a prediction adds the wait behind the
requests ahead, and samples come with that wait taken off. A request that
missed its deadline gives a lower bound on t; `observe_late` counts it (inflated by half),
which is enough to stop trusting a link that got slow. Two samples in a row that the
estimate misses by more than 2x the slow way restart it from the samples that follow, so
the estimate follows a link that degrades within a few samples, and one that recovers at
the first quick answer, while a lone slow outlier does not move it.

`Measurements` holds these with the device's own compute (per head segment, exit, encode,
the tail here, the image encode's time and size), the exits' leave rates and the server's
times, and prices every action with one `splitexit.cost.CostModel` (`cost(now)`).
`EwmaEstimator` is the plain exponentially weighted mean used for those. The server's
time is what the link estimate (from probes) leaves unexplained in inference answers, its
reported time included (`Measurements.observe_answer`): an inference request's fixed costs
beyond a probe's then never read as a slower link.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from splitexit.cost import Compute, CostModel, Link

_MIN_EXTRA = 0.25  # a sample teaches bandwidth if it is this much larger than the base
_SERVER_S_SLACK = 0.02  # unexplained seconds always credited to the server, not the link
LATE_FACTOR = 1.5  # an unanswered request's time is taken as this times what it waited
_LEAVE_PRIOR_SAMPLES = 32.0  # the samples calibration's leave rates count as (`Measurements`)


class EwmaEstimator:
    """Exponentially weighted mean (`value` is `prior` until the first sample). The prior
    counts as `prior_weight` samples (0: the first sample replaces it), which decay like
    any others."""

    def __init__(
        self, prior: float = 0.0, halflife: float = 8.0, prior_weight: float = 0.0
    ) -> None:
        if halflife <= 0:
            raise ValueError(f"halflife must be > 0 samples, got {halflife}")
        if prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0 samples, got {prior_weight}")
        self._decay = 0.5 ** (1.0 / halflife)
        self._value = prior
        self._w = prior_weight
        self._seen = False

    def observe(self, x: float) -> None:
        if not math.isfinite(x):
            return
        self._w = self._w * self._decay + 1.0
        self._value += (x - self._value) / self._w
        self._seen = True

    def reset(self, x: float) -> None:
        """Forget the past (the prior too): `x` is the only sample."""
        self._w = 0.0
        self.observe(x)

    @property
    def value(self) -> float:
        return self._value

    @property
    def seen(self) -> bool:
        return self._seen


class MinFilter:
    """Least of the last `size` samples (`value` is `prior` until the first one): the
    optimistic filter of a quantity that noise only ever makes larger."""

    def __init__(self, prior: float, size: int = 7) -> None:
        self._prior = prior
        self._samples: deque[float] = deque(maxlen=size)

    def observe(self, x: float) -> None:
        if math.isfinite(x):
            self._samples.append(x)

    def reset(self, x: float) -> None:
        """Forget the past: `x` is the only sample."""
        self._samples.clear()
        self.observe(x)

    @property
    def value(self) -> float:
        return min(self._samples) if self._samples else self._prior


@dataclass(frozen=True)
class LinkEstimate:
    """A snapshot: base latency (s), bandwidth (bit/s), samples seen."""

    base_latency_s: float
    bandwidth_bps: float
    samples: int
    base_bytes: float = 0.0

    def link(self, overhead_bytes: float = 0.0, queue_s: float = 0.0) -> Link:
        """The estimate as the cost model's link."""
        return Link(
            self.bandwidth_bps, self.base_latency_s, overhead_bytes, self.base_bytes, queue_s
        )

    def predict(self, nbytes: float) -> float:
        """Expected seconds to get an answer for `nbytes` (both ways)."""
        return self.link().transfer_s(nbytes)


class LinkEstimator:
    """Running (base latency, bandwidth) of the path to the server; see the module docstring.

    Args:
        samples: seconds per byte is the least of this many recent samples.
        window_s: the base latency is the minimum over this many seconds of samples.
        base_latency_s, bandwidth_bps: the prior, used until samples say otherwise.
        min_bps, max_bps: the bandwidth estimate stays in this range.
    """

    def __init__(
        self,
        *,
        samples: int = 7,
        window_s: float = 2.0,
        base_latency_s: float = 0.01,
        bandwidth_bps: float = 10e6,
        min_bps: float = 1e3,
        max_bps: float = 1e11,
    ) -> None:
        if not 0 < min_bps <= bandwidth_bps <= max_bps:
            raise ValueError("need 0 < min_bps <= bandwidth_bps <= max_bps")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self._spb = MinFilter(8.0 / bandwidth_bps, samples)  # seconds per byte
        self._min_spb, self._max_spb = 8.0 / max_bps, 8.0 / min_bps
        self._window_s = window_s
        # (when, seconds, bytes) of recent samples, seconds increasing: the base is first
        self._recent: deque[tuple[float, float, float]] = deque()
        self._last: tuple[float, float, float] | None = None
        self._base = (max(0.0, base_latency_s), 0.0)
        self._surprises = 0  # consecutive samples far off the prediction (+ slower, - faster)
        self._free_at = -math.inf  # when the bytes sent so far are through (virtual queue)
        self._fresh = False  # the link changed: the next bandwidth sample replaces the old
        self._spb_surprises = 0  # the same, for bandwidth samples alone
        self.bandwidth_seen_at = -math.inf  # when a sample last taught the bandwidth
        self.samples = 0
        self.changes = 0  # bumped by every call that may move an estimate or the queue

    @property
    def base_latency_s(self) -> float:
        """Seconds of the quickest recent sample (the round trip, plus its few bytes)."""
        return self._base[0]

    @property
    def bandwidth_bps(self) -> float:
        return 8.0 / min(max(self._spb.value, self._min_spb), self._max_spb)

    def estimate(self) -> LinkEstimate:
        return LinkEstimate(self.base_latency_s, self.bandwidth_bps, self.samples, self._base[1])

    def predict(self, nbytes: float) -> float:
        """Expected seconds from sending `nbytes` (both ways) to the answer."""
        return self.estimate().predict(nbytes)

    @property
    def relearning(self) -> bool:
        """The link changed and no sample has taught its bandwidth since: probe soon."""
        return self._fresh

    def queue_s(self, now: float) -> float:
        """Seconds a request sent now waits behind the bytes already sent (virtual queue)."""
        return max(0.0, self._free_at - now)

    def reserve(self, nbytes: float, now: float) -> float:
        """A request of `nbytes` goes out now; returns how long it should wait in the queue."""
        self.changes += 1
        wait = self.queue_s(now)
        spb = min(max(self._spb.value, self._min_spb), self._max_spb)
        self._free_at = max(self._free_at, now) + nbytes * spb
        return wait

    def clear_queue(self) -> None:
        """Nothing is in flight any more: the virtual queue is empty."""
        self.changes += 1
        self._free_at = -math.inf

    def observe(self, sent: float, done: float, nbytes: float) -> None:
        """A request of `nbytes` (both ways) sent at `sent` was answered at `done`.

        Times are `time.monotonic()` seconds; add the queueing `reserve` predicted to
        `sent`, and take the server's own time off `done` when the server reports it.
        Invalid samples are ignored.
        """
        if not (math.isfinite(sent) and math.isfinite(done) and nbytes > 0 and done >= sent):
            return
        self.changes += 1
        seconds = done - sent
        self.samples += 1
        predicted = self.predict(nbytes)
        side = 1 if seconds > 2.0 * predicted else -1 if seconds < 0.5 * predicted else 0
        self._surprises = self._surprises + side if side * self._surprises > 0 else side
        if abs(self._surprises) >= 2:  # two in a row, off by over 2x the same way
            self._surprises = 0
            # the link changed: only the previous sample (the first surprise) still holds
            self._recent = deque([self._last]) if self._last is not None else deque()
            self._fresh = True
        while self._recent and self._recent[0][0] < done - self._window_s:
            self._recent.popleft()
        while self._recent and self._recent[-1][1] >= seconds:  # monotonic deque: min first
            self._recent.pop()
        self._recent.append((done, seconds, nbytes))
        self._last = (done, seconds, nbytes)
        self._base = self._recent[0][1:]
        base_s, base_bytes = self._base
        if base_bytes - nbytes >= _MIN_EXTRA * base_bytes:
            # clearly smaller than the base, and no quicker: the extra bytes cost less than
            # the noise (the quickest sample was a large one), so teach a fast link
            spb = 0.0
        elif nbytes - base_bytes < _MIN_EXTRA * nbytes:
            return  # about the base's size: nothing to learn about the bandwidth
        else:
            spb = max(0.0, seconds - base_s) / (nbytes - base_bytes)
        self.bandwidth_seen_at = done
        now = min(max(self._spb.value, self._min_spb), self._max_spb)
        side = 1 if spb > 2.0 * now else -1 if max(spb, self._min_spb) < 0.5 * now else 0
        self._spb_surprises = self._spb_surprises + side if side * self._spb_surprises > 0 else side
        if self._fresh or abs(self._spb_surprises) >= 2:
            self._spb.reset(spb)
            self._fresh = False
            self._spb_surprises = 0
        else:
            self._spb.observe(spb)

    def observe_late(self, sent: float, now: float, nbytes: float) -> None:
        """A request of `nbytes` sent at `sent` was still unanswered at `now`.

        Its time is unknown but longer: taken as `LATE_FACTOR` times what it waited, so a
        link whose requests keep missing their deadline ends up predicted to miss them.
        """
        if math.isfinite(sent) and now - sent > self.predict(nbytes):
            self.observe(sent, sent + LATE_FACTOR * (now - sent), nbytes)


class Measurements:
    """Everything the policy needs to know, measured as the agent runs.

    The link estimate; the device's compute per piece (`observe_head`, `observe_frame`,
    `observe_tail`, `observe_image`: warm-up samples first, then every input); how often
    each exit answers; the server's time for a frame and for an image; the protocol bytes
    around a payload (both ways); the mean frame size at each operating point (from the
    manifest's, or a bound) and of an encoded image. `cost(now)` prices it all.
    """

    def __init__(
        self,
        frame_bytes_prior: dict[tuple[int, int], float],
        *,
        overhead_bytes: float = 600.0,
        link: LinkEstimator | None = None,
        segments: int = 0,
        exit_names: tuple[str, ...] = (),
        exit_segments: tuple[int, ...] = (),
        leave_prior: tuple[float, ...] = (),
        image_formats: tuple[str, ...] = ("png", "jpeg"),
    ) -> None:
        self.link = link or LinkEstimator()
        self.encode_s = EwmaEstimator(0.0)
        self.server_s = EwmaEstimator(0.0)
        self.server_image_s = EwmaEstimator(0.0)
        self.overhead_bytes = EwmaEstimator(overhead_bytes)
        self.frame_bytes = {k: EwmaEstimator(v, halflife=64) for k, v in frame_bytes_prior.items()}
        self.frames_seen = 0  # frame sizes observed: until it moves, every mean is as it was
        self._observed = 0  # device and server observations (`changes` adds the link's)
        self.preprocess_s = EwmaEstimator(0.0)
        self.segment_s = [EwmaEstimator(0.0) for _ in range(segments)]
        self.exit_names = tuple(exit_names)
        self.exit_segments = tuple(exit_segments)
        self.exit_s = [EwmaEstimator(0.0) for _ in exit_names]
        # calibration's rates, measured on held-out data, count as _LEAVE_PRIOR_SAMPLES
        # inputs: one input is a 0 or a 1, and alone it would switch an exit off (an exit
        # not run learns nothing more until it is explored)
        w = _LEAVE_PRIOR_SAMPLES if leave_prior else 0.0
        leave = tuple(leave_prior) or (0.0,) * len(exit_names)
        self.leave = [EwmaEstimator(p, halflife=64, prior_weight=w) for p in leave]
        self.tail_s = EwmaEstimator(0.0)
        self.image_encode_s = {f: EwmaEstimator(0.0) for f in image_formats}
        self.image_bytes = {f: EwmaEstimator(0.0, halflife=64) for f in image_formats}

    # ------------------------------------------------------------------- the device

    def observe_head(self, timings: dict[str, float], preprocess_s: float) -> None:
        """One head run: `timings` as `HeadRunner` gives them ("segment_i", "exit_<name>"
        seconds; the pieces it did not run are absent)."""
        self._observed += 1
        self.preprocess_s.observe(preprocess_s)
        for i, est in enumerate(self.segment_s):
            t = timings.get(f"segment_{i}")
            if t is not None:
                est.observe(t)
        for name, est in zip(self.exit_names, self.exit_s, strict=True):
            t = timings.get(f"exit_{name}")
            if t is not None:
                est.observe(t)

    def observe_leave(self, exited: str | None, ran: Collection[str] | None = None) -> None:
        """An input ran the head with the exits `ran` (None: all): it left at `exited` (None:
        at none). An exit not run learns nothing."""
        self._observed += 1
        for name, est in zip(self.exit_names, self.leave, strict=True):
            if ran is None or name in ran:
                est.observe(float(name == exited))

    def observe_frame(self, point: tuple[int, int], nbytes: int, encode_s: float) -> None:
        self._observed += 1
        self.encode_s.observe(encode_s)
        if point in self.frame_bytes:
            self.frame_bytes[point].observe(nbytes)
            self.frames_seen += 1

    def observe_tail(self, seconds: float) -> None:
        """The tail finished here, on the float code."""
        self._observed += 1
        self.tail_s.observe(seconds)

    def observe_image(self, image_format: str, nbytes: int, encode_s: float) -> None:
        """An image encoded for sending in `image_format`."""
        self._observed += 1
        if image_format in self.image_bytes:
            self.image_encode_s[image_format].observe(encode_s)
            self.image_bytes[image_format].observe(nbytes)

    def images(self) -> dict[str, tuple[float, float]]:
        """Per format measured so far: (seconds to encode, bytes) of an image."""
        return {
            f: (self.image_encode_s[f].value, b.value)
            for f, b in self.image_bytes.items()
            if b.seen
        }

    # ------------------------------------------------------------------ the network

    def observe_answer(
        self,
        *,
        frame_bytes: int,
        request_bytes: int,
        response_bytes: int,
        sent: float,
        done: float,
        server_s: float | None,
        image: bool = False,
    ) -> None:
        """One answered request (a single attempt): the link, server and overhead estimates.

        `sent` is when the request got the link, `done` when its answer came; `server_s` the
        server's own time when it reports it. The link estimate is learned from probes,
        which cost the server nothing; what it does not explain in an answer (beyond the
        server's reported time) is the server's, including fixed costs of an inference
        request a probe does not pay, so that answers do not read as a slower link. Only an
        answer far off that estimate is taken as news about the link (it got slower or
        faster). `image`: the payload was an image.
        """
        self._observed += 1
        nbytes = request_bytes + response_bytes
        server = self.server_image_s if image else self.server_s
        self.overhead_bytes.observe(request_bytes - frame_bytes + response_bytes)
        reported = server_s if server_s is not None else 0.0
        network = self.link.predict(nbytes)
        unexplained = (done - sent) - reported - network
        if -0.5 * network <= unexplained <= max(network, _SERVER_S_SLACK):
            server.observe(reported + max(0.0, unexplained))
            return
        if server_s is not None:
            server.observe(server_s)
        self.link.observe(sent, done - (reported if server_s is not None else server.value), nbytes)

    # -------------------------------------------------------------------- the model

    @property
    def changes(self) -> int:
        """Bumped by every observation: equal counts, equal estimates (save the link's
        virtual queue, which drains as time passes)."""
        return self._observed + self.link.changes

    def cost(self, now: float) -> CostModel:
        """Every measurement as of `now`, as the cost model the policy prices actions with."""
        link = self.link.estimate().link(self.overhead_bytes.value, self.link.queue_s(now))
        device = Compute(
            segment_s=tuple(e.value for e in self.segment_s),
            exit_s=tuple(e.value for e in self.exit_s),
            preprocess_s=self.preprocess_s.value,
            encode_s=self.encode_s.value,
            tail_s=self.tail_s.value,
        )
        server = Compute(tail_s=self.server_s.value, model_s=self.server_image_s.value)
        return CostModel(link, device, server, self.exit_segments)

    def leave_rates(self) -> tuple[float, ...]:
        """The chance an input leaves at each exit, as observed (the manifest's first)."""
        return tuple(e.value for e in self.leave)

    def mean_frame_bytes(self, point: tuple[int, int]) -> float:
        return self.frame_bytes[point].value

    def snapshot(self) -> dict[str, Any]:
        est = self.link.estimate()
        return {
            "bandwidth_bps": round(est.bandwidth_bps, 1),
            "base_latency_s": round(est.base_latency_s, 6),
            "server_s": round(self.server_s.value, 6),
            "server_image_s": round(self.server_image_s.value, 6),
            "overhead_bytes": round(self.overhead_bytes.value, 1),
            "samples": est.samples,
            "device_ms": {
                "preprocess": round(self.preprocess_s.value * 1e3, 4),
                "segments": [round(e.value * 1e3, 4) for e in self.segment_s],
                "exits": [round(e.value * 1e3, 4) for e in self.exit_s],
                "encode": round(self.encode_s.value * 1e3, 4),
                "tail": round(self.tail_s.value * 1e3, 4),
                "image_encode": {
                    f: round(e.value * 1e3, 4) for f, e in self.image_encode_s.items()
                },
            },
            "image_bytes": {f: round(b.value, 1) for f, b in self.image_bytes.items()},
            "leave_rates": [round(e.value, 4) for e in self.leave],
        }
