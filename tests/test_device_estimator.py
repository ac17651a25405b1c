"""The link estimate follows what the agent's own requests show, and the circuit breaker
opens, holds and closes as the server fails and recovers."""

from __future__ import annotations

import pytest

from splitexit.cost import Link
from splitexit_device.breaker import CircuitBreaker
from splitexit_device.estimator import EwmaEstimator, LinkEstimator, Measurements
from splitexit_device.policy import exit_plan

PROBE, REQUEST = 300, 1300  # bytes both ways


def feed(est: LinkEstimator, rate_bps: float, rtt_s: float, t0: float, n: int = 20) -> float:
    """Alternate probes and requests over an ideal link; returns the time reached."""
    t = t0
    for i in range(n):
        nbytes = PROBE if i % 2 else REQUEST
        seconds = rtt_s + nbytes * 8 / rate_bps
        est.observe(t, t + seconds, nbytes)
        t += seconds + 0.05
    return t


def test_ewma_weights_recent_samples_more_and_can_restart() -> None:
    e = EwmaEstimator(prior=5.0, halflife=1.0)
    assert e.value == 5.0 and not e.seen
    e.observe(1.0)
    assert e.value == 1.0  # the prior is no sample
    e.observe(3.0)
    assert 2.0 < e.value < 3.0
    e.reset(10.0)
    assert e.value == 10.0


@pytest.mark.parametrize(("rate", "rtt"), [(64e3, 0.02), (1e6, 0.05), (20e6, 0.005)])
def test_estimate_recovers_rate_and_rtt_of_a_steady_link(rate: float, rtt: float) -> None:
    est = LinkEstimator()
    feed(est, rate, rtt, 0.0)
    predicted = est.predict(REQUEST)
    assert predicted == pytest.approx(rtt + REQUEST * 8 / rate, rel=0.1)
    # the base latency is the probe's time: the RTT plus a small request's transfer
    assert est.base_latency_s == pytest.approx(rtt + PROBE * 8 / rate, rel=0.01)
    assert est.bandwidth_bps == pytest.approx(rate, rel=0.01)


def test_estimate_follows_a_link_that_degrades_and_recovers_within_a_few_samples() -> None:
    est = LinkEstimator()
    t = feed(est, 10e6, 0.01, 0.0)
    fast = est.predict(REQUEST)
    t = feed(est, 32e3, 0.02, t, n=6)
    assert est.predict(REQUEST) > 10 * fast
    assert est.predict(REQUEST) == pytest.approx(0.02 + REQUEST * 8 / 32e3, rel=0.3)
    feed(est, 10e6, 0.01, t + 3.0, n=6)  # later than the base latency's window
    assert est.predict(REQUEST) == pytest.approx(fast, rel=0.3)


def test_one_outlier_does_not_move_the_estimate_much() -> None:
    est = LinkEstimator()
    t = feed(est, 10e6, 0.01, 0.0)
    before = est.predict(REQUEST)
    est.observe(t, t + 0.3, REQUEST)  # a scheduling hiccup
    assert before <= est.predict(REQUEST) < 0.5 * 0.3


def test_a_deadline_miss_counts_as_a_lower_bound() -> None:
    est = LinkEstimator()
    t = feed(est, 10e6, 0.01, 0.0)
    for i in range(3):
        est.observe_late(t + i, t + i + 0.5, REQUEST)
    assert est.predict(REQUEST) >= 0.25
    est.observe_late(t + 10, t + 10.001, REQUEST)  # quicker than predicted: says nothing
    assert est.predict(REQUEST) >= 0.25


def test_invalid_samples_are_ignored() -> None:
    est = LinkEstimator()
    est.observe(1.0, 0.5, 100)
    est.observe(0.0, float("nan"), 100)
    est.observe(0.0, 1.0, 0)
    assert est.samples == 0


def test_measurements_turn_answers_and_compute_into_one_cost_model() -> None:
    m = Measurements(
        {(8, 8): 1000.0},
        overhead_bytes=500,
        segments=2,
        exit_names=("a",),
        exit_segments=(0,),
        leave_prior=(0.25,),
    )
    assert m.cost(0.0).link == Link(10e6, 0.01, 500)
    m.observe_frame((8, 8), 800, encode_s=0.001)
    m.observe_answer(
        frame_bytes=800, request_bytes=1200, response_bytes=300, sent=0.0, done=0.05, server_s=0.01
    )
    m.observe_head({"segment_0": 0.002, "segment_1": 0.003, "exit_a": 0.0005}, 0.0001)
    m.observe_tail(0.004)
    m.observe_image("png", 700, 0.0002)
    c = m.cost(0.0)
    assert c.device.encode_s == pytest.approx(0.001)
    assert c.server.tail_s == pytest.approx(0.01)
    assert c.link.overhead_bytes == pytest.approx(700)
    assert c.device.segment_s == pytest.approx((0.002, 0.003))
    assert c.exit_s(0) == pytest.approx(0.0001 + 0.002 + 0.0005)
    assert c.tail_here_s() == pytest.approx(0.004)
    assert m.images() == {"png": (pytest.approx(0.0002), pytest.approx(700))}  # jpeg: unseen
    assert m.mean_frame_bytes((8, 8)) == pytest.approx(800)
    assert m.leave_rates() == (0.25,)
    for _ in range(50):
        m.observe_leave("a", ran=())  # the exit did not run: nothing learned
    assert m.leave_rates() == (0.25,)
    for _ in range(50):
        m.observe_leave("a")
    assert m.leave_rates()[0] > 0.25
    assert m.snapshot()["samples"] == 1


def test_one_input_that_does_not_leave_does_not_switch_a_calibrated_exit_off() -> None:
    # calibration says 90% leave at the bottleneck exit; the first input does not: the
    # exit must still pay for itself in the plan (before, the estimate fell to 0 and the
    # exit was not run again until explored)
    m = Measurements({}, segments=1, exit_names=("b",), exit_segments=(0,), leave_prior=(0.9,))
    m.observe_head({"segment_0": 0.002, "exit_b": 0.0002}, 0.0)
    m.observe_leave(None)
    assert 0.85 < m.leave_rates()[0] < 0.9
    assert exit_plan(m.cost(0.0), m.leave_rates(), after_s=0.002) == (True,)
    for _ in range(200):  # a drift the prior must not hide: the rate follows it
        m.observe_leave(None)
    assert m.leave_rates()[0] < 0.05


def test_a_prior_weight_counts_as_that_many_samples_and_reset_forgets_it() -> None:
    est = EwmaEstimator(1.0, halflife=1e9, prior_weight=3.0)
    assert not est.seen
    est.observe(0.0)
    assert est.seen and est.value == pytest.approx(0.75)
    est.reset(0.0)
    assert est.value == 0.0
    with pytest.raises(ValueError, match="prior_weight"):
        EwmaEstimator(0.0, prior_weight=-1.0)


def test_a_slow_spell_is_forgotten_at_the_first_answers_quicker_than_predicted() -> None:
    est = LinkEstimator()
    t = feed(est, 5e6, 0.02, 0.0)
    normal = est.predict(REQUEST)
    t = feed(est, 200e3, 0.02, t, n=6)  # a slow spell
    assert est.predict(REQUEST) > 2 * normal
    t = feed(est, 5e6, 0.02, t, n=2)  # the link is back: no window to wait out
    assert est.predict(REQUEST) == pytest.approx(normal, rel=0.05)


def test_noise_that_only_adds_time_does_not_make_the_link_look_slower() -> None:
    """Every sample late by 0-1.5 ms (scheduling, the server): 5 Mbit/s still reads ~5."""
    import random

    rng = random.Random(0)
    est = LinkEstimator()
    t = 0.0
    for i in range(60):
        nbytes = PROBE if i % 2 else REQUEST
        seconds = 0.02 + nbytes * 8 / 5e6 + rng.uniform(0, 0.0015)
        est.observe(t, t + seconds, nbytes)
        t += seconds + 0.05
    assert est.bandwidth_bps == pytest.approx(5e6, rel=0.25)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_consecutive_failures_and_lets_one_trial_through() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, reset_s=1.0, max_reset_s=4.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state == "closed"
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.t += 1.0
    assert b.state == "half_open"
    assert b.allow()  # the trial
    assert not b.allow()  # only one at a time
    b.success()
    assert b.state == "closed" and b.allow()
    assert b.opened == 1


def test_a_failed_trial_doubles_the_wait_up_to_the_maximum() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, reset_s=1.0, max_reset_s=3.0, clock=clock)
    b.failure()
    waits = []
    for _ in range(3):
        start = clock.t
        while not b.allow():
            clock.t += 0.25
        waits.append(clock.t - start)
        b.failure()
    assert waits == [1.0, 2.0, 3.0]


def test_success_resets_the_failure_count() -> None:
    b = CircuitBreaker(failure_threshold=2, clock=Clock())
    b.failure()
    b.success()
    b.failure()
    assert b.state == "closed"


def test_hold_pauses_offloading_without_counting_a_failure() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, clock=clock)
    b.hold(2.0)
    assert not b.allow() and b.state == "closed"
    clock.t += 2.0
    assert b.allow()


def test_a_cancelled_trial_lets_another_one_try() -> None:
    clock = Clock()
    b = CircuitBreaker(failure_threshold=1, reset_s=1.0, clock=clock)
    b.failure()
    clock.t += 1.0
    assert b.allow() and not b.allow()
    b.release()
    assert b.allow()


def test_breaker_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_s=5.0, max_reset_s=1.0)


def test_after_a_change_a_small_probe_and_similar_requests_are_enough() -> None:
    """Recovered link: one probe, then requests all of one size (no more probes)."""
    est = LinkEstimator()
    t = feed(est, 32e3, 0.02, 0.0)
    for i in range(4):  # fast again: a probe, then requests of one size only
        nbytes, seconds = (PROBE, 0.002) if i == 0 else (REQUEST, 0.005)
        est.observe(t, t + seconds, nbytes)
        t += 0.05
    assert est.predict(REQUEST) < 0.01
    assert est.bandwidth_bps > 1e6


def test_a_large_sample_quicker_than_the_small_ones_teaches_a_fast_link() -> None:
    """On a fast link jitter outweighs the transfer: when the quickest recent sample is a
    large request, a small one no quicker says the extra bytes cost nothing measurable. The
    estimate must not stay at a slow rate it learned before (it then never offloads again)."""
    est = LinkEstimator()
    t = feed(est, 64e3, 0.05, 0.0, n=6)  # a slow link first: about 0.16 s per request
    slow = est.predict(REQUEST)
    t += 3.0  # past the base latency's window
    # the link is fast now, with jitter larger than a request's transfer
    for i, (nbytes, seconds) in enumerate([(REQUEST, 0.004), (PROBE, 0.006), (PROBE, 0.005)]):
        est.observe(t + i, t + i + seconds, nbytes)
    assert est.predict(REQUEST) < 0.01 < slow / 10
    assert est.bandwidth_bps > 100e6
