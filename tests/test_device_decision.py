"""The agent decides over the whole decision space from what it measures of itself: a real
tail server on loopback, behind the link emulator, and a real agent that may finish the tail
on the device or send the image instead of running its head."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from fixtures.device import DeviceBundle, TailServer
from support import ListWriter, quiet, run_agent

from splitexit.bundle import load_bundle
from splitexit.link import LinkEmulator
from splitexit.runtime import HeadResult, HeadRunner
from splitexit_device.agent import Agent, AgentConfig, _Work
from splitexit_device.client import OffloadClient
from splitexit_device.records import Record
from splitexit_device.sources import folder_source, limit

NO_EXITS = {"layer1": 2.0, "bottleneck": 2.0}  # every input reaches the bottleneck


class SlowHead(HeadRunner):
    """A head on a device `delay_s` slower per piece (segments and exits; `only="exit_"`: the
    exit branches alone)."""

    def __init__(self, *args: Any, delay_s: float, only: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay_s = delay_s
        self.only = only

    def _timed(self, result: HeadResult, key: str, call: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = call(*args)
        if key.startswith(self.only):
            time.sleep(self.delay_s)
        result.timings[key] = time.perf_counter() - start
        return out


def run(
    tb: DeviceBundle,
    tail_server: Callable[..., TailServer],
    link_spec: str,
    config: AgentConfig,
    n: int = 24,
    summaries: list | None = None,
    **patch: Any,
) -> list[Record]:
    """Run an agent holding the bundle's tail over `link_spec`; `patch` replaces agent parts
    (a callable gets the agent)."""
    # the device holds the tail too; one input at a time, so that what the agent measures of
    # an action is that action's cost, not the wait behind its own inputs in flight
    config = dataclasses.replace(config, tail_here=True, window=1)
    srv = tail_server(tb.path)
    with LinkEmulator(("127.0.0.1", srv.port), link_spec) as link:
        bundle = quiet(load_bundle, tb.path)
        out = ListWriter()
        agent = Agent(bundle, config, OffloadClient(link.url, tb.name), writer=out)
        for name, make in patch.items():
            setattr(agent, name, make(agent))
        summary = run_agent(agent, limit(folder_source(tb.folder), n))
    assert len(out.records) == n
    if summaries is not None:
        summaries.append(summary.to_dict())
    return out.records


def _slow_tail(delay_s: float) -> Callable[[Agent], Any]:
    """A patch for `run`: the agent's tail here, `delay_s` slower."""

    def patch(agent: Agent) -> Any:
        tail = agent.tail
        run_code = tail.run_code

        def slow(z: Any) -> Any:
            time.sleep(delay_s)
            return run_code(z)

        tail.run_code = slow
        return tail

    return patch


def test_a_device_holding_the_tail_finishes_inputs_here_when_the_link_is_slow(
    device_bundle, tail_server
) -> None:
    config = AgentConfig(accuracy_floor=0.5, thresholds=NO_EXITS, images=False)
    summaries: list = []
    records = run(device_bundle, tail_server, "32kbit:20ms", config, summaries=summaries)
    here = [r for r in records if r.action == "tail"]
    assert summaries[0]["tail_here"] == len(here)  # counted apart from exits and offloads
    assert len(here) >= 0.8 * len(records), [(r.decided_by, r.action) for r in records]
    for r in here:
        assert r.decided_by == "device" and r.frame_bytes == 0 and r.prediction is not None
        assert r.expected_ms is not None and r.expected_ms < r.timings_ms["total"] + 50


def test_a_slow_device_tail_loses_to_the_offload_on_a_fast_link(device_bundle, tail_server) -> None:
    config = AgentConfig(accuracy_floor=0.5, thresholds=NO_EXITS, images=False)

    records = run(device_bundle, tail_server, "unlimited:2ms", config, tail=_slow_tail(0.05))
    sent = [r for r in records if r.action == "offload" and r.decided_by == "server"]
    assert len(sent) >= 0.7 * len(records), [(r.decided_by, r.action) for r in records]


def test_exits_that_cost_more_than_what_they_save_are_not_run(device_bundle, tail_server) -> None:
    every = {"layer1": 0.0, "bottleneck": 0.0}  # an exit that runs answers every input
    config = AgentConfig(accuracy_floor=0.5, thresholds=every, images=False)

    def slow_exits(agent: Agent) -> HeadRunner:
        return SlowHead(agent.bundle, thresholds=every, delay_s=0.03, only="exit_")

    # a slow link: the tail here follows the head; each exit costs far more than that tail
    records = run(device_bundle, tail_server, "32kbit:20ms", config, n=16, head=slow_exits)
    late = records[4:]  # the first inputs learn the exits' costs
    assert all(r.action == "tail" for r in late), [(r.decided_by, r.action) for r in records]
    # the same exits at their real cost, before an expensive offload: they pay, and answer
    slow_tail = {"tail": _slow_tail(0.05)}
    records = run(device_bundle, tail_server, "32kbit:20ms", config, n=16, **slow_tail)
    assert all(r.action == "exit" for r in records[4:]), [(r.decided_by, r.action) for r in records]


def test_an_exit_that_can_never_answer_is_not_run(device_bundle, tail_server) -> None:
    thresholds = {"layer1": 1.01, "bottleneck": 0.0}  # layer1 disabled; bottleneck takes all
    ran: list[str] = []

    class Watched(HeadRunner):
        """Lists the pieces run for inputs (the warm-up, which times every exit, is not one)."""

        def run(self, x: Any, **kw: Any) -> HeadResult:
            result = super().run(x, **kw)
            if kw.get("thresholds") is None:
                ran.extend(result.timings)
            return result

    def watched(agent: Agent) -> HeadRunner:
        return Watched(agent.bundle, thresholds=thresholds)

    for policy in ("fixed", "adaptive"):
        ran.clear()
        config = AgentConfig(policy=policy, accuracy_floor=0.5, thresholds=thresholds)
        records = run(device_bundle, tail_server, "unlimited:2ms", config, n=8, head=watched)
        assert "exit_layer1" not in ran, policy
        if policy == "fixed":  # (the adaptive rule may skip the other exit too, where cheaper)
            assert all(r.decided_by == "bottleneck" for r in records), [r.action for r in records]
            assert ran.count("exit_bottleneck") == 8


def test_a_slow_head_sends_the_image_to_the_servers_whole_model_instead(
    device_bundle, tail_server
) -> None:
    config = AgentConfig(accuracy_floor=0.5)

    def slow_head(agent: Agent) -> HeadRunner:
        return SlowHead(agent.bundle, delay_s=0.02)

    records = run(device_bundle, tail_server, "unlimited:2ms", config, head=slow_head)
    images = [r for r in records if r.action == "image"]
    assert len(images) >= 0.8 * len(records), [(r.decided_by, r.action) for r in records]
    for r in images:
        assert r.decided_by == "server" and r.channels is None
        assert r.frame_bytes > 0 and r.class_name is not None
        assert r.timings_ms["head"] is None  # the head never ran


def test_a_head_timed_slow_at_warm_up_is_timed_again_and_chosen_once_it_is_fast(
    device_bundle, tail_server
) -> None:
    class SlowAtFirst(SlowHead):
        """Slow for the warm-up's rounds, then as fast as the head is."""

        calls = 0

        def run(self, x: Any, **kw: Any) -> HeadResult:
            self.calls += 1
            if self.calls > 6:
                self.delay_s = 0.0
            return super().run(x, **kw)

    def slow_at_first(agent: Agent) -> HeadRunner:
        return SlowAtFirst(agent.bundle, delay_s=0.06)  # far slower than any image

    config = AgentConfig(accuracy_floor=0.5, explore_s=0.05)
    records = run(device_bundle, tail_server, "10mbit:20ms", config, n=40, head=slow_at_first)
    actions = [r.action for r in records]
    assert actions[0] == "image", actions  # what the warm-up measured
    assert "image" not in actions[-10:], actions  # the head, timed again, is the faster
    never = dataclasses.replace(config, explore_s=0.0)
    records = run(device_bundle, tail_server, "10mbit:20ms", never, n=12, head=slow_at_first)
    assert all(r.action == "image" for r in records), [
        (r.action, r.expected_ms, r.timings_ms["total"], r.reason) for r in records
    ]


def test_a_fast_head_keeps_the_image_on_the_device_when_the_round_trip_costs_more(
    device_bundle, tail_server
) -> None:
    records = run(device_bundle, tail_server, "10mbit:20ms", AgentConfig(accuracy_floor=0.5))
    assert not [r for r in records if r.action == "image"]


def test_after_a_slow_spell_the_agent_offloads_again_once_the_link_is_fast(
    device_bundle: DeviceBundle, tail_server: Callable[..., TailServer]
) -> None:
    """A slow link first (the tail here wins), then a fast one (the offload wins). The agent
    keeps learning the link from its probes while it finishes tails here, so it returns to
    offloading: its own device compute must not keep the event loop from timing them."""
    tb = device_bundle
    config = AgentConfig(
        accuracy_floor=0.5, thresholds=NO_EXITS, images=False, tail_here=True, window=1
    )
    n, spell = 64, 8
    srv = tail_server(tb.path)
    with LinkEmulator(("127.0.0.1", srv.port), "16kbit:60ms") as link:
        bundle = quiet(load_bundle, tb.path)
        out = ListWriter()
        agent = Agent(bundle, config, OffloadClient(link.url, tb.name), writer=out)
        run_code = agent.tail.run_code

        def slow(z: Any) -> Any:  # a device tail 80 ms slower than this machine's
            time.sleep(0.08)
            return run_code(z)

        agent.tail.run_code = slow

        def source() -> Any:
            for i, item in enumerate(limit(folder_source(tb.folder), n)):
                if i == spell:
                    link.set("unlimited:2ms")
                yield item

        run_agent(agent, source())
    actions = [(r.decided_by, r.action) for r in out.records]
    assert len(out.records) == n and actions[0] == ("device", "tail"), actions
    late = [r for r in out.records[-16:] if r.action == "offload" and r.decided_by == "server"]
    assert len(late) >= 0.7 * 16, actions


def test_a_plan_made_while_the_source_waits_is_used_only_if_nothing_changed_since(
    device_bundle, tail_server
) -> None:
    """`Agent.run` plans the next input while a blocking source waits for it; the input
    takes that plan only while every estimate it priced is as it was, and not for long."""
    tb = device_bundle
    srv = tail_server(tb.path)
    config = AgentConfig(tail_here=True, images=False)
    agent = Agent(quiet(load_bundle, tb.path), config, OffloadClient(srv.url, tb.name))
    item = next(iter(folder_source(tb.folder)))
    agent.warm_up(item)

    def planned(ahead: Any, t0: float | None = None) -> Any:
        work = _Work(item, 0, time.monotonic() if t0 is None else t0)
        agent._plan(work, ahead)
        return work

    ahead = agent._plan_ahead(set())
    assert ahead is not None and ahead.plan is not None and ahead.plan.action == "head"
    assert planned(ahead).cost is ahead.cost  # nothing changed: taken as it is
    assert planned(ahead, ahead.at + 1.0).cost is not ahead.cost  # too old: planned again

    agent.measure.observe_tail(1.0)  # the tail here just got slow
    work = planned(ahead)
    assert work.cost is not ahead.cost
    assert work.cost.device.tail_s > ahead.cost.device.tail_s

    ahead = agent._plan_ahead(set())
    assert ahead is not None
    agent.measure.link.observe(0.0, 5.0, 1000)  # an answer took 5 s: the link moved
    assert planned(ahead).cost is not ahead.cost

    agent.measure.link.reserve(100_000, time.monotonic())  # bytes queued: they drain in time
    assert agent._plan_ahead(set()) is None
