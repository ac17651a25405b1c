"""Ray Serve entry point (optional extra: `pip install "ray[serve]"`): the same FastAPI app on
each replica, with Ray's batching (`serve.batch`) in place of the built-in batcher and Ray's
replica autoscaling in place of the Kubernetes HPA.

    serve run splitexit_server.ray_serve:app bundles=/models/a,/models/b max_batch_size=32

    HTTP ─ Ray Serve proxy ─ replica: create_app(...) ─ protocol, checks, metrics as usual
                                      └ RayBatcher ─ @serve.batch ─ ServedModel.process

Settings come from the arguments (names as in `Settings`), then `SPLITEXIT_SERVER_*`
variables. Ray decides host and port (`serve start --http-host ...`), not the settings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from splitexit_server.batcher import Job, QueueFull
from splitexit_server.settings import Settings

DEFAULT_AUTOSCALING = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}


class RayBatcher:
    """`splitexit_server.batcher.DynamicBatcher`'s interface, on Ray Serve's `serve.batch`.

    Ray collects concurrent calls into one list (up to `max_batch_size` requests, waiting at
    most `max_queue_delay_s`); the list runs in a thread, like the built-in batcher's.
    """

    def __init__(
        self,
        process: Callable[[Sequence[Job]], Sequence[Any]],
        *,
        max_batch_size: int = 32,
        max_queue_delay_s: float = 0.002,
        max_queue_size: int = 256,
        workers: int = 1,
        name: str = "model",
    ) -> None:
        from ray import serve

        self.process = process
        self.max_queue_size = max_queue_size
        self.name = name
        self.pending = 0

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=max_queue_delay_s)
        async def run(jobs: list[Job]) -> list[Any]:
            return list(await asyncio.to_thread(self.process, jobs))

        self._run = run
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def queued(self) -> int:
        return self.pending

    async def start(self) -> None:
        """Nothing to start: Ray runs the batching loop."""

    def submit(self, payload: Any, *, size: int = 1, deadline: float | None = None) -> Job:
        if self.pending >= self.max_queue_size:
            raise QueueFull(
                f"model {self.name!r} has {self.pending} requests pending "
                f"(max_queue_size={self.max_queue_size}); retry later"
            )
        loop = asyncio.get_running_loop()
        deadline = deadline if deadline is not None else time.monotonic() + 3600
        job = Job(payload, max(1, int(size)), deadline, loop.create_future())
        task = loop.create_task(self._one(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _one(self, job: Job) -> None:
        self.pending += 1
        try:
            result: Any = await self._run(job)
        except Exception as e:
            result = e
        finally:
            self.pending -= 1
        if job.future.done():
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def deployment(
    settings: Settings,
    *,
    autoscaling_config: Mapping[str, Any] | None = None,
    ray_actor_options: Mapping[str, Any] | None = None,
) -> Any:
    """A bound Ray Serve application serving `settings.bundles` (pass it to `serve.run`)."""
    from ray import serve

    def build_app() -> Any:  # runs on each replica: load, warm up, serve
        from splitexit_server.app import create_app

        return create_app(settings, batcher_factory=RayBatcher)

    @serve.deployment(
        name="splitexit-tail",
        autoscaling_config=dict(autoscaling_config or DEFAULT_AUTOSCALING),
        ray_actor_options=dict(ray_actor_options or {"num_cpus": 1}),
        health_check_period_s=10,
    )
    @serve.ingress(build_app)
    class SplitexitTail:
        """One replica of the tail server."""

    return SplitexitTail.bind()  # type: ignore[attr-defined]  # ray is untyped: a Deployment


def app(args: dict[str, str]) -> Any:
    """Application builder for `serve run splitexit_server.ray_serve:app key=value ...`."""
    return deployment(Settings.from_env(**args))
