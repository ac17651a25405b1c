"""Whatever the server does, every input gets exactly one answer: a server killed mid-run and
restarted, one that stalls, one that fails or talks garbage, one that pushes back, and one
that serves another bundle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from fixtures.device import DeviceBundle
from support import ListWriter, run_agent

from splitexit_device.agent import Agent, AgentConfig
from splitexit_device.client import ClientConfig, FingerprintRejected, OffloadClient
from splitexit_device.sources import Input, Source, folder_source, limit

NO_EXITS = {"layer1": 2.0, "bottleneck": 2.0}


def make_agent(
    tb: DeviceBundle, url: str, config: AgentConfig, **client: object
) -> tuple[Agent, ListWriter]:
    writer = ListWriter()
    c = OffloadClient(url, tb.name, ClientConfig(**client))  # type: ignore[arg-type]
    return Agent(tb.load(), config, c, writer=writer), writer


def one_each(writer: ListWriter, n: int) -> None:
    ids = [r.id for r in writer.records]
    assert len(ids) == len(set(ids)) == n


def test_server_killed_mid_run_then_restarted_offloading_resumes(
    device_bundle, tail_server
) -> None:
    tb = device_bundle
    srv = tail_server(tb.path)
    config = AgentConfig(
        policy="fixed",
        thresholds=NO_EXITS,
        breaker_failures=2,
        breaker_reset_s=0.1,
        breaker_max_reset_s=0.4,
    )
    agent, out = make_agent(
        device_bundle, srv.url, config, timeout_s=1.0, retries=1, backoff_s=0.01
    )
    items = list(folder_source(tb.folder))[:150]
    phase: dict[str, int] = {}

    def source() -> Iterator[Input]:
        for i, item in enumerate(items):
            if i == 40:
                srv.stop()  # killed: connections cut, port closed
                phase["down"] = i
            if i == 80:
                srv.start()  # back on the same port (loads and warms up first)
                phase["up"] = i
            time.sleep(0.01)
            yield item

    summary = run_agent(agent, Source(source))
    one_each(out, len(items))
    by_index = [out.by_id()[item.id] for item in items]
    before, during, after = by_index[:35], by_index[45:80], by_index[-30:]
    assert all(r.decided_by == "server" for r in before)
    assert all(r.decided_by == "fallback" and r.prediction is not None for r in during)
    assert {r.reason for r in during} <= {"unreachable", "circuit_open", "busy", "interrupted"}
    assert all(r.decided_by == "server" for r in after)  # resumed by itself
    d = summary.to_dict()
    assert d["breaker_opened"] >= 1
    assert d["offloaded"] + d["fallbacks"] == len(items)


def test_a_stalled_server_times_out_and_every_input_is_answered_locally(
    device_bundle, fault_server
) -> None:
    tb = device_bundle
    srv = fault_server("stall", tb)
    config = AgentConfig(thresholds=NO_EXITS, window=4, breaker_failures=3)
    agent, out = make_agent(device_bundle, srv.url, config, timeout_s=0.3, retries=0)
    start = time.monotonic()
    summary = run_agent(agent, limit(folder_source(tb.folder), 40))
    seconds = time.monotonic() - start
    one_each(out, 40)
    assert all(r.decided_by == "fallback" and r.exit for r in out.records)
    reasons = summary.to_dict()["fallback_reasons"]
    assert set(reasons) <= {"timeout", "circuit_open"} and reasons["timeout"] >= 3
    assert reasons.get("circuit_open", 0) > 20  # the breaker spared the rest the wait
    assert seconds < 10


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("error500", "server_error"), ("garbage", "server_error"), ("impossible", "server_error")],
)
def test_failing_servers_get_retried_then_answered_locally(
    mode: str, reason: str, device_bundle, fault_server
) -> None:
    tb = device_bundle
    srv = fault_server(mode, tb)
    config = AgentConfig(thresholds=NO_EXITS, breaker_failures=4)
    agent, out = make_agent(device_bundle, srv.url, config, retries=1, backoff_s=0.01)
    summary = run_agent(agent, limit(folder_source(tb.folder), 30))
    attempts = dict(srv.attempts)
    one_each(out, 30)
    assert all(r.decided_by == "fallback" for r in out.records)
    failed = [r for r in out.records if r.reason == reason]
    assert failed and all(r.attempts == 2 for r in failed)
    assert all(n == 2 for n in attempts.values())  # each request id: first try and one retry
    assert summary.to_dict()["retries"] == len(failed)


def test_429_pauses_offloading_for_retry_after_without_tripping_the_breaker(
    device_bundle, fault_server
) -> None:
    tb = device_bundle
    srv = fault_server("busy", tb, retry_after=30)
    agent, out = make_agent(device_bundle, srv.url, AgentConfig(thresholds=NO_EXITS, window=1))
    summary = run_agent(agent, limit(folder_source(tb.folder), 20))
    asked = sum(srv.attempts.values())
    one_each(out, 20)
    assert asked == 1  # the server said "not for 30 s": no more requests
    assert all(r.reason == "busy" for r in out.records)
    assert summary.to_dict()["breaker_opened"] == 0


def test_a_server_with_another_bundle_is_refused_at_start(
    device_bundle, other_bundle, tail_server
) -> None:
    tb = device_bundle
    srv = tail_server(other_bundle)
    agent, _ = make_agent(device_bundle, srv.url, AgentConfig())
    with pytest.raises(FingerprintRejected, match="deploy the same bundle"):
        run_agent(agent, limit(folder_source(tb.folder), 5))


def test_409_mid_run_stops_offloading_with_one_clear_message(
    device_bundle, other_bundle, tail_server
) -> None:
    """A server swapped for one with another bundle while the device runs."""
    tb = device_bundle
    messages: list[str] = []
    srv = tail_server(other_bundle)
    client = OffloadClient(srv.url, tb.name)
    out = ListWriter()
    agent = Agent(
        tb.load(), AgentConfig(thresholds=NO_EXITS), client, writer=out, log=messages.append
    )

    async def go() -> None:  # no start(): the check at start would refuse already
        try:
            await agent.run(limit(folder_source(tb.folder), 30))
        finally:
            await client.aclose()

    asyncio.run(go())
    one_each(out, 30)
    assert all(r.decided_by == "fallback" for r in out.records)
    assert {r.reason for r in out.records} == {"fingerprint"}
    assert len(messages) == 1 and "different bundles" in messages[0]
    assert sum(r.attempts for r in out.records) <= agent.config.window
    assert agent.summary.to_dict()["offloading_stopped"] == "fingerprint"
