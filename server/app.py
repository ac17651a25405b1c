"""The FastAPI app: Open Inference Protocol (KServe v2) endpoints over the served tails.

    POST /v2/models/{name}[/versions/{v}]/infer   frame (or image) in, class / probability /
                                                  logits out; JSON or binary-data extension
    GET  /v2/health/live | /v2/health/ready       open (no auth), for probes
    GET  /v2/models/{name}[/versions/{v}]/ready   open
    GET  /v2 | /v2/models/{name}[/versions/{v}]   server and model metadata
    GET  /metrics                                 Prometheus text format, open
    WS   /v2/models/{name}/stream                 the device's stream (`splitexit_server.stream`)

    request ─ header in time (408) ─ AdmissionDoor (429, see `splitexit_server.admission`)
            ─ CloseUnreadBodies (answered before its body was read: close, see `.connection`)
            ─ RequestContext (id, log, metrics, last-resort 500) ─ BodyLimit (413)
            ─ bearer auth (401) ─ handler ─ body in time (408) ─ parse (400 / 415)
            ─ frame headers (400 / 409) ─ its own timeout feasible? (429 / 504)
            ─ batcher (429 full, 504 deadline) ─ worker thread (429: waited past the target)
            ─ answer + Server-Timing

An answer carries `Server-Timing: queue;dur=<ms>,compute;dur=<ms>,total;dur=<ms>`: the wait
for a batch, the batch's decode + model time, and the server's time from the whole body
received to the answer (so a client can tell its link's time from the server's). A client
that disconnects before its body arrives (a device giving up at its deadline) is counted
under the outcome `client_disconnect` and logged in one line (see `splitexit_server.middleware`).

`create_app(settings)` loads the bundles in the background; `create_app(settings, bundles=...)`
serves bundles already loaded (the CLI loads them first, to refuse bad ones before binding).
Either way /v2/health/ready says 503 until every model is warmed up.
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations, which use
# the local aliases ModelName / Version defined in create_app
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from importlib import metadata
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from splitexit.bundle.load import Bundle
from splitexit.bundle.manifest import read_manifest
from splitexit.errors import ConfigError, FingerprintMismatch, FrameError
from splitexit.protocol.errors import ProtocolError
from splitexit.protocol.kserve import HEADER_LENGTH, encode_infer_response, parse_infer_request
from splitexit_server import openapi, stream
from splitexit_server.admission import AdmissionDoor
from splitexit_server.auth import AUTH_HINT, bearer_ok
from splitexit_server.batcher import BatcherFactory, Expired, QueueFull, Stopped
from splitexit_server.connection import CloseUnreadBodies
from splitexit_server.errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    NotFound,
    Overloaded,
    RequestTimeout,
    ServerError,
    Unauthorized,
    UnsupportedMediaType,
    with_retry_after,
)
from splitexit_server.limits import BodyLimitMiddleware
from splitexit_server.metrics import CONTENT_TYPE, ServerMetrics
from splitexit_server.middleware import RequestContextMiddleware
from splitexit_server.model import Answer, ServedModel
from splitexit_server.settings import Settings
from splitexit_server.state import ServerState

log = logging.getLogger("server.app")

_PARSE_IN_THREAD_BYTES = 1 << 20  # parse bodies larger than this off the event loop
CLIENT_DISCONNECT = "client_disconnect"  # outcome: the client left before its body arrived


def create_app(
    settings: Settings,
    *,
    bundles: Sequence[Bundle] | None = None,
    batcher_factory: BatcherFactory | None = None,
) -> FastAPI:
    """The tail server app for `settings` (and, optionally, bundles loaded already).

    `batcher_factory` replaces the built-in dynamic batcher (Ray Serve's, in `ray_serve`).
    """
    if bundles is not None:
        manifests = [b.manifest for b in bundles]
    else:  # archives are read when loaded; directories' manifests are read now
        manifests = [read_manifest(p) for p in settings.bundles if p.is_dir()]
    names = [m.name for m in manifests]
    versions = [m.fingerprint[:16] for m in manifests]
    if bundles is None:
        names += [p.name.split(".")[0] for p in settings.bundles if not p.is_dir()]
    if not names:
        raise ConfigError("no bundle to serve: give at least one --bundle PATH")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"two bundles are named {duplicates}; serve one bundle per model name")

    metrics = ServerMetrics()
    state = ServerState(settings, metrics, names, batcher_factory)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.threads is not None:
            import torch

            torch.set_num_threads(settings.threads)
        log.info("starting", extra={"settings": settings.public()})
        task = asyncio.create_task(state.start(bundles))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await state.stop()
            log.info("stopped")

    app = FastAPI(
        title="splitexit tail server",
        summary="Open Inference Protocol (KServe v2) server for split-model tails",
        version=_package_version(),
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.splitexit = state
    app.openapi = openapi.documented(app)  # type: ignore[method-assign]
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.add_middleware(CloseUnreadBodies)  # sees every answer the app gives
    app.add_middleware(AdmissionDoor, state=state)  # outermost: 429 before anything runs

    token = settings.auth_token.encode() if settings.auth_token else None

    async def require_token(request: Request) -> None:  # async: no threadpool hop
        if not bearer_ok(request.headers.get("authorization"), token):
            raise Unauthorized(AUTH_HINT)

    auth = [Depends(require_token)]
    ModelName = Annotated[
        str, Path(description="model name (the bundle's)", json_schema_extra={"enum": names})
    ]
    Version = Annotated[
        str,
        Path(
            description="model version: the first 16 hex digits of its fingerprint",
            json_schema_extra={"enum": versions} if len(versions) == len(names) else None,
        ),
    ]

    def model_at(name: str, version: str | None = None) -> ServedModel:
        model = state.model(name)
        if version is not None and version != model.version:
            raise NotFound(f"model {name!r} has version {model.version}, not {version!r}")
        return model

    # ------------------------------------------------------------------------ health

    @app.get("/v2/health/live", tags=["health"], responses=openapi.HEALTH)
    async def live() -> JSONResponse:
        return JSONResponse({"live": state.live}, status_code=200 if state.live else 503)

    @app.get("/v2/health/ready", tags=["health"], responses=openapi.HEALTH)
    async def ready() -> JSONResponse:
        if state.ready:
            return JSONResponse({"ready": True})
        headers = {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse({"ready": False}, status_code=503, headers=headers)

    @app.get("/v2/models/{name}/ready", tags=["health"], responses=openapi.MODEL_READY)
    async def model_ready(name: ModelName) -> JSONResponse:
        return _model_ready(state, name, None)

    @app.get(
        "/v2/models/{name}/versions/{version}/ready", tags=["health"], responses=openapi.MODEL_READY
    )
    async def model_version_ready(name: ModelName, version: Version) -> JSONResponse:
        return _model_ready(state, name, version)

    @app.get("/metrics", tags=["health"], response_class=Response, responses=openapi.METRICS)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    # ---------------------------------------------------------------------- metadata

    @app.get("/v2", tags=["metadata"], dependencies=auth, responses=openapi.SERVER_METADATA)
    async def server_metadata() -> dict[str, Any]:
        return {
            "name": "splitexit",
            "version": app.version,
            "extensions": ["binary_tensor_data"],
        }

    @app.get(
        "/v2/models/{name}", tags=["metadata"], dependencies=auth, responses=openapi.MODEL_METADATA
    )
    async def model_metadata(name: ModelName) -> dict[str, Any]:
        return stream.offer(model_at(name).metadata(), name)

    @app.get(
        "/v2/models/{name}/versions/{version}",
        tags=["metadata"],
        dependencies=auth,
        responses=openapi.MODEL_METADATA,
    )
    async def model_version_metadata(name: ModelName, version: Version) -> dict[str, Any]:
        return stream.offer(model_at(name, version).metadata(), name)

    # ---------------------------------------------------------------------- inference

    infer_doc: dict[str, Any] = {
        "openapi_extra": openapi.INFER_REQUEST,
        "responses": openapi.INFER_RESPONSES,
    }

    @app.post("/v2/models/{name}/infer", tags=["inference"], dependencies=auth, **infer_doc)
    async def infer(name: ModelName, request: Request) -> Response:
        return await infer_request(state, request, model_at(name))

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        tags=["inference"],
        dependencies=auth,
        **infer_doc,
    )
    async def infer_version(name: ModelName, version: Version, request: Request) -> Response:
        return await infer_request(state, request, model_at(name, version), versioned=True)

    stream.add_stream_route(app, state, token)
    return app


def _package_version() -> str:
    try:
        return metadata.version("splitexit")
    except metadata.PackageNotFoundError:
        return "0"


def _model_ready(state: ServerState, name: str, version: str | None) -> JSONResponse:
    model = state.models.get(name)
    if model is None and name not in state.names:
        raise NotFound(f"no model named {name!r}; this server serves {state.names}")
    if model is not None and version is not None and version != model.version:
        raise NotFound(f"model {name!r} has version {model.version}, not {version!r}")
    ok = model is not None and model.ready and not state.draining
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)


async def infer_request(
    state: ServerState, request: Request, model: ServedModel, *, versioned: bool = False
) -> Response:
    """Answer one inference request; every failure becomes its ServerError (see module doc).

    The answer names the model version only when the request did (`versioned`).
    """
    settings, metrics = state.settings, state.metrics
    start = time.perf_counter()
    deadline = time.monotonic() + settings.request_timeout_s
    outcome = "error"
    try:
        if state.draining:
            raise state.not_ready("the server is shutting down; retry on another replica")
        if not model.ready:
            raise state.not_ready(f"model {model.name!r} is warming up; retry shortly")
        wait_s = min(settings.client_timeout_s, deadline - time.monotonic())
        try:
            body = await asyncio.wait_for(request.body(), wait_s)
        except asyncio.TimeoutError:  # the client's fault: it stopped short or stalled
            raise RequestTimeout(
                f"the request body did not arrive within {wait_s:.3g} s: it stopped short of "
                "its Content-Length or stalled; send the whole body at once"
            ) from None
        except ClientDisconnect:  # nobody to answer: RequestContextMiddleware logs it
            outcome = CLIENT_DISCONNECT
            raise
        received = time.perf_counter()
        metrics.received_bytes.inc(len(body), model=model.name)
        headers = request.headers
        parse: dict[str, Any] = {
            "header_length": headers.get(HEADER_LENGTH),
            "content_type": headers.get("content-type"),
            "content_encoding": headers.get("content-encoding"),
            "inputs": model.inputs,
            "max_elements": settings.max_batch_size,
        }
        if len(body) > _PARSE_IN_THREAD_BYTES:
            req = await asyncio.to_thread(parse_infer_request, body, **parse)
        else:
            req = parse_infer_request(body, **parse)
        work = model.prepare(req.input_name, req.elements)
        if req.timeout_us is not None:
            deadline = min(deadline, time.monotonic() + req.timeout_us / 1e6)
            b = model.batcher
            refused = model.admission.within(
                model.name, b.queued, b.pending > b.queued, deadline - time.monotonic()
            )
            if refused is not None:
                raise refused
        try:
            job = model.batcher.submit(work, size=work.samples, deadline=deadline)
        except QueueFull as e:
            raise with_retry_after(Overloaded(str(e)), settings.retry_after_s) from None
        try:
            answer = await asyncio.wait_for(job.future, deadline - time.monotonic())
        except (asyncio.TimeoutError, Expired):
            raise DeadlineExceeded(
                f"no answer within the deadline ({settings.request_timeout_s:g} s server-side, "
                "or the request's timeout parameter); the server is busy: retry or answer locally"
            ) from None
        except Stopped:
            raise state.not_ready("the server is shutting down; retry on another replica") from None
        content, out_headers = encode_infer_response(
            model_name=model.name,
            model_version=model.version if versioned else None,
            request_id=req.id,
            outputs=req.outputs,
            tensors={
                "class": answer.prediction,
                "probability": answer.probability,
                "logits": answer.logits,
            },
        )
        out_headers["Server-Timing"] = server_timing(answer, time.perf_counter() - received)
        outcome = "success"
        return Response(content, headers=out_headers)
    except FingerprintMismatch as e:
        outcome = Conflict.outcome
        raise Conflict(_mismatch_message(state, e)) from None
    except FrameError as e:
        outcome = BadRequest.outcome
        raise BadRequest(f"bad frame: {e}") from None
    except ProtocolError as e:
        error = UnsupportedMediaType if e.status == 415 else BadRequest
        outcome = error.outcome
        raise error(str(e)) from None
    except ServerError as e:
        outcome = e.outcome
        raise
    finally:
        metrics.requests.inc(model=model.name, outcome=outcome)
        if outcome != CLIENT_DISCONNECT:  # no answer: its time says how long the client waited
            metrics.request_duration.observe(time.perf_counter() - start, model=model.name)


def server_timing(answer: Answer, total_s: float) -> str:
    """The `Server-Timing` value (W3C; milliseconds): queue and compute when known, total."""
    parts = [("queue", answer.queue_s), ("compute", answer.compute_s), ("total", total_s)]
    return ",".join(f"{name};dur={s * 1e3:.2f}" for name, s in parts if s is not None)


def _mismatch_message(state: ServerState, e: FingerprintMismatch) -> str:
    message = str(e)
    for other in state.models.values():
        if other.fingerprint.startswith(e.got):
            message += f" (that fingerprint is model {other.name!r} on this server)"
    return message


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def server_error(request: Request, exc: ServerError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=400)
