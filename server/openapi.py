"""OpenAPI fragments for the routes whose bodies the app reads by hand (the inference request
and its binary-data form), so `/openapi.json` documents the real protocol and tools such as
schemathesis can exercise it."""

from __future__ import annotations

from typing import Any

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
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
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
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
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
    404: _error("no such model or version"),
    409: _error("the frame's fingerprint is not this model's (both are named)"),
    413: _error("request body over max_body_bytes"),
    415: _error("unsupported Content-Type or Content-Encoding"),
    429: _error("queue full: retry after Retry-After seconds"),
    503: _error("not ready (loading, warming up) or shutting down"),
    504: _error("deadline passed before the answer"),
}

HEALTH: dict[int | str, dict[str, Any]] = {
    200: {"description": "yes"},
    503: {"description": "no (not ready yet, shutting down, or failed)"},
}
MODEL_READY = {**HEALTH, 404: _error("no such model or version")}
METRICS = {200: {"description": "Prometheus text format", "content": {"text/plain": {}}}}
SERVER_METADATA = {401: _error("missing or wrong bearer token")}
MODEL_METADATA = {
    401: _error("missing or wrong bearer token"),
    404: _error("no such model or version"),
    503: _error("model still loading"),
}
