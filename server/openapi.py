"""OpenAPI fragments for the routes whose bodies the app reads by hand (the inference request
and its binary-data form), so `/openapi.json` documents the real protocol and tools such as
schemathesis can exercise it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Responses = dict[int | str, dict[str, Any]]  # FastAPI's `responses=`: status -> response object

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}

_TENSOR_OUT = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "enum": ["class", "probability", "logits"]},
        "datatype": {"type": "string", "enum": ["INT64", "FP32"]},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "array", "items": {"type": "number"}},
        "parameters": {
            "type": "object",
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        },
    },
}

INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_output": {"type": "boolean"},
                "timeout": {"type": "integer", "minimum": 0, "description": "microseconds"},
            },
        },
        "inputs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string", "enum": ["frame", "image"]},
                    "shape": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 8,
                        "items": {"type": "integer", "minimum": 0},
                        "description": "its element count (product) is 1..max_batch_size",
                    },
                    "datatype": {"type": "string", "enum": ["BYTES"]},
                    "data": {
                        "type": "array",
                        "items": {"type": "string", "format": "byte"},
                        "description": "base64 of each frame (or PNG/JPEG image)",
                    },
                    "parameters": {
                        "type": "object",
                        "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                    },
                },
            },
        },
        "outputs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "enum": ["class", "probability", "logits"]},
                    "parameters": {
                        "type": "object",
                        "properties": {"binary_data": {"type": "boolean"}},
                    },
                },
            },
        },
    },
}

INFER_REQUEST: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "An Open Inference Protocol request with one BYTES input, `frame` (or `image`). "
            "JSON (elements base64), or the binary-data extension: a JSON header of "
            "`Inference-Header-Content-Length` bytes followed by the tensor bytes."
        ),
        "content": {
            "application/json": {"schema": INFER_REQUEST_SCHEMA},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": (
                    "the binary-data extension: needs the Inference-Header-Content-Length "
                    "header (400 without it)"
                ),
            },
        },
    },
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 1},
            "description": "length of the JSON header at the start of a binary-data body",
        }
    ],
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


INFER_RESPONSES: Responses = {
    200: {
        "description": "the answer (JSON, or JSON header + binary outputs)",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model_name", "outputs"],
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "outputs": {"type": "array", "items": _TENSOR_OUT},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    400: _error("bad request: malformed body, tensor or frame (the reason is given)"),
    401: _error("missing or wrong bearer token"),
    408: _error("the request's header or body did not arrive in time (client_timeout_s)"),
    404: _error("no such model or version"),
    409: _error("the frame's fingerprint is not this model's (both are named)"),
    413: _error("request body over max_body_bytes"),
    415: _error("unsupported Content-Type or Content-Encoding"),
    429: _error(
        "overloaded (queue full, or the answer would come too late): retry after "
        "Retry-After seconds, or answer locally"
    ),
    503: _error("not ready (loading, warming up) or shutting down"),
    504: _error("deadline passed before the answer"),
}

HEALTH: Responses = {
    200: {"description": "yes"},
    503: {"description": "no (not ready yet, shutting down, or failed)"},
}
MODEL_READY: Responses = {
    **HEALTH,
    400: _error("malformed path parameter"),
    404: _error("no such model or version"),
}
METRICS: Responses = {200: {"description": "Prometheus text format", "content": {"text/plain": {}}}}
SERVER_METADATA: Responses = {401: _error("missing or wrong bearer token")}
MODEL_METADATA: Responses = {
    400: _error("malformed path parameter"),
    401: _error("missing or wrong bearer token"),
    404: _error("no such model or version"),
    503: _error("model still loading"),
}


def documented(app: Any) -> Callable[[], dict[str, Any]]:
    """`app.openapi` as the server answers: FastAPI documents a 422 for every route with
    parameters, but this server answers invalid requests 400 (documented where they occur)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = generate()
            for operations in doc.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
        return app.openapi_schema

    return openapi
