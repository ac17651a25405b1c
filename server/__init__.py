"""The splitexit tail server: Open Inference Protocol (KServe v2) over FastAPI/uvicorn.

    HTTP ─ protocol (parse) ─ model.prepare (frame headers) ─ batcher ─ worker thread:
           decode frames ─ one tail call per batch ─ answers ─ protocol (encode) ─ HTTP

Modules: `settings` (typed settings, env, CLI), `app` (`create_app`), `protocol` (OIP JSON
and binary-data extension), `batcher` (dynamic batching), `model` (one served bundle),
`state` (lifecycle), `admission` (429 at the door, queue-delay target), `connection`
(header deadline, closing refused uploads), `limits` (body limit), `middleware` (request id,
access log), `metrics` (Prometheus), `logs` (JSON logs), `serve` (uvicorn with graceful
drain), `cli`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitexit_server.app import create_app
    from splitexit_server.settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:  # lazy: `import server` stays cheap (no torch)
    if name == "create_app":
        from splitexit_server.app import create_app

        return create_app
    if name == "Settings":
        from splitexit_server.settings import Settings

        return Settings
    raise AttributeError(f"module 'server' has no attribute {name!r}")
