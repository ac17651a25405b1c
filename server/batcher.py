"""Dynamic batching, Triton-style: requests that arrive together run as one model call.

    submit ─► bounded FIFO queue ─ a worker thread is free ─ it waits until the batch holds
              (429 when full)      max_batch_size samples or the oldest request has waited
                                   max_queue_delay ─ drops requests already cancelled or past
                                   their deadline ─ runs the batch ─ hands each request its
                                   result on the event loop ─ takes the next batch

A wait that no other request joins only delays its answer: with one client (a device that
sends its next frame once the last is answered) every wait is such a wait. After
`FUTILE_WAITS` of them in a row a batch closes as soon as a worker takes it, and every
`PROBE_EVERY`-th batch waits again, to see whether company has come; one wait that gathers
another request makes every batch wait again. Requests that queue while a batch runs still
share the next batch.

The event loop only queues and hands out results; the `process` function (decode + model)
runs in `workers` threads, one batch each, so HTTP handling never waits behind inference.
A worker takes its next batch itself, as soon as it is done with one: it never waits for the
event loop, which under overload is busy refusing requests (`splitexit_server.admission`).
`process` receives the payloads of a batch in order and returns one result or one exception
per payload: a bad request fails alone, never its batch-mates. Should `process` raise for a
whole batch, each of its requests is run again alone, so that only the one that made it
raise fails.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol


class QueueFull(Exception):
    """The queue holds `max_queue_size` requests already: answer 429 and retry later."""


class Expired(Exception):
    """The request's deadline passed before its batch started."""


class Stopped(Exception):
    """The batcher was stopped before the request ran."""


@dataclass
class Job:
    """One queued request: its payload, its size in samples, when it came and must finish."""

    payload: Any
    size: int
    deadline: float  # time.monotonic() seconds
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.perf_counter)


Process = Callable[[Sequence[Job]], Sequence[Any]]

FUTILE_WAITS = 8
"""Waits in a row that no other request joined, after which batches stop waiting."""
PROBE_EVERY = 16
"""While batches do not wait, every this-many-th one waits anyway (a probe for company)."""


class Batcher(Protocol):
    """What the server needs of a batcher: DynamicBatcher's `start`, `submit`, `stop`,
    `pending` and `queued` (Ray Serve's batching in `splitexit_server.ray_serve` has them too)."""

    @property
    def pending(self) -> int: ...

    @property
    def queued(self) -> int: ...

    async def start(self) -> None: ...

    def submit(self, payload: Any, *, size: int = 1, deadline: float | None = None) -> Job: ...

    async def stop(self) -> None: ...


BatcherFactory = Callable[..., Batcher]
"""Makes a batcher from `(process, *, max_batch_size, max_queue_delay_s, max_queue_size,
workers, name)`."""


class DynamicBatcher:
    """Collects concurrent jobs into batches and runs `process` on them off the event loop.

    Args:
        process: called in a worker thread with the batch's jobs; returns, per job, its
            result or an Exception instance to raise in that job's caller.
        max_batch_size: most samples (sum of job sizes) in one batch; a larger job runs alone.
        max_queue_delay_s: longest the oldest job waits for the batch to fill (no wait once
            waits keep gathering nobody: see the module's doc).
        max_queue_size: most jobs waiting; `submit` raises QueueFull beyond it.
        workers: batches run at once (threads).
        executor: run the workers here instead of in an own thread pool (each holds one of
            its threads while the batcher runs).
    """

    def __init__(
        self,
        process: Process,
        *,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.002,
        max_queue_size: int = 256,
        workers: int = 1,
        executor: Executor | None = None,
        name: str = "model",
    ) -> None:
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.workers = workers
        self.name = name
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(workers, thread_name_prefix=f"tail-{name}")
        self._queue: collections.deque[Job] = collections.deque()
        self._samples = 0  # sum of the queued jobs' sizes
        self._cond = threading.Condition()  # guards the queue, _samples and running_jobs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[asyncio.Future[None]] = []
        self._stopping = False
        self.running_jobs = 0
        self._futile = 0  # waits in a row that gathered no other request
        self._unwaited = 0  # batches closed without waiting since the last probe

    # ------------------------------------------------------------------------- public

    @property
    def queued(self) -> int:
        """Jobs waiting for a batch (cancelled ones included until they are swept)."""
        return len(self._queue)

    @property
    def pending(self) -> int:
        """Jobs waiting or running."""
        return len(self._queue) + self.running_jobs

    async def start(self) -> None:
        """Start the worker threads; results are handed out on the running event loop."""
        if self._loop is None:
            self._loop = loop = asyncio.get_running_loop()
            self._stopping = False
            self._workers = [
                asyncio.wrap_future(self._executor.submit(self._work), loop=loop)
                for _ in range(self.workers)
            ]

    def submit(self, payload: Any, *, size: int = 1, deadline: float | None = None) -> Job:
        """Queue a payload; await `job.future` for its result. Raises QueueFull, Stopped."""
        if self._loop is None or self._stopping:
            raise Stopped(f"the batcher of {self.name!r} is not running")
        if len(self._queue) >= self.max_queue_size:
            self._sweep()
            if len(self._queue) >= self.max_queue_size:
                raise QueueFull(
                    f"model {self.name!r} has {len(self._queue)} requests queued "
                    f"(max_queue_size={self.max_queue_size}); retry later"
                )
        deadline = deadline if deadline is not None else time.monotonic() + 3600
        job = Job(payload, max(1, int(size)), deadline, self._loop.create_future())
        with self._cond:
            self._queue.append(job)
            self._samples += job.size
            self._cond.notify()
        return job

    async def stop(self) -> None:
        """Stop batching: running batches finish, queued jobs fail with Stopped."""
        if self._loop is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._workers:  # their last results are handed out before they count as done
            await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._loop = None
        with self._cond:
            jobs, self._queue, self._samples = list(self._queue), collections.deque(), 0
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(Stopped("the server is shutting down"))
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # ---------------------------------------------------------- event-loop internals

    def _sweep(self) -> None:
        """Drop jobs whose caller gave up; fail the ones past their deadline."""
        with self._cond:
            expired = self._drop_stale()
        self._expire(expired)

    def _expire(self, jobs: list[Job]) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(Expired("deadline passed while queued"))

    def _deliver(self, batch: list[Job], results: Sequence[Any]) -> None:
        with self._cond:
            self.running_jobs -= len(batch)
        for job, result in zip(batch, results, strict=True):
            if job.future.done():  # the caller gave up (deadline, disconnect)
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    # -------------------------------------------------------------- worker internals

    def _drop_stale(self) -> list[Job]:
        """With the lock held: drop the jobs whose caller gave up and those past their
        deadline; returns the latter (to fail on the event loop)."""
        now = time.monotonic()
        keep: collections.deque[Job] = collections.deque()
        expired: list[Job] = []
        for job in self._queue:
            if job.future.done():
                continue
            (expired if job.deadline <= now else keep).append(job)
        self._queue = keep
        self._samples = sum(j.size for j in keep)
        return expired

    def _take(self) -> list[Job] | None:
        """The next batch, once there is one (None once stopping). Runs in a worker."""
        assert self._loop is not None
        loop = self._loop
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if self._samples < self.max_batch_size and self._wait_pays():
                queued = len(self._queue)
                close_at = self._queue[0].enqueued + self.max_queue_delay_s
                waits = close_at > time.perf_counter()  # not when it waited for a worker
                while self._samples < self.max_batch_size and not self._stopping:
                    remaining = close_at - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if waits:
                    self._futile = 0 if len(self._queue) > queued else self._futile + 1
            if self._stopping:
                return None
            expired = self._drop_stale()
            batch: list[Job] = []
            total = 0
            while self._queue and (not batch or total + self._queue[0].size <= self.max_batch_size):
                job = self._queue.popleft()
                batch.append(job)
                total += job.size
            self._samples -= total
            self.running_jobs += len(batch)
        if expired:
            loop.call_soon_threadsafe(self._expire, expired)
        return batch

    def _wait_pays(self) -> bool:
        """With the lock held: whether this batch waits for company (see the module's doc)."""
        if self._futile < FUTILE_WAITS:
            return True
        self._unwaited += 1
        if self._unwaited < PROBE_EVERY:
            return False
        self._unwaited = 0
        return True

    def _work(self) -> None:
        """A worker: take a batch, run it, hand out its results; until stopped."""
        assert self._loop is not None
        loop = self._loop
        while (batch := self._take()) is not None:
            if not batch:  # everything taken had expired or was cancelled
                continue
            results = self._isolated(batch)
            loop.call_soon_threadsafe(self._deliver, batch, results)

    def _isolated(self, batch: list[Job]) -> list[Any]:
        """`process(batch)`; should it raise, each job runs alone, so that only the job that
        made it raise fails (with that exception). Runs in a worker thread."""
        try:
            return self._checked(batch)
        except Exception as e:
            if len(batch) == 1:
                return [e]
        out: list[Any] = []
        for job in batch:
            try:
                out.extend(self._checked([job]))
            except Exception as e:
                out.append(e)
        return out

    def _checked(self, batch: list[Job]) -> list[Any]:
        results = list(self.process(batch))
        if len(results) != len(batch):
            raise RuntimeError(f"process returned {len(results)} results for {len(batch)}")
        return results
