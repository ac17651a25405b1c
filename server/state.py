"""The server's lifecycle: loading ─ warming up ─ ready ─ draining ─ stopped (or failed).

    start: (load bundles in a thread) ─ start each batcher ─ warm up each model in a thread
           ─ ready: /v2/health/ready 200, inference accepted
    drain: ready 503, new inferences 503 + Retry-After, in-flight ones finish
    stop:  batchers stop (queued requests fail 503), worker threads end

Liveness stays 200 throughout, except after a failed start (503, so an orchestrator restarts
the process).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Sequence

from splitexit.bundle.load import Bundle
from splitexit_server.batcher import BatcherFactory
from splitexit_server.errors import NotFound, NotReady, with_retry_after
from splitexit_server.metrics import ServerMetrics
from splitexit_server.model import ServedModel, load_bundles
from splitexit_server.settings import Settings

log = logging.getLogger("server.state")


class ServerState:
    """Models by name, plus whether the server is live, ready or draining."""

    def __init__(
        self,
        settings: Settings,
        metrics: ServerMetrics,
        names: Sequence[str],
        batcher_factory: BatcherFactory | None = None,
    ) -> None:
        self.settings = settings
        self.batcher_factory = batcher_factory
        self.metrics = metrics
        self.names = list(names)
        self.models: dict[str, ServedModel] = {}
        self.phase = "loading"
        self.error: str | None = None
        self.drain_hooks: list[Callable[[], None]] = []  # called when draining begins
        self.open_streams = 0  # stream connections open (server.stream)

    @property
    def live(self) -> bool:
        return self.phase != "failed"

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and all(m.ready for m in self.models.values())

    @property
    def draining(self) -> bool:
        return self.phase == "draining"

    def model(self, name: str) -> ServedModel:
        """The served model `name`; NotFound (404) or NotReady (503, still loading)."""
        model = self.models.get(name)
        if model is not None:
            return model
        if name in self.names:
            raise self.not_ready(f"model {name!r} is still loading")
        raise NotFound(f"no model named {name!r}; this server serves {self.names}")

    def not_ready(self, message: str) -> NotReady:
        return with_retry_after(NotReady(message), self.settings.retry_after_s)  # type: ignore[return-value]

    def begin_drain(self) -> None:
        """Stop taking new inference requests (503); in-flight ones still finish."""
        if self.phase != "draining":
            log.info("draining: not ready, new inference requests get 503")
            self.phase = "draining"
            for hook in self.drain_hooks:
                hook()

    async def start(self, bundles: Sequence[Bundle] | None) -> None:
        """Load (if not given), start the batchers, warm up; then ready. Never raises."""
        try:
            if bundles is None:
                bundles = await asyncio.to_thread(load_bundles, self.settings)
            for bundle in bundles:
                model = ServedModel(bundle, self.settings, self.metrics, self.batcher_factory)
                await model.batcher.start()
                self.models[model.name] = model
            self.names = list(self.models)  # archives' names are known once loaded
            for model in self.models.values():
                if self.settings.warmup:
                    await asyncio.to_thread(model.warmup)
                else:
                    model.ready = True
            # objects alive now (torch, the models) live as long as the process: keep them out
            # of the collector's full passes, which otherwise stall requests under load
            gc.collect()
            gc.freeze()
            if self.phase == "loading":
                self.phase = "ready"
                log.info("ready", extra={"models": list(self.models)})
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.phase = "failed"
            self.error = f"{type(e).__name__}: {e}"
            log.exception("start failed; liveness now answers 503")

    async def stop(self) -> None:
        """Stop every batcher (running batches finish, queued requests fail)."""
        self.begin_drain()
        for model in self.models.values():
            await model.batcher.stop()
        self.phase = "stopped"
