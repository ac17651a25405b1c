"""The Open Inference Protocol (KServe v2) request and response, with Triton's binary extension.

    request body  = JSON header (Inference-Header-Content-Length bytes) + binary data
    binary data   = the frame as one BYTES element: u32 little-endian length + frame bytes

    {"inputs": [{"name": "frame", "shape": [1], "datatype": "BYTES",
                 "parameters": {"binary_data_size": 4 + len(frame)}}],
     "parameters": {"timeout": <microseconds left, when the input has a deadline>}}

The header is the least the protocol needs, since every byte of it crosses the link with
every frame: the request id travels in the `X-Request-ID` HTTP header (which the server logs
and echoes), and no `outputs` are named: the splitexit server answers `class` and
`probability` by default (a server that answers more outputs is still read).

The answer's `class` (INT64) and `probability` (FP32) come as JSON `data` arrays, or as
binary data after a JSON header when the response carries `Inference-Header-Content-Length`
(what Triton does when asked); both are read. Nothing here does I/O.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

HEADER_LENGTH = "Inference-Header-Content-Length"
CONTENT_TYPE = "application/octet-stream"
INPUT_NAME = "frame"
OUTPUTS = ("class", "probability")
_DTYPES = {"INT64": ("<q", 8), "INT32": ("<i", 4), "FP32": ("<f", 4), "FP64": ("<d", 8)}


class ProtocolError(ValueError):
    """A response that does not follow the protocol (garbage, missing outputs, wrong id)."""


@dataclass(frozen=True)
class Answer:
    """The server's answer for one frame of one sample."""

    prediction: int
    probability: float


def encode_request(
    frame: bytes,
    request_id: str | None = None,
    timeout_us: int | None = None,
    input_name: str = INPUT_NAME,
) -> tuple[bytes, int]:
    """The request body and its JSON header's length (the `Inference-Header-Content-Length`).

    `request_id` goes into the header as its `id` only when given (the client sends it as
    `X-Request-ID` instead). `timeout_us` (Triton's `timeout` parameter) tells the server
    when the answer stops being useful, so it can drop the work (504) instead of computing
    it late. `input_name` "image" sends an encoded image to the server's whole model.
    """
    header: dict[str, Any] = {} if request_id is None else {"id": request_id}
    header["inputs"] = [
        {
            "name": input_name,
            "shape": [1],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": 4 + len(frame)},
        }
    ]
    if timeout_us is not None:
        header["parameters"] = {"timeout": max(0, int(timeout_us))}
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + struct.pack("<I", len(frame)) + frame, len(head)


def decode_response(
    body: bytes, headers: Mapping[str, str], request_id: str | None = None
) -> Answer:
    """Read `class` and `probability` from a 200 response; raises ProtocolError."""
    header_len = headers.get(HEADER_LENGTH.lower()) or headers.get(HEADER_LENGTH)
    try:
        n = len(body) if header_len is None else int(header_len)
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} does not fit a {len(body)}-byte body")
        doc = json.loads(body[:n])
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"the response is not an inference response: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise ProtocolError("the response has no `outputs` list")
    if request_id is not None and doc.get("id") not in (None, request_id):
        raise ProtocolError(f"the response answers request {doc.get('id')!r}, not {request_id!r}")
    blobs = memoryview(body)[n:]
    values: dict[str, Any] = {}
    for out in doc["outputs"]:
        if isinstance(out, dict) and out.get("name") in OUTPUTS:
            values[out["name"]], blobs = _output_value(out, blobs)
    missing = [name for name in OUTPUTS if name not in values]
    if missing:
        raise ProtocolError(f"the response lacks the outputs {missing}")
    prediction, probability = values["class"], values["probability"]
    if isinstance(prediction, bool) or not isinstance(prediction, int) or prediction < 0:
        raise ProtocolError(f"`class` must be a non-negative integer, got {prediction!r}")
    if not isinstance(probability, int | float) or not 0.0 <= probability <= 1.0 + 1e-6:
        raise ProtocolError(f"`probability` must be in [0, 1], got {probability!r}")
    if math.isnan(probability):
        raise ProtocolError("`probability` is NaN")
    return Answer(int(prediction), float(probability))


def _output_value(out: dict[str, Any], blobs: memoryview) -> tuple[Any, memoryview]:
    """The first element of one output, from JSON `data` or the next binary blob."""
    params = out.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is None:
        data = out.get("data")
        while isinstance(data, list) and data:  # nested or flat: the first element
            data = data[0]
        if isinstance(data, list) or data is None:
            raise ProtocolError(f"output {out.get('name')!r} has no data")
        return data, blobs
    fmt = _DTYPES.get(str(out.get("datatype")))
    if fmt is None or not isinstance(size, int) or size < fmt[1] or size > len(blobs):
        raise ProtocolError(f"output {out.get('name')!r} has unreadable binary data")
    (value,) = struct.unpack_from(fmt[0], blobs, 0)
    return value, blobs[size:]
