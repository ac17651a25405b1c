"""Under an emulated slow link the adaptive policy sends less or answers locally, and goes back
to the most accurate operating point when the link recovers: the estimator sees both."""

from __future__ import annotations

import time
from collections.abc import Iterator

from support import ListWriter, run_agent

from splitexit.link import LinkEmulator
from splitexit_device.agent import Agent, AgentConfig
from splitexit_device.client import ClientConfig, OffloadClient
from splitexit_device.sources import Input, Source, folder_source

NO_EXITS = {"layer1": 2.0, "bottleneck": 2.0}  # every input goes to the policy
# relearning after the slow phase takes the estimator a few seconds
PHASES = [("unlimited:0ms", 40), ("32kbit:20ms", 80), ("unlimited:0ms", 160)]


def test_slow_link_moves_the_policy_local_and_back_when_it_recovers(
    device_bundle, tail_server
) -> None:
    tb = device_bundle
    items = list(folder_source(tb.folder))
    srv = tail_server(tb.path)
    with LinkEmulator(("127.0.0.1", srv.port)) as link:
        config = AgentConfig(
            deadline_s=0.3, window=2, probe_interval_s=0.2, thresholds=NO_EXITS, images=False
        )
        client = OffloadClient(link.url, tb.name, ClientConfig())
        out = ListWriter()
        agent = Agent(tb.load(), config, client, writer=out)

        def source() -> Iterator[Input]:
            i = 0
            for spec, n in PHASES:
                link.set(spec)
                for _ in range(n):
                    time.sleep(0.02)  # a camera at ~30 frames per second, roughly
                    item = items[i % len(items)]
                    yield Input(f"{i:03d}", path=item.path)
                    i += 1

        run_agent(agent, Source(source))
    records = [out.by_id()[f"{i:03d}"] for i in range(sum(n for _, n in PHASES))]
    assert len(out.records) == len(records)  # one each

    # (the last inputs of a phase may still be on the wire when the link changes)
    fast, slow, recovered = records[20:38], records[80:120], records[-20:]
    widest = [r for r in fast if (r.decided_by, r.channels, r.bits) == ("server", 8, 8)]
    assert len(widest) >= 0.7 * len(fast), [(r.decided_by, r.channels, r.bits) for r in fast]
    local = [r for r in slow if r.decided_by != "server"]
    assert len(local) >= 0.7 * len(slow)
    assert all(r.reason == "deadline" for r in local), [(r.decided_by, r.reason) for r in local]
    assert sum(r.frame_bytes for r in slow) < sum(r.frame_bytes for r in fast)
    back = [r for r in recovered if (r.decided_by, r.channels, r.bits) == ("server", 8, 8)]
    assert len(back) >= 0.7 * len(recovered), [
        (r.decided_by, r.channels, r.bits, r.reason) for r in records[120:]
    ]

    # (the estimator's own numbers are pinned down in tests/test_device_estimator.py)
