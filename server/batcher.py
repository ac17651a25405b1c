"""Dynamic batching, Triton-style: requests that arrive together run as one model call.

    submit ─► bounded FIFO queue ─ a worker frees up ─ wait until the batch holds
              (429 when full)      max_batch_size samples or the oldest request has waited
                                   max_queue_delay ─ drop requests already cancelled or past
                                   their deadline ─ run the batch in the worker thread pool
                                   ─ hand each request its own result

The event loop only queues and hands out results; the `process` function (decode + model)
runs in a thread pool, `workers` batches at a time, so HTTP handling never waits behind
inference. `process` receives the payloads of a batch in order and returns one result or one
exception per payload: a bad request fails alone, never its batch-mates. Should `process`
raise for a whole batch, each of its requests is run again alone, so that only the one that
made it raise fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
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
        max_queue_delay_s: longest the oldest job waits for the batch to fill.
        max_queue_size: most jobs waiting; `submit` raises QueueFull beyond it.
        workers: batches run at once (threads).
        executor: run batches here instead of an own thread pool.
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
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.running_jobs = 0

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
        """Start the batching loop on the running event loop."""
        if self._loop_task is None:
            self._wakeup = asyncio.Event()
            self._slots = asyncio.Semaphore(self.workers)
            self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    def submit(self, payload: Any, *, size: int = 1, deadline: float | None = None) -> Job:
        """Queue a payload; await `job.future` for its result. Raises QueueFull, Stopped."""
        if self._loop_task is None or self._wakeup is None:
            raise Stopped(f"the batcher of {self.name!r} is not running")
        if len(self._queue) >= self.max_queue_size:
            self._sweep()
            if len(self._queue) >= self.max_queue_size:
                raise QueueFull(
                    f"model {self.name!r} has {len(self._queue)} requests queued "
                    f"(max_queue_size={self.max_queue_size}); retry later"
                )
        loop = asyncio.get_running_loop()
        deadline = deadline if deadline is not None else time.monotonic() + 3600
        job = Job(payload, max(1, int(size)), deadline, loop.create_future())
        self._queue.append(job)
        self._wakeup.set()
        return job

    async def stop(self) -> None:
        """Stop batching: running batches finish, queued jobs fail with Stopped."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(Stopped("the server is shutting down"))
        if self._own_executor:
            self._executor.shutdown(wait=True)

    # ----------------------------------------------------------------------- internals

    def _sweep(self) -> None:
        """Drop jobs whose caller gave up; fail the ones past their deadline."""
        now = time.monotonic()
        keep: collections.deque[Job] = collections.deque()
        for job in self._queue:
            if job.future.done():
                continue
            if job.deadline <= now:
                job.future.set_exception(Expired("deadline passed while queued"))
                continue
            keep.append(job)
        self._queue = keep

    async def _wait_for_arrival(self, timeout: float | None) -> bool:
        assert self._wakeup is not None
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def _collect(self) -> list[Job]:
        while True:
            self._sweep()
            if self._queue:
                break
            await self._wait_for_arrival(None)
        close_at = self._queue[0].enqueued + self.max_queue_delay_s
        while sum(j.size for j in self._queue) < self.max_batch_size:
            remaining = close_at - time.perf_counter()
            if remaining <= 0 or not await self._wait_for_arrival(remaining):
                break
        self._sweep()
        batch: list[Job] = []
        total = 0
        while self._queue and (not batch or total + self._queue[0].size <= self.max_batch_size):
            job = self._queue.popleft()
            batch.append(job)
            total += job.size
        return batch

    async def _loop(self) -> None:
        assert self._slots is not None
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            if not batch:  # everything collected expired meanwhile
                self._slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

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

    async def _execute(self, batch: list[Job]) -> None:
        assert self._slots is not None
        self.running_jobs += len(batch)
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, self._isolated, batch)
            for job, result in zip(batch, results, strict=True):
                if job.future.done():  # the caller gave up (deadline, disconnect)
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        finally:
            self.running_jobs -= len(batch)
            self._slots.release()
