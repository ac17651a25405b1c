"""The dynamic batcher: concurrent jobs share a batch, each gets its own result, the queue is
bounded, expired and failing jobs fail alone, and the event loop never runs the model."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from splitexit_server.batcher import (
    FUTILE_WAITS,
    PROBE_EVERY,
    DynamicBatcher,
    Expired,
    QueueFull,
    Stopped,
)


class Recorder:
    """A `process` that doubles each payload and records batches and the threads used."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, jobs):
        self.threads.add(threading.current_thread().name)
        self.batches.append([j.payload for j in jobs])
        time.sleep(self.delay)
        return [ValueError(f"bad {j.payload}") if j.payload < 0 else 2 * j.payload for j in jobs]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_concurrent_jobs_are_batched_and_answered_in_their_own_order():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=8, max_queue_delay_s=0.05)
        await b.start()
        jobs = [b.submit(i) for i in range(20)]
        results = await asyncio.gather(*(j.future for j in jobs))
        await b.stop()
        return rec, results

    rec, results = run(main())
    assert results == [2 * i for i in range(20)]
    assert [len(x) for x in rec.batches] == [8, 8, 4]
    assert all(not name.startswith("MainThread") for name in rec.threads)


def test_a_lone_job_waits_at_most_the_queue_delay():
    async def main():
        b = DynamicBatcher(Recorder(), max_batch_size=64, max_queue_delay_s=0.05)
        await b.start()
        start = time.perf_counter()
        result = await b.submit(21).future
        elapsed = time.perf_counter() - start
        await b.stop()
        return result, elapsed

    result, elapsed = run(main())
    assert result == 42
    assert 0.04 <= elapsed < 1.0


def test_waits_that_gather_nobody_stop_until_a_probe_finds_company():
    delay = 0.05

    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=8, max_queue_delay_s=delay)
        await b.start()

        async def lone() -> float:  # one client: the next job once the last is answered
            start = time.perf_counter()
            await b.submit(1).future
            return time.perf_counter() - start

        waited = [await lone() for _ in range(FUTILE_WAITS)]
        unwaited = [await lone() for _ in range(PROBE_EVERY - 1)]
        # the probe: it waits, and a second client's job joins it
        first = b.submit(2)
        await asyncio.sleep(delay / 5)
        second = b.submit(3)
        await asyncio.gather(first.future, second.future)
        again = await lone()
        await b.stop()
        return rec.batches, waited, unwaited, again

    batches, waited, unwaited, again = run(main())
    assert min(waited) >= 0.8 * delay  # each waited for company that never came
    assert max(unwaited) < delay / 2  # then none waits
    assert [2, 3] in batches  # the probe waited, and the second job shared its batch
    assert again >= 0.8 * delay  # company came once: batches wait again


def test_batch_size_counts_samples_and_a_big_job_runs_alone():
    async def main():
        rec = Recorder()
        b = DynamicBatcher(rec, max_batch_size=4, max_queue_delay_s=0.05)
        await b.start()
        jobs = [b.submit(1, size=3), b.submit(2, size=3), b.submit(3, size=9), b.submit(4)]
        await asyncio.gather(*(j.future for j in jobs))
        await b.stop()
        return rec.batches

    assert run(main()) == [[1], [2], [3], [4]]


def test_a_failing_job_fails_alone():
    async def main():
        b = DynamicBatcher(Recorder(), max_batch_size=8, max_queue_delay_s=0.02)
        await b.start()
        jobs = [b.submit(i) for i in (1, -1, 3)]
        out = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        await b.stop()
        return out

    ok1, bad, ok3 = run(main())
    assert (ok1, ok3) == (2, 6)
    assert isinstance(bad, ValueError)


def test_a_job_that_crashes_process_fails_alone_and_its_batch_mates_are_answered():
    def process(jobs):
        if any(j.payload == "poison" for j in jobs):
            raise NotImplementedError("a decoder that raises what nobody expected")
        return [2 * j.payload for j in jobs]

    async def main():
        b = DynamicBatcher(process, max_batch_size=8, max_queue_delay_s=0.05)
        await b.start()
        jobs = [b.submit(p) for p in (1, 2, "poison", 3)]
        results = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        await b.stop()
        return results

    one, two, poison, three = run(main())
    assert (one, two, three) == (2, 4, 6)
    assert isinstance(poison, NotImplementedError)


def test_a_crashing_process_fails_its_batch_only():
    calls = []

    def process(jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [j.payload for j in jobs]

    async def main():
        b = DynamicBatcher(process, max_batch_size=2, max_queue_delay_s=0.0)
        await b.start()
        first = await asyncio.gather(b.submit(1).future, return_exceptions=True)
        second = await b.submit(2).future
        await b.stop()
        return first, second

    first, second = run(main())
    assert isinstance(first[0], RuntimeError) and second == 2


def test_the_queue_is_bounded():
    async def main():
        b = DynamicBatcher(Recorder(delay=0.2), max_batch_size=1, max_queue_size=2)
        await b.start()
        first = b.submit(0)
        await asyncio.sleep(0.05)  # the worker is busy with job 0
        queued = [b.submit(1), b.submit(2)]
        with pytest.raises(QueueFull, match="max_queue_size=2"):
            b.submit(3)
        await asyncio.gather(first.future, *(j.future for j in queued))
        await b.stop()

    run(main())


def test_jobs_past_their_deadline_are_not_run():
    async def main():
        rec = Recorder(delay=0.2)
        b = DynamicBatcher(rec, max_batch_size=1, max_queue_delay_s=0.0)
        await b.start()
        busy = b.submit(1)
        await asyncio.sleep(0.02)
        late = b.submit(2, deadline=time.monotonic() + 0.05)
        with pytest.raises(Expired):
            await late.future
        await busy.future
        await b.stop()
        return rec.batches

    assert run(main()) == [[1]]


def test_cancelled_jobs_are_skipped():
    async def main():
        rec = Recorder(delay=0.1)
        b = DynamicBatcher(rec, max_batch_size=1, max_queue_delay_s=0.0)
        await b.start()
        busy = b.submit(1)
        await asyncio.sleep(0.02)
        gone = b.submit(2)
        gone.future.cancel()  # what asyncio.wait_for does when the caller's deadline passes
        await busy.future
        assert await b.submit(3).future == 6
        await b.stop()
        return rec.batches

    assert run(main()) == [[1], [3]]


def test_stop_fails_queued_jobs_and_refuses_new_ones():
    async def main():
        b = DynamicBatcher(Recorder(delay=0.1), max_batch_size=1, max_queue_delay_s=0.0)
        await b.start()
        running = b.submit(1)
        await asyncio.sleep(0.02)
        queued = b.submit(2)
        await b.stop()
        assert running.future.result() == 2  # in flight: finished
        with pytest.raises(Stopped):
            queued.future.result()
        with pytest.raises(Stopped):
            b.submit(3)

    run(main())


def test_the_event_loop_stays_responsive_while_a_batch_runs():
    async def main():
        b = DynamicBatcher(Recorder(delay=0.3), max_batch_size=1, max_queue_delay_s=0.0)
        await b.start()
        job = b.submit(1)
        ticks = 0
        start = time.perf_counter()
        while not job.future.done():
            await asyncio.sleep(0.01)
            ticks += 1
        await b.stop()
        return ticks, time.perf_counter() - start

    ticks, elapsed = run(main())
    assert elapsed >= 0.25 and ticks >= 10


def test_a_worker_takes_its_next_batch_without_waiting_for_the_event_loop():
    """Under overload the event loop is busy refusing requests: the model must not idle
    until the loop comes round to hand it the next batch."""
    rec = Recorder(delay=0.02)

    async def main():
        b = DynamicBatcher(rec, max_batch_size=1, max_queue_delay_s=0.0)
        await b.start()
        jobs = [b.submit(i) for i in range(4)]
        time.sleep(0.5)  # the event loop is stuck; the worker is not
        ran_while_blocked = len(rec.batches)
        results = await asyncio.gather(*(j.future for j in jobs))
        await b.stop()
        return ran_while_blocked, results

    ran_while_blocked, results = run(main())
    assert ran_while_blocked == 4
    assert results == [0, 2, 4, 6]
