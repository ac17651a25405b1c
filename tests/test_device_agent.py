"""End to end against the real tail server: every input answered once, as head + tail in one
process would answer it, with exits taken exactly where the thresholds say."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from fixtures.device import DeviceBundle, TailServer
from support import ListWriter, expected_decisions, run_agent

from splitexit.link import LinkEmulator
from splitexit_device.agent import _TIME_SERVER_S as TIME_SERVER_S
from splitexit_device.agent import Agent, AgentConfig
from splitexit_device.client import ClientConfig, OffloadClient
from splitexit_device.records import RecordWriter
from splitexit_device.sources import Input, Source, folder_source, limit, paths_source

NO_EXITS = {"layer1": 2.0, "bottleneck": 2.0}


@pytest.fixture(scope="module")
def server(device_bundle, module_tail_server) -> Iterator[TailServer]:
    srv = module_tail_server(device_bundle.path)
    yield srv


def agent_for(
    tb: DeviceBundle, url: str | None, config: AgentConfig, **client: object
) -> tuple[Agent, ListWriter]:
    writer = ListWriter()
    c = None if url is None else OffloadClient(url, tb.name, ClientConfig(**client))  # type: ignore[arg-type]
    return Agent(tb.load(), config, c, writer=writer), writer  # type: ignore[arg-type]


def test_every_input_gets_the_answer_head_and_tail_give_in_one_process(
    server: TailServer, device_bundle
) -> None:
    tb = device_bundle
    agent, out = agent_for(device_bundle, server.url, AgentConfig(policy="fixed"))
    summary = run_agent(agent, folder_source(tb.folder))

    got = out.by_id()
    assert len(out.records) == len(got) == len(tb.images)  # one each, none twice
    want = {i: (d, c) for i, d, c in expected_decisions(tb, 8, 8)}
    assert {i: (r.decided_by, r.prediction) for i, r in got.items()} == want
    decided = {r.decided_by for r in out.records}
    assert decided == {"layer1", "bottleneck", "server"}  # the thresholds split the data

    # the exits follow the thresholds exactly: the first exit whose confidence reaches it
    x = tb.bundle.preprocess(tb.images)
    conf = tb.head.run(x, thresholds=NO_EXITS).exit_confidence
    thresholds = tb.bundle.manifest.thresholds
    for i, c in enumerate(conf):
        first = next((e for e in ("layer1", "bottleneck") if c[e] >= thresholds[e]), "server")
        assert got[tb.image_id(i)].decided_by == first

    server_records = [r for r in out.records if r.decided_by == "server"]
    assert all((r.channels, r.bits, r.attempts) == (8, 8, 1) for r in server_records)
    assert all(r.frame_bytes > 0 and r.overhead_bytes > 0 for r in server_records)
    assert all(r.timings_ms["network"] is not None for r in server_records)
    labels = np.array([r.label for r in out.records])
    classes = np.array([r.prediction for r in out.records])
    d = summary.to_dict()
    assert d["accuracy"] == pytest.approx(float(np.mean(labels == classes)), abs=1e-4)
    assert d["labeled"] == len(tb.images)
    assert d["offloaded"] == len(server_records)
    assert sum(d["exits"].values()) + d["offloaded"] == len(tb.images)
    assert d["fallbacks"] == 0


@pytest.mark.parametrize(("k", "bits"), [(2, 4), (4, 2)])
def test_a_fixed_operating_point_is_what_the_server_decodes(
    server: TailServer, k: int, bits: int, device_bundle
) -> None:
    tb = device_bundle
    config = AgentConfig(policy="fixed", channels=k, bits=bits, thresholds=NO_EXITS)
    agent, out = agent_for(device_bundle, server.url, config)
    run_agent(agent, limit(folder_source(tb.folder), 30))
    index = {tb.image_id(i): i for i in range(len(tb.images))}
    x = tb.bundle.preprocess(tb.images)
    for r in out.records:
        z = tb.head.run(x[index[r.id]][None], thresholds=NO_EXITS).z
        want = tb.tail.run_frames([tb.head.frame(z, bits, k)])[0]
        assert (r.decided_by, r.prediction) == ("server", int(want.prediction[0]))
        assert r.confidence == pytest.approx(float(want.probability[0]), abs=1e-5)
    assert len(out.records) == 30
    assert {(r.channels, r.bits) for r in out.records} == {(k, bits)}


@pytest.mark.parametrize("policy", ["adaptive", "fixed"])
def test_the_adaptive_agent_times_the_server_once_before_its_first_input(
    server: TailServer, device_bundle, policy: str
) -> None:
    # every input answers at the first exit: whatever the agent knows of the server's times
    # it learned before the first input (unmeasured, they read 0 s and the first input took
    # whichever action that flattered, the image at any cost). The fixed policy prices
    # nothing: it sends nothing extra.
    always = {"layer1": 0.0, "bottleneck": 0.0}
    config = AgentConfig(policy=policy, thresholds=always, probe_interval_s=0)  # type: ignore[arg-type]
    agent, out = agent_for(device_bundle, server.url, config)
    run_agent(agent, limit(folder_source(device_bundle.folder), 3))
    assert [r.action for r in out.records] == ["exit"] * 3  # the warm-up's requests: no input
    m = agent.measure
    assert m.server_s.seen == (policy == "adaptive")
    assert m.server_image_s.seen == (policy == "adaptive" and agent.images)
    if policy == "adaptive":
        assert agent.images  # the test server takes images: both paths were timed
        assert m.server_s.value > 0 and m.server_image_s.value > 0


def test_local_only_needs_no_server_and_answers_at_the_best_exit(device_bundle) -> None:
    tb = device_bundle
    agent, out = agent_for(device_bundle, None, AgentConfig(local_only=True))
    summary = run_agent(agent, limit(folder_source(tb.folder), 60))
    assert len(out.by_id()) == 60
    fallbacks = [r for r in out.records if r.decided_by == "fallback"]
    assert fallbacks and all(r.reason == "local_only" and r.exit for r in fallbacks)
    assert all(r.frame_bytes == r.overhead_bytes == 0 for r in out.records)
    assert summary.to_dict()["bytes_sent"]["total"] == 0


def test_bytes_on_the_wire_are_what_the_link_carried(server: TailServer, device_bundle) -> None:
    tb = device_bundle
    with LinkEmulator(("127.0.0.1", server.port)) as link:
        agent, out = agent_for(
            device_bundle, link.url, AgentConfig(policy="fixed", probe_interval_s=0)
        )
        client = agent.client
        run_agent(agent, limit(folder_source(tb.folder), 60))
        time.sleep(0.2)  # let the proxy finish counting
        assert client is not None
        assert client.sent_bytes == link.up.bytes
        assert client.received_bytes == link.down.bytes
    infer_up = sum(r.frame_bytes + r.overhead_bytes for r in out.records)
    infer_down = sum(r.response_bytes for r in out.records)
    offloaded = [r for r in out.records if r.decided_by == "server"]
    assert offloaded
    # everything else on the wire: the metadata request and the start-up probes
    assert 0 < client.sent_bytes - infer_up < 1000
    assert 0 < client.received_bytes - infer_down < 3000


def test_records_are_json_lines_with_the_documented_fields(
    server: TailServer, device_bundle
) -> None:
    tb = device_bundle
    stream = io.StringIO()
    agent = Agent(
        tb.load(),
        AgentConfig(policy="fixed"),
        OffloadClient(server.url, tb.name),
        writer=RecordWriter(stream),
    )
    run_agent(agent, limit(folder_source(tb.folder), 20))
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 20
    keys = [
        "id",
        "class",
        "class_name",
        "confidence",
        "decided_by",
        "action",
        "exit",
        "reason",
        "channels",
        "bits",
        "frame_bytes",
        "overhead_bytes",
        "response_bytes",
        "attempts",
        "label",
        "expected_ms",
        "timings_ms",
        "source",
        "error",
    ]
    for rec in lines:
        assert list(rec) == keys
        t = rec["timings_ms"]
        assert list(t) == ["head", "encode", "network", "server", "tail", "total"]
        if rec["decided_by"] == "server":  # our server reports its compute within its time
            assert 0 < t["tail"] <= t["server"] < t["total"]
        assert rec["class_name"] == tb.bundle.manifest.class_names[rec["class"]]
        assert 0 <= rec["confidence"] <= 1
        assert rec["timings_ms"]["total"] >= rec["timings_ms"]["head"] > 0
        assert rec["action"] in ("exit", "offload", "local")
        assert rec["expected_ms"] is None or rec["expected_ms"] > 0


def test_an_unreadable_input_gets_an_error_record_and_the_run_goes_on(
    server: TailServer, tmp_path: object, device_bundle
) -> None:
    tb = device_bundle
    bad = tmp_path / "broken.png"  # type: ignore[operator]
    bad.write_bytes(b"not a png")
    good = sorted(tb.folder.rglob("*.png"))[:3]
    lines = [str(good[0]), str(bad), str(good[1]), "", str(good[0])]
    agent, out = agent_for(device_bundle, server.url, AgentConfig())
    run_agent(agent, paths_source(lines))
    ids = [r.id for r in out.records]
    assert sorted(ids) == sorted([str(good[0]), str(bad), str(good[1]), f"{good[0]}#1"])
    err = out.by_id()[str(bad)]
    assert err.decided_by == "error" and err.prediction is None
    assert "cannot read image" in err.error


def test_stop_answers_frames_in_flight_locally_and_still_summarises(
    device_bundle, fault_server
) -> None:
    """Ctrl-C: the agent takes no new input; frames waiting on a stalled server get the
    best exit's answer, marked interrupted; nothing is lost or answered twice."""
    tb = device_bundle
    srv = fault_server("stall", tb)
    config = AgentConfig(thresholds=NO_EXITS, window=4, probe_interval_s=0)
    agent, out = agent_for(device_bundle, srv.url, config, timeout_s=10.0, budget_s=10.0)
    # like a signal handler, from elsewhere; after the server's timing gave up on the stall
    timer = threading.Timer(1.0 + TIME_SERVER_S, agent.stop)
    timer.start()
    start = time.monotonic()
    summary = run_agent(agent, folder_source(tb.folder))
    assert time.monotonic() - start < 3.0 + TIME_SERVER_S
    timer.join()
    taken = summary.inputs
    assert 5 <= taken < len(tb.images)  # 4 in flight, 1 waiting for a slot
    assert len(out.records) == len(out.by_id()) == taken
    assert {r.reason for r in out.records} == {"interrupted"}
    assert all(r.decided_by == "fallback" and r.prediction is not None for r in out.records)
    assert summary.to_dict()["fallback_reasons"] == {"interrupted": taken}


def test_cancelling_the_run_still_records_every_input_taken(
    server: TailServer, device_bundle
) -> None:
    tb = device_bundle
    agent, out = agent_for(device_bundle, server.url, AgentConfig(policy="fixed"))

    async def go() -> None:
        await agent.start()
        task = asyncio.create_task(agent.run(folder_source(tb.folder)))
        while len(out.records) < 20 and not task.done():  # mid-run, however fast the machine
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await agent.client.aclose()  # type: ignore[union-attr]

    asyncio.run(go())
    assert 0 < len(out.records) < len(tb.images)
    assert len(out.by_id()) == len(out.records)
    assert agent.summary.inputs == len(out.records)


def test_a_source_that_waits_does_not_hold_up_answers_and_a_folder_is_read_on_the_loop(
    server: TailServer, device_bundle
) -> None:
    """A blocking source (a camera) is read off the event loop: while it waits for its next
    input, the input already offloaded is answered; a folder is read on the loop itself."""
    tb = device_bundle
    first = next(iter(folder_source(tb.folder)))
    agent, out = agent_for(device_bundle, server.url, AgentConfig(thresholds=NO_EXITS))
    answered_while_waiting: list[int] = []

    def camera() -> Iterator[Input]:
        yield first
        time.sleep(0.5)  # the next frame is not there yet
        answered_while_waiting.append(len(out.records))

    run_agent(agent, Source(camera))
    assert answered_while_waiting == [1]
    assert [r.decided_by for r in out.records] == ["server"]

    threads: list[threading.Thread] = []

    def folder() -> Iterator[Input]:
        for item in folder_source(tb.folder):
            threads.append(threading.current_thread())
            yield item

    agent, out = agent_for(device_bundle, server.url, AgentConfig())
    run_agent(agent, Source(folder, blocking=False))
    assert len(out.by_id()) == len(tb.images)
    assert set(threads) == {threading.main_thread()}  # asyncio.run's loop thread


def test_the_head_runs_on_the_event_loop_while_nothing_is_on_the_wire_else_in_its_thread(
    server: TailServer, device_bundle
) -> None:
    """A head too slow to run inline (over `_INLINE_MAX_S`) still runs on the event loop
    while no request or probe is out (no answer can be read late, and the thread hop only
    costs), and in the worker thread while the previous input's request is out."""
    tb = device_bundle
    agent, out = agent_for(device_bundle, server.url, AgentConfig(thresholds=NO_EXITS))
    items = list(limit(folder_source(tb.folder), 8))
    run, segment = agent.head.run, agent.head.backend.segment
    heads: list[tuple[bool, bool]] = []  # (on the event loop's thread, something on the wire)

    def watched(*args: object, **kwargs: object) -> object:
        heads.append((threading.current_thread() is threading.main_thread(), not agent._idle()))
        return run(*args, **kwargs)

    def slow(i: int, x: object) -> object:  # a device where the head takes over 3 ms
        time.sleep(0.005)
        return segment(i, x)

    agent.head.run = watched  # type: ignore[method-assign]
    agent.head.backend.segment = slow  # type: ignore[method-assign]
    agent.warm_up(items[0])
    heads.clear()
    run_agent(agent, items)
    assert [r.decided_by for r in out.records] == ["server"] * len(items)
    assert heads[0] == (True, False), heads  # the first input: nothing out yet
    assert not [h for h in heads if h == (True, True)], heads  # never blocks an answer
    assert (False, True) in heads, heads  # the next head overlaps a request in flight
