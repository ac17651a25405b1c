"""The agent over the stream: whatever the server does, every input gets exactly one answer.
Killed mid-run and restarted, stalled (SIGSTOP: noticed by ping), answering garbage, closing
mid-message, pushing back, refusing the fingerprint, draining on SIGTERM, Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import interrupt_agent, run_agent, stream_agent

from splitexit_device.agent import AgentConfig
from splitexit_device.client import FingerprintRejected, OffloadRefused
from splitexit_device.sources import Input, Source, folder_source, limit
from splitexit_device.stream import StreamConfig

NO_EXITS = {"layer1": 2.0, "bottleneck": 2.0}
FAST_PING = StreamConfig(
    ping_interval_s=0.2, ping_timeout_s=0.2, reconnect_s=0.02, reconnect_max_s=0.2
)


def one_each(records: list, n: int) -> None:
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)) == n


def paced(items: list[Input], actions: dict[int, object], pause_s: float = 0.01) -> Source:
    def source() -> Iterator[Input]:
        for i, item in enumerate(items):
            if i in actions:
                actions[i]()  # type: ignore[operator]
            time.sleep(pause_s)
            yield item

    return Source(source)


def test_answers_over_the_stream_match_http_and_cost_a_few_bytes(
    device_bundle, tail_server
) -> None:
    tb = device_bundle
    config = AgentConfig(policy="fixed", channels=8, bits=8, thresholds=NO_EXITS)
    items = limit(folder_source(tb.folder), 30)
    srv = tail_server(tb.path)
    agent, out, client = stream_agent(srv.url, tb, config)
    summary = run_agent(agent, items)
    assert client.transport == "stream" and summary.to_dict()["transport"] == "stream"
    http_agent, http_out, http = stream_agent(srv.url, tb, config, StreamConfig(transport="http"))
    run_agent(http_agent, limit(folder_source(tb.folder), 30))
    assert http.transport == "http"
    one_each(out.records, 30)
    want = {r.id: r.prediction for r in http_out.records}
    assert all(r.decided_by == "server" and r.prediction == want[r.id] for r in out.records)
    for r in out.records:  # qparams + payload, then 2 B of id and point, 8 B of WebSocket
        assert r.overhead_bytes == 2 + 8 and r.response_bytes == 2 + 4


def test_a_session_asking_for_timing_gives_records_the_servers_and_the_tails_time(
    device_bundle, tail_server
) -> None:
    tb = device_bundle
    config = AgentConfig(policy="fixed", thresholds=NO_EXITS)
    srv = tail_server(tb.path)
    agent, out, _ = stream_agent(srv.url, tb, config, timing=True)
    run_agent(agent, limit(folder_source(tb.folder), 10))
    for r in out.records:
        ms = r.timings_ms
        assert r.response_bytes == 2 + 4 + 4
        assert 0 < ms["tail"] <= ms["server"] < ms["network"] + ms["server"] < ms["total"]


def test_a_server_without_a_stream_is_used_over_http_and_stream_only_refuses_it(
    device_bundle, fault_server
) -> None:
    tb = device_bundle
    srv = fault_server("ok", tb)
    agent, out, client = stream_agent(srv.url, tb, AgentConfig(thresholds=NO_EXITS))
    run_agent(agent, limit(folder_source(tb.folder), 10))
    assert client.transport == "http"
    assert all(r.decided_by == "server" for r in out.records if r.reason is None)
    agent, _, _ = stream_agent(
        srv.url, tb, AgentConfig(thresholds=NO_EXITS), StreamConfig(transport="stream")
    )
    with pytest.raises(OffloadRefused, match="offers no stream"):
        run_agent(agent, limit(folder_source(tb.folder), 3))


def test_server_killed_mid_run_then_restarted_the_stream_reconnects(
    device_bundle, tail_server
) -> None:
    tb = device_bundle
    srv = tail_server(tb.path)
    config = AgentConfig(
        policy="fixed", thresholds=NO_EXITS, breaker_failures=2, breaker_reset_s=0.1,
        breaker_max_reset_s=0.4,
    )  # fmt: skip
    agent, out, client = stream_agent(
        srv.url, tb, config, FAST_PING, timeout_s=1.0, retries=1, backoff_s=0.01
    )
    items = list(folder_source(tb.folder))[:150]
    summary = run_agent(agent, paced(items, {40: srv.stop, 80: srv.start}))
    one_each(out.records, len(items))
    by_index = [out.by_id()[item.id] for item in items]
    before, during, after = by_index[:35], by_index[45:80], by_index[-30:]
    assert all(r.decided_by == "server" for r in before), [r.reason for r in before]
    local = [r for r in during if r.decided_by == "fallback"]
    assert len(local) > 25 and all(r.prediction is not None for r in local)
    # the rest were still trying (reconnecting) within their time when the server came back
    assert all(r.decided_by == "server" for r in during if r not in local)
    assert {r.reason for r in local} <= {
        "unreachable",
        "circuit_open",
        "busy",
        "timeout",
        "deadline",
    }
    assert all(r.decided_by == "server" for r in after), [r.reason for r in after]  # resumed
    assert client.transport == "stream" and client.reconnects >= 1
    assert summary.to_dict()["breaker_opened"] >= 1


def test_a_stopped_server_is_noticed_by_ping_long_before_the_timeout(
    device_bundle, process_server
) -> None:
    """SIGSTOP: the connection stays up, nothing answers; the 10 s attempt timeout never
    matters, the 0.2 s ping does."""
    tb = device_bundle
    srv = process_server(tb.path, "--no-warmup", "--max-queue-delay-ms", "1")
    config = AgentConfig(policy="fixed", thresholds=NO_EXITS, breaker_failures=2)
    agent, out, _ = stream_agent(
        srv.url, tb, config, FAST_PING, timeout_s=10.0, retries=0, connect_timeout_s=0.3
    )
    items = list(folder_source(tb.folder))[:60]
    start = time.monotonic()
    run_agent(agent, paced(items, {20: lambda: srv.signal(signal.SIGSTOP)}))
    seconds = time.monotonic() - start
    one_each(out.records, len(items))
    late = [out.by_id()[item.id] for item in items[25:]]
    assert all(r.decided_by == "fallback" for r in late)
    assert {r.reason for r in late} <= {"unreachable", "timeout", "deadline", "circuit_open"}
    stalled = [r for r in out.records if r.reason == "unreachable"]
    assert stalled and max(r.timings_ms["total"] for r in stalled) < 2000
    assert seconds < 10


@pytest.mark.parametrize(("mode", "reason"), [("garbage", "server_error"), ("flaky", None)])
def test_garbage_answers_and_closes_mid_message_are_retried_on_a_new_connection(
    mode: str, reason: str | None, device_bundle, fault_stream_server
) -> None:
    tb = device_bundle
    srv = fault_stream_server(mode, tb)
    config = AgentConfig(policy="fixed", thresholds=NO_EXITS, window=1, breaker_failures=50)
    agent, out, client = stream_agent(srv.url, tb, config, retries=1, backoff_s=0.01)
    run_agent(agent, limit(folder_source(tb.folder), 20))
    messages, connections = srv.messages, srv.connections
    one_each(out.records, 20)
    offloaded = [r for r in out.records if r.channels is not None]
    assert offloaded and all(r.attempts == 2 for r in offloaded)
    assert messages == 2 * len(offloaded)
    if reason is None:  # every first attempt lost with its connection; the retry answered
        assert connections == 1 + len(offloaded)
        assert all(r.decided_by == "server" for r in offloaded)
    else:  # a garbage answer ends its connection: every attempt on a new one
        assert connections == messages
        assert all(r.decided_by == "fallback" and r.reason == reason for r in offloaded)
    assert client.reconnects == connections - 1


def test_a_stream_that_does_not_open_at_start_is_opened_by_the_first_offloads(
    device_bundle, fault_stream_server
) -> None:
    tb = device_bundle
    messages: list[str] = []
    srv = fault_stream_server("mute_once", tb)
    config = AgentConfig(policy="fixed", thresholds=NO_EXITS, window=1)
    agent, out, client = stream_agent(srv.url, tb, config, log=messages.append, timeout_s=0.3)
    run_agent(agent, limit(folder_source(tb.folder), 10))
    connections = srv.connections
    assert any("did not open" in m for m in messages)
    assert client.transport == "stream" and connections == 2
    assert all(r.decided_by == "server" for r in out.records)


def test_busy_pauses_offloading_for_retry_after_without_tripping_the_breaker(
    device_bundle, fault_stream_server
) -> None:
    tb = device_bundle
    srv = fault_stream_server("busy", tb, retry_after=30)
    agent, out, _ = stream_agent(srv.url, tb, AgentConfig(thresholds=NO_EXITS, window=1))
    summary = run_agent(agent, limit(folder_source(tb.folder), 20))
    asked = srv.messages
    one_each(out.records, 20)
    assert asked == 1
    assert all(r.reason == "busy" for r in out.records if r.decided_by == "fallback")
    assert summary.to_dict()["breaker_opened"] == 0


def test_a_fingerprint_refused_at_the_handshake_stops_before_the_run(
    device_bundle, fault_stream_server
) -> None:
    tb = device_bundle
    srv = fault_stream_server("refuse", tb)
    agent, _, _ = stream_agent(srv.url, tb, AgentConfig())
    with pytest.raises(FingerprintRejected, match="deploy the same bundle"):
        run_agent(agent, limit(folder_source(tb.folder), 5))


def test_a_server_swapped_for_another_bundle_stops_offloading_at_the_reconnect(
    device_bundle, other_bundle, tail_server
) -> None:
    tb = device_bundle
    srv = tail_server(tb.path)

    def swap() -> None:
        srv.stop()
        tail_server(other_bundle, port=srv.port)

    messages: list[str] = []
    config = AgentConfig(policy="fixed", thresholds=NO_EXITS, breaker_failures=100)
    agent, out, _ = stream_agent(srv.url, tb, config, FAST_PING, log=messages.append)
    items = list(folder_source(tb.folder))[:60]
    summary = run_agent(agent, paced(items, {20: swap}))
    one_each(out.records, len(items))
    assert summary.to_dict()["offloading_stopped"] == "fingerprint"
    assert out.by_id()[items[-1].id].reason == "fingerprint"
    assert sum("offloading stopped" in m for m in messages) == 1


def test_sigterm_drains_the_stream_and_every_input_is_answered_once(
    device_bundle, process_server
) -> None:
    tb = device_bundle
    srv = process_server(tb.path, "--no-warmup", "--max-queue-delay-ms", "1")
    config = AgentConfig(policy="fixed", thresholds=NO_EXITS, breaker_failures=2)
    agent, out, _ = stream_agent(srv.url, tb, config, FAST_PING, retries=1)
    items = list(folder_source(tb.folder))[:60]
    run_agent(agent, paced(items, {20: lambda: srv.signal(signal.SIGTERM)}))
    code = srv.proc.wait(20)
    assert code in (0, -signal.SIGTERM)  # drained and exited by itself (uvicorn re-raises)
    one_each(out.records, len(items))
    assert all(out.by_id()[item.id].decided_by == "server" for item in items[:15])
    reasons = {r.reason for r in out.records if r.decided_by == "fallback"}
    assert reasons <= {"unreachable", "busy", "circuit_open", "timeout", "deadline"}


def test_ctrl_c_over_the_stream_answers_what_was_taken_and_exits_130(
    tmp_path: Path, device_bundle, fault_stream_server
) -> None:
    tb = device_bundle
    srv = fault_stream_server("stall", tb)
    args = [
        "--bundle", str(tb.path), "--server", srv.url, "--source", str(tb.folder),
        "--transport", "stream", "--timeout-ms", "20000", "--budget-ms", "20000",
        "--no-progress", "--policy", "fixed",  # offload, never the tail here
    ]  # fmt: skip
    code, err, records = interrupt_agent(args, tmp_path / "records.jsonl", lambda: srv.messages)
    assert code == 130, err
    assert "over the stream" in err and "summary" in err
    assert records and len({r["id"] for r in records}) == len(records)
    assert any(r["reason"] == "interrupted" for r in records)


def test_the_stream_counts_its_bytes_as_they_cross_tcp(device_bundle, tail_server) -> None:
    """Through the link emulator (a TCP proxy counting bytes): what the client counts per
    offload is what crossed TCP, pings and the handshake aside."""
    from splitexit.link import LinkEmulator

    tb = device_bundle
    config = AgentConfig(
        policy="fixed", channels=2, bits=4, thresholds=NO_EXITS, probe_interval_s=0
    )
    slow_ping = StreamConfig(ping_interval_s=60, ping_timeout_s=60)
    srv = tail_server(tb.path)
    with LinkEmulator(("127.0.0.1", srv.port)) as link:
        agent, out, client = stream_agent(link.url, tb, config, slow_ping, retries=0)

        async def go() -> tuple[int, int]:
            await agent.start()
            up0, down0 = link.up.bytes, link.down.bytes
            await agent.run(limit(folder_source(tb.folder), 20))
            await client.aclose()
            await asyncio.sleep(0.2)  # the proxy's threads count what they forwarded
            return link.up.bytes - up0, link.down.bytes - down0

        up, down = asyncio.run(go())
    sent = [r for r in out.records if r.decided_by == "server"]
    assert sent
    # and the closing handshake: the client's close frame (masked, 2-byte code), the echo
    assert up == sum(r.frame_bytes + r.overhead_bytes for r in sent) + 8
    assert down == sum(r.response_bytes for r in sent) + 4


def test_the_cli_refuses_a_bad_ping_and_a_stream_only_run_without_a_stream(
    capsys: pytest.CaptureFixture[str], device_bundle, fault_server
) -> None:
    from splitexit_device import cli

    tb = device_bundle
    base = ["run", "--bundle", str(tb.path), "--source", str(tb.folder), "--limit", "3"]
    with pytest.raises(SystemExit) as e:
        cli.main([*base, "--server", "http://127.0.0.1:9", "--ping-ms", "0"])
    assert e.value.code == 2 and "--ping-ms must be > 0" in capsys.readouterr().err
    srv = fault_server("ok", tb)
    code = cli.main([*base, "--server", srv.url, "--transport", "stream", "--no-progress"])
    assert code == 3 and "offers no stream" in capsys.readouterr().err


def test_offloads_that_meet_one_failure_each_get_their_own_error() -> None:
    from splitexit_device.connection import fresh
    from splitexit_device.errors import ServerBusy

    shared = ServerBusy("draining", status=503, retry_after_s=2.0)
    a, b = fresh(shared), fresh(shared)
    a.attempts, b.attempts = 1, 3
    assert (a.attempts, b.attempts, shared.attempts) == (1, 3, 0)
    assert isinstance(a, ServerBusy) and a.retry_after_s == 2.0 and str(a) == "draining"
