"""Open Inference Protocol (KServe v2) inference requests and responses, JSON and binary.

    body ─┬─ no Inference-Header-Content-Length: the whole body is the JSON header
          └─ with it: body[:n] is the JSON header, body[n:] the binary section, cut into the
             inputs in order by each input's parameters.binary_data_size
    JSON header ─ one BYTES input ("frame" or "image") ─ elements (bytes) ─► InferRequest

A BYTES tensor in the binary section is a run of elements, each a 4-byte little-endian length
and that many bytes (Triton's layout). In JSON, a BYTES element is a base64 string: frames
and images are binary, and JSON strings cannot carry arbitrary bytes.

Outputs: `class` (INT64 [N]), `probability` (FP32 [N]) and, when asked for, `logits`
(FP32 [N, K]). An output travels in the binary section when its `parameters.binary_data` is
true, or when the request's `parameters.binary_data_output` is true and the output does not
say otherwise. Only JSON is parsed here (`json.loads`); nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import BadRequest, UnsupportedMediaType

INPUT_FRAME = "frame"
INPUT_IMAGE = "image"
OUTPUT_DATATYPES = {"class": "INT64", "probability": "FP32", "logits": "FP32"}
DEFAULT_OUTPUTS = ("class", "probability")
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPES = ("application/json", "")
BINARY_TYPES = ("application/octet-stream", "application/json", "")
_NUMPY = {"INT64": "<i8", "FP32": "<f4"}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client wants, and whether it goes in the binary section."""

    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A parsed inference request: one BYTES input's elements and the outputs to answer."""

    id: str | None
    input_name: str
    elements: list[bytes]
    outputs: tuple[RequestedOutput, ...]
    timeout_us: int | None = None  # Triton's per-request `timeout` parameter (microseconds)


# ------------------------------------------------------------------------------- requests


def parse_infer_request(
    body: bytes,
    *,
    header_length: str | None,
    content_type: str | None,
    content_encoding: str | None = None,
    inputs: Sequence[str] = (INPUT_FRAME,),
    max_elements: int = 64,
) -> InferRequest:
    """Parse an inference request body; raises BadRequest / UnsupportedMediaType saying why.

    `inputs` are the input names the model accepts; `max_elements` bounds the elements of
    the input (frames or images per request).
    """
    media = (content_type or "").split(";")[0].strip().lower()
    if content_encoding and content_encoding.strip().lower() != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {content_encoding!r} is not accepted: send the body "
            "uncompressed (frames are compressed already)"
        )
    if header_length is None:
        if media == "application/octet-stream":
            raise BadRequest(
                f"an application/octet-stream body needs the {HEADER_LENGTH} header (the "
                "length of its JSON header); or send application/json"
            )
        if media not in JSON_TYPES:
            raise UnsupportedMediaType(
                f"Content-Type {content_type!r} is not accepted: send application/json, or the "
                f"binary-data extension with an {HEADER_LENGTH} header"
            )
        header, binary = body, b""
    else:
        if media not in BINARY_TYPES:
            raise UnsupportedMediaType(
                f"Content-Type {content_type!r} is not accepted with {HEADER_LENGTH}: send "
                "application/octet-stream"
            )
        n = _header_length(header_length, len(body))
        header, binary = body[:n], body[n:]
    doc = _load_json(header)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {type(request_id).__name__}")
    params = _object(doc.get("parameters", {}), "parameters")
    binary_default = _bool(params.get("binary_data_output", False), "binary_data_output")
    timeout = params.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0
    ):
        raise BadRequest(f"parameters.timeout must be a non-negative integer (µs), got {timeout!r}")
    name, elements = _parse_inputs(doc.get("inputs"), binary, inputs, max_elements)
    outputs = _parse_outputs(doc.get("outputs"), binary_default)
    return InferRequest(request_id, name, elements, outputs, timeout)


def _header_length(value: str, body_length: int) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise BadRequest(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    n = int(text)
    if not 0 < n <= body_length:
        raise BadRequest(
            f"{HEADER_LENGTH} is {n}, but the body has {body_length} bytes; it must give the "
            "length of the JSON header at the start of the body"
        )
    return n


def _load_json(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise BadRequest(f"request header is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"request header must be a JSON object, got {type(doc).__name__}")
    return doc


def _parse_inputs(
    raw: Any, binary: bytes, allowed: Sequence[str], max_elements: int
) -> tuple[str, list[bytes]]:
    names = " or ".join(repr(n) for n in allowed)
    if not isinstance(raw, list) or len(raw) != 1:
        raise BadRequest(f"'inputs' must be a list with exactly one BYTES input named {names}")
    spec = _object(raw[0], "inputs[0]")
    name = spec.get("name")
    if name not in allowed:
        raise BadRequest(f"unknown input {name!r}; this model accepts {names}")
    if spec.get("datatype") != "BYTES":
        raise BadRequest(f"input {name!r} must have datatype BYTES, got {spec.get('datatype')!r}")
    count = _element_count(spec.get("shape"), name, max_elements)
    params = _object(spec.get("parameters", {}), f"inputs[0].parameters ({name!r})")
    size = params.get("binary_data_size")
    if size is None:
        if binary:
            raise BadRequest(
                f"the body has a {len(binary)}-byte binary section, but input {name!r} has no "
                "parameters.binary_data_size"
            )
        if "data" not in spec:
            raise BadRequest(f"input {name!r} needs 'data' or parameters.binary_data_size")
        elements = _json_elements(spec["data"], name, count)
    else:
        if "data" in spec:
            raise BadRequest(f"input {name!r} has both 'data' and parameters.binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadRequest(f"binary_data_size of {name!r} must be an integer >= 0, got {size!r}")
        if size != len(binary):
            raise BadRequest(
                f"input {name!r} declares binary_data_size={size}, but the binary section "
                f"after the {HEADER_LENGTH} header has {len(binary)} bytes"
            )
        elements = _binary_elements(memoryview(binary), name, count)
    return name, elements


def _element_count(shape: Any, name: str, max_elements: int) -> int:
    if not isinstance(shape, list) or not shape or len(shape) > 8:
        raise BadRequest(f"input {name!r} needs a 'shape' like [1] (a list of 1..8 integers)")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise BadRequest(f"input {name!r} shape {shape!r} must hold non-negative integers")
    count = math.prod(shape)
    if not 1 <= count <= max_elements:
        raise BadRequest(
            f"input {name!r} of shape {shape} has {count} elements; send 1..{max_elements} "
            "per request (the server's max batch size)"
        )
    return count


def _json_elements(data: Any, name: str, count: int) -> list[bytes]:
    flat: list[Any] = []
    stack = [data]
    while stack:  # flatten nested lists without recursion, stopping early when too many
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
            if len(flat) > count:
                break
    if len(flat) != count:
        raise BadRequest(f"input {name!r} has {len(flat)}+ elements in 'data', shape says {count}")
    out = []
    for i, item in enumerate(flat):
        if not isinstance(item, str):
            raise BadRequest(
                f"element {i} of input {name!r} must be a base64 string, got "
                f"{type(item).__name__}; or send bytes with the binary-data extension"
            )
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"element {i} of input {name!r} is not valid base64: {e}") from None
    return out


def _binary_elements(buf: memoryview, name: str, count: int) -> list[bytes]:
    out: list[bytes] = []
    offset = 0
    while offset < len(buf):
        if len(out) == count:
            raise BadRequest(f"input {name!r} holds more than the {count} elements of its shape")
        if offset + _LENGTH.size > len(buf):
            raise BadRequest(f"input {name!r}: truncated 4-byte length of element {len(out)}")
        (n,) = _LENGTH.unpack_from(buf, offset)
        offset += _LENGTH.size
        if offset + n > len(buf):
            raise BadRequest(
                f"input {name!r}: element {len(out)} claims {n} bytes, "
                f"{len(buf) - offset} remain in its binary data"
            )
        out.append(bytes(buf[offset : offset + n]))
        offset += n
    if len(out) != count:
        raise BadRequest(f"input {name!r} holds {len(out)} elements, its shape says {count}")
    return out


def _parse_outputs(raw: Any, binary_default: bool) -> tuple[RequestedOutput, ...]:
    if raw is None:
        return tuple(RequestedOutput(n, binary_default) for n in DEFAULT_OUTPUTS)
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'outputs' must be a non-empty list of {\"name\": ...} objects")
    out: list[RequestedOutput] = []
    for i, item in enumerate(raw):
        spec = _object(item, f"outputs[{i}]")
        name = spec.get("name")
        if name not in OUTPUT_DATATYPES:
            raise BadRequest(f"unknown output {name!r}; outputs: {sorted(OUTPUT_DATATYPES)}")
        if any(o.name == name for o in out):
            raise BadRequest(f"output {name!r} is requested twice")
        params = _object(spec.get("parameters", {}), f"outputs[{i}].parameters")
        if "classification" in params:
            raise BadRequest("the classification extension is not supported; use 'class'")
        binary = _bool(params.get("binary_data", binary_default), f"{name}.binary_data")
        out.append(RequestedOutput(name, binary))
    return tuple(out)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{what} must be true or false, got {value!r}")
    return value


# ------------------------------------------------------------------------------ responses


def encode_infer_response(
    *,
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Sequence[RequestedOutput],
    tensors: Mapping[str, np.ndarray],
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (Content-Type, and the header length if binary).

    `model_version` and `id` are left out when None (both are optional in the protocol).
    FP32 values in JSON take their shortest decimal form that reads back as the same float32.
    """
    specs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in outputs:
        datatype = OUTPUT_DATATYPES[out.name]
        array = np.ascontiguousarray(tensors[out.name], dtype=_NUMPY[datatype])
        spec: dict[str, Any] = {"name": out.name, "datatype": datatype, "shape": list(array.shape)}
        if out.binary:
            blob = array.tobytes()
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            spec["data"] = _json_data(array)
        specs.append(spec)
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = specs
    header = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()  # strict JSON
    if not blobs:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return b"".join([header, *blobs]), headers


def _json_data(array: np.ndarray) -> list[Any]:
    """A tensor's elements as JSON values; float32 ones as their shortest round-trip repr
    (0.11455438, not the float64 repr 0.11455437541007996 of the same number)."""
    flat = array.reshape(-1)
    if flat.dtype == np.float32:
        return [float(str(v)) for v in flat]
    return flat.tolist()


def encode_bytes_tensor(elements: Sequence[bytes]) -> bytes:
    """Triton's binary layout of a BYTES tensor: each element as u32le length + bytes."""
    return b"".join(_LENGTH.pack(len(e)) + bytes(e) for e in elements)


def build_binary_request(
    input_name: str,
    elements: Sequence[bytes],
    *,
    outputs: Sequence[str] | None = None,
    binary_outputs: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request body and headers (for clients, tests and benchmarks)."""
    blob = encode_bytes_tensor(elements)
    doc: dict[str, Any] = {
        "inputs": [
            {
                "name": input_name,
                "shape": [len(elements)],
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(blob)},
            }
        ]
    }
    if request_id is not None:
        doc["id"] = request_id
    if outputs is None:
        doc["parameters"] = {"binary_data_output": binary_outputs}
    else:
        flag = {"binary_data": binary_outputs}
        doc["outputs"] = [{"name": n, "parameters": flag} for n in outputs]
    header = json.dumps(doc, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
    return header + blob, headers


def decode_infer_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Output name -> array from a response body, JSON or binary (for clients and tests)."""
    n = len(body) if header_length is None else int(header_length)
    doc = json.loads(body[:n])
    offset = n
    out: dict[str, np.ndarray] = {}
    for spec in doc["outputs"]:
        dtype = _NUMPY[spec["datatype"]]
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is None:
            array = np.asarray(spec["data"], dtype=dtype)
        else:
            count = size // np.dtype(dtype).itemsize
            array = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
            offset += size
        out[spec["name"]] = array.reshape(spec["shape"])
    return out
