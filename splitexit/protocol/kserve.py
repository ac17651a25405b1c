"""Open Inference Protocol (KServe v2) inference requests and responses, both directions.

    request body  = JSON header (Inference-Header-Content-Length bytes) + binary section
    binary section = the inputs in order, each cut by its parameters.binary_data_size
    BYTES tensor  = a run of elements, each a u32 little-endian length + that many bytes

    client: encode_request / build_binary_request ─► body ─► parse_infer_request :server
    server: encode_infer_response ─► body ─► decode_response / decode_infer_response :client

The device's request is the least the protocol needs, since every byte of it crosses the link
with every frame: one BYTES input "frame", no `outputs` (the splitexit server answers `class`
and `probability` by default), the request id in the `X-Request-ID` HTTP header, and
Triton's `timeout` parameter when the input has a deadline:

    {"inputs": [{"name": "frame", "shape": [1], "datatype": "BYTES",
                 "parameters": {"binary_data_size": 4 + len(frame)}}],
     "parameters": {"timeout": <microseconds left>}}

In JSON, a BYTES element is a base64 string: frames and images are binary, and JSON strings
cannot carry arbitrary bytes. Outputs: `class` (INT64 [N]), `probability` (FP32 [N]) and,
when asked for, `logits` (FP32 [N, K]). An output travels in the binary section when its
`parameters.binary_data` is true, or when the request's `parameters.binary_data_output` is
true and the output does not say otherwise; answers are read either way (Triton's too). Only
JSON is parsed here (`json.loads`); nothing is ever unpickled, and nothing here does I/O.
Bytes that break the protocol raise `ProtocolError` (a server answers 400) or
`UnsupportedMedia` (415).
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

from splitexit.protocol.errors import ProtocolError, UnsupportedMedia

INPUT_FRAME = "frame"
INPUT_IMAGE = "image"
OUTPUT_DATATYPES = {"class": "INT64", "probability": "FP32", "logits": "FP32"}
DEFAULT_OUTPUTS = ("class", "probability")
HEADER_LENGTH = "Inference-Header-Content-Length"
CONTENT_TYPE = "application/octet-stream"
JSON_TYPES = ("application/json", "")
BINARY_TYPES = ("application/octet-stream", "application/json", "")
_NUMPY = {"INT64": "<i8", "FP32": "<f4", "INT32": "<i4", "FP64": "<f8"}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client wants, and whether it goes in the binary section."""

    name: str
    binary: bool


@dataclass(frozen=True)
class Answer:
    """The server's answer for one frame of one sample."""

    prediction: int
    probability: float


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
    """Parse an inference request body; raises ProtocolError / UnsupportedMedia saying why.

    `inputs` are the input names the model accepts; `max_elements` bounds the elements of
    the input (frames or images per request).
    """
    media = (content_type or "").split(";")[0].strip().lower()
    if content_encoding and content_encoding.strip().lower() != "identity":
        raise UnsupportedMedia(
            f"Content-Encoding {content_encoding!r} is not accepted: send the body "
            "uncompressed (frames are compressed already)"
        )
    if header_length is None:
        if media == "application/octet-stream":
            raise ProtocolError(
                f"an application/octet-stream body needs the {HEADER_LENGTH} header (the "
                "length of its JSON header); or send application/json"
            )
        if media not in JSON_TYPES:
            raise UnsupportedMedia(
                f"Content-Type {content_type!r} is not accepted: send application/json, or the "
                f"binary-data extension with an {HEADER_LENGTH} header"
            )
        header, binary = body, b""
    else:
        if media not in BINARY_TYPES:
            raise UnsupportedMedia(
                f"Content-Type {content_type!r} is not accepted with {HEADER_LENGTH}: send "
                "application/octet-stream"
            )
        n = _header_length(header_length, len(body))
        header, binary = body[:n], body[n:]
    doc = _load_json(header)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(f"'id' must be a string, got {type(request_id).__name__}")
    params = _object(doc.get("parameters", {}), "parameters")
    binary_default = _bool(params.get("binary_data_output", False), "binary_data_output")
    timeout = params.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0
    ):
        raise ProtocolError(
            f"parameters.timeout must be a non-negative integer (µs), got {timeout!r}"
        )
    name, elements = _parse_inputs(doc.get("inputs"), binary, inputs, max_elements)
    outputs = _parse_outputs(doc.get("outputs"), binary_default)
    return InferRequest(request_id, name, elements, outputs, timeout)


def _header_length(value: str, body_length: int) -> int:
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise ProtocolError(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    n = int(text)
    if not 0 < n <= body_length:
        raise ProtocolError(
            f"{HEADER_LENGTH} is {n}, but the body has {body_length} bytes; it must give the "
            "length of the JSON header at the start of the body"
        )
    return n


def _load_json(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ProtocolError(f"request header is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(f"request header must be a JSON object, got {type(doc).__name__}")
    return doc


def _parse_inputs(
    raw: Any, binary: bytes, allowed: Sequence[str], max_elements: int
) -> tuple[str, list[bytes]]:
    names = " or ".join(repr(n) for n in allowed)
    if not isinstance(raw, list) or len(raw) != 1:
        raise ProtocolError(f"'inputs' must be a list with exactly one BYTES input named {names}")
    spec = _object(raw[0], "inputs[0]")
    name = spec.get("name")
    if not isinstance(name, str) or name not in allowed:
        raise ProtocolError(f"unknown input {name!r}; this model accepts {names}")
    if spec.get("datatype") != "BYTES":
        raise ProtocolError(
            f"input {name!r} must have datatype BYTES, got {spec.get('datatype')!r}"
        )
    count = _element_count(spec.get("shape"), name, max_elements)
    params = _object(spec.get("parameters", {}), f"inputs[0].parameters ({name!r})")
    size = params.get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError(
                f"the body has a {len(binary)}-byte binary section, but input {name!r} has no "
                "parameters.binary_data_size"
            )
        if "data" not in spec:
            raise ProtocolError(f"input {name!r} needs 'data' or parameters.binary_data_size")
        elements = _json_elements(spec["data"], name, count)
    else:
        if "data" in spec:
            raise ProtocolError(f"input {name!r} has both 'data' and parameters.binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ProtocolError(
                f"binary_data_size of {name!r} must be an integer >= 0, got {size!r}"
            )
        if size != len(binary):
            raise ProtocolError(
                f"input {name!r} declares binary_data_size={size}, but the binary section "
                f"after the {HEADER_LENGTH} header has {len(binary)} bytes"
            )
        elements = _binary_elements(memoryview(binary), name, count)
    return name, elements


def _element_count(shape: Any, name: str, max_elements: int) -> int:
    if not isinstance(shape, list) or not shape or len(shape) > 8:
        raise ProtocolError(f"input {name!r} needs a 'shape' like [1] (a list of 1..8 integers)")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise ProtocolError(f"input {name!r} shape {shape!r} must hold non-negative integers")
    count = math.prod(shape)
    if not 1 <= count <= max_elements:
        raise ProtocolError(
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
        raise ProtocolError(
            f"input {name!r} has {len(flat)}+ elements in 'data', shape says {count}"
        )
    out = []
    for i, item in enumerate(flat):
        if not isinstance(item, str):
            raise ProtocolError(
                f"element {i} of input {name!r} must be a base64 string, got "
                f"{type(item).__name__}; or send bytes with the binary-data extension"
            )
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as e:
            raise ProtocolError(f"element {i} of input {name!r} is not valid base64: {e}") from None
    return out


def _binary_elements(buf: memoryview, name: str, count: int) -> list[bytes]:
    out: list[bytes] = []
    offset = 0
    while offset < len(buf):
        if len(out) == count:
            raise ProtocolError(f"input {name!r} holds more than the {count} elements of its shape")
        if offset + _LENGTH.size > len(buf):
            raise ProtocolError(f"input {name!r}: truncated 4-byte length of element {len(out)}")
        (n,) = _LENGTH.unpack_from(buf, offset)
        offset += _LENGTH.size
        if offset + n > len(buf):
            raise ProtocolError(
                f"input {name!r}: element {len(out)} claims {n} bytes, "
                f"{len(buf) - offset} remain in its binary data"
            )
        out.append(bytes(buf[offset : offset + n]))
        offset += n
    if len(out) != count:
        raise ProtocolError(f"input {name!r} holds {len(out)} elements, its shape says {count}")
    return out


def _parse_outputs(raw: Any, binary_default: bool) -> tuple[RequestedOutput, ...]:
    if raw is None:
        return tuple(RequestedOutput(n, binary_default) for n in DEFAULT_OUTPUTS)
    if not isinstance(raw, list) or not raw:
        raise ProtocolError("'outputs' must be a non-empty list of {\"name\": ...} objects")
    out: list[RequestedOutput] = []
    for i, item in enumerate(raw):
        spec = _object(item, f"outputs[{i}]")
        name = spec.get("name")
        if name not in OUTPUT_DATATYPES:
            raise ProtocolError(f"unknown output {name!r}; outputs: {sorted(OUTPUT_DATATYPES)}")
        if any(o.name == name for o in out):
            raise ProtocolError(f"output {name!r} is requested twice")
        params = _object(spec.get("parameters", {}), f"outputs[{i}].parameters")
        if "classification" in params:
            raise ProtocolError("the classification extension is not supported; use 'class'")
        binary = _bool(params.get("binary_data", binary_default), f"{name}.binary_data")
        out.append(RequestedOutput(name, binary))
    return tuple(out)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{what} must be true or false, got {value!r}")
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


def encode_bytes_tensor(elements: Sequence[bytes | bytearray | memoryview]) -> bytes:
    """Triton's binary layout of a BYTES tensor: each element as u32le length + bytes."""
    return b"".join(_LENGTH.pack(len(e)) + bytes(e) for e in elements)


def encode_request(
    elements: bytes | Sequence[bytes],
    request_id: str | None = None,
    timeout_us: int | None = None,
    *,
    input_name: str = INPUT_FRAME,
    outputs: Sequence[str] | None = None,
    binary_outputs: bool | None = None,
) -> tuple[bytes, int]:
    """A binary-extension request body and its JSON header's length (the value of
    `Inference-Header-Content-Length`).

    `elements` is one frame (bytes) or several. `request_id` goes into the header as its `id`
    only when given (the device sends it as `X-Request-ID` instead). `timeout_us` (Triton's
    `timeout` parameter) tells the server when the answer stops being useful, so it can drop
    the work (504) instead of computing it late. `outputs` names the outputs wanted and
    `binary_outputs` asks for them in the binary section; both left out when None.
    """
    items = [elements] if isinstance(elements, bytes | bytearray | memoryview) else elements
    blob = encode_bytes_tensor(items)
    doc: dict[str, Any] = {} if request_id is None else {"id": request_id}
    doc["inputs"] = [
        {
            "name": input_name,
            "shape": [len(items)],
            "datatype": "BYTES",
            "parameters": {"binary_data_size": len(blob)},
        }
    ]
    params: dict[str, Any] = {}
    if outputs is not None:
        flag = {} if binary_outputs is None else {"parameters": {"binary_data": binary_outputs}}
        doc["outputs"] = [{"name": n, **flag} for n in outputs]
    elif binary_outputs is not None:
        params["binary_data_output"] = binary_outputs
    if timeout_us is not None:
        params["timeout"] = max(0, int(timeout_us))
    if params:
        doc["parameters"] = params
    header = json.dumps(doc, separators=(",", ":")).encode()
    return header + blob, len(header)


def build_binary_request(
    input_name: str,
    elements: Sequence[bytes],
    *,
    outputs: Sequence[str] | None = None,
    binary_outputs: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """`encode_request` with the HTTP headers to send it with (for tests and benchmarks)."""
    body, n = encode_request(
        elements,
        request_id,
        input_name=input_name,
        outputs=outputs,
        binary_outputs=binary_outputs,
    )
    return body, {"Content-Type": CONTENT_TYPE, HEADER_LENGTH: str(n)}


def decode_infer_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Output name -> array from a response body, JSON or binary; raises ProtocolError."""
    doc, blobs = _response_doc(body, header_length)
    out: dict[str, np.ndarray] = {}
    for spec in doc["outputs"]:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ProtocolError("every output must be an object with a `name`")
        out[spec["name"]], blobs = _output_array(spec, blobs)
    return out


def decode_response(
    body: bytes,
    headers: Mapping[str, str],
    request_id: str | None = None,
    classes: int | None = None,
) -> Answer:
    """Read the first sample's `class` and `probability` from a 200 response (ours, Triton's);
    raises ProtocolError for anything that is no such answer, answers another request, or
    cannot be (a class not below `classes`, the bundle's class count)."""
    header_len = headers.get(HEADER_LENGTH.lower()) or headers.get(HEADER_LENGTH)
    doc, blobs = _response_doc(body, header_len)
    if request_id is not None and doc.get("id") not in (None, request_id):
        raise ProtocolError(f"the response answers request {doc.get('id')!r}, not {request_id!r}")
    values: dict[str, Any] = {}
    for spec in doc["outputs"]:
        if not isinstance(spec, dict):
            raise ProtocolError("every output must be an object with a `name`")
        array, blobs = _output_array(spec, blobs)
        if spec.get("name") in DEFAULT_OUTPUTS:
            if array.size == 0:
                raise ProtocolError(f"output {spec['name']!r} has no data")
            values[spec["name"]] = array.reshape(-1)[0].item()
    missing = [name for name in DEFAULT_OUTPUTS if name not in values]
    if missing:
        raise ProtocolError(f"the response lacks the outputs {missing}")
    prediction, probability = values["class"], values["probability"]
    if isinstance(prediction, float) and prediction.is_integer():
        prediction = int(prediction)
    if isinstance(prediction, bool) or not isinstance(prediction, int) or prediction < 0:
        raise ProtocolError(f"`class` must be a non-negative integer, got {prediction!r}")
    if classes is not None and prediction >= classes:
        raise ProtocolError(
            f"`class` is {prediction}, but the bundle has {classes} classes (0..{classes - 1}): "
            "the server runs another model"
        )
    if not (math.isfinite(probability) and 0.0 <= probability <= 1.0 + 1e-6):
        raise ProtocolError(f"`probability` must be finite and in [0, 1], got {probability!r}")
    return Answer(int(prediction), float(probability))


def _response_doc(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header of a response and its binary section; raises ProtocolError."""
    try:
        n = len(body) if header_length is None else int(header_length)
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} does not fit a {len(body)}-byte body")
        doc = json.loads(body[:n])
    except (ValueError, RecursionError) as e:  # ProtocolError is a ValueError too
        raise ProtocolError(f"the response is not an inference response: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("outputs"), list):
        raise ProtocolError("the response has no `outputs` list")
    return doc, memoryview(body)[n:]


def _output_array(spec: dict[str, Any], blobs: memoryview) -> tuple[np.ndarray, memoryview]:
    """One output as an array, from JSON `data` or the next binary blob; the rest of blobs."""
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    dtype = _NUMPY.get(str(datatype))
    if dtype is None and (size is not None or datatype is not None):
        raise ProtocolError(f"output {name!r} has datatype {datatype!r}, not {sorted(_NUMPY)}")
    try:
        if size is None:
            array = np.asarray(spec.get("data"), dtype=dtype)
            if array.dtype.kind not in "uif":
                raise ProtocolError(f"output {name!r} has no numeric data")
        else:
            item = np.dtype(dtype).itemsize
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(blobs):
                raise ProtocolError(f"output {name!r} has unreadable binary data")
            if size % item:
                raise ProtocolError(f"output {name!r}: {size} bytes is no whole {datatype} array")
            array = np.frombuffer(blobs, dtype=dtype, count=size // item)
            blobs = blobs[size:]
        if isinstance(shape, list) and math.prod(shape) == array.size:
            array = array.reshape(shape)
    except (TypeError, ValueError, OverflowError) as e:
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError(f"output {name!r} has unreadable data: {e}") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ProtocolError(f"output {name!r} holds NaN or infinity")
    return array, blobs
