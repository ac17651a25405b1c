"""The Open Inference Protocol codec: JSON and binary requests parse to the same thing, every
malformed body is a ProtocolError (400) or UnsupportedMedia (415) saying why."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitexit.protocol.errors import ProtocolError, UnsupportedMedia
from splitexit.protocol.kserve import (
    HEADER_LENGTH,
    RequestedOutput,
    build_binary_request,
    decode_infer_response,
    encode_infer_response,
    parse_infer_request,
)

FRAMES = [b"SX\x01frame-one", b"", b"\x00\xff" * 40]


def parse(body: bytes, headers: dict[str, str] | None = None, **kw):
    headers = {k.lower(): v for k, v in (headers or {}).items()}
    return parse_infer_request(
        body,
        header_length=headers.get(HEADER_LENGTH.lower()),
        content_type=headers.get("content-type"),
        content_encoding=headers.get("content-encoding"),
        inputs=kw.pop("inputs", ("frame", "image")),
        max_elements=kw.pop("max_elements", 8),
    )


def json_request(elements: list[bytes], **extra) -> bytes:
    doc = {
        "inputs": [
            {
                "name": "frame",
                "shape": [len(elements)],
                "datatype": "BYTES",
                "data": [base64.b64encode(e).decode() for e in elements],
            }
        ],
        **extra,
    }
    return json.dumps(doc).encode()


def test_binary_and_json_requests_carry_the_same_frames():
    body, headers = build_binary_request("frame", FRAMES, outputs=["class", "logits"])
    binary = parse(body, headers)
    plain = parse(json_request(FRAMES), {"content-type": "application/json"})
    assert binary.elements == plain.elements == FRAMES
    assert binary.input_name == plain.input_name == "frame"
    assert [o.name for o in binary.outputs] == ["class", "logits"]
    assert all(o.binary for o in binary.outputs)


def test_default_outputs_are_class_and_probability_in_json_unless_binary_asked():
    req = parse(json_request(FRAMES[:1]))
    assert req.outputs == (RequestedOutput("class", False), RequestedOutput("probability", False))
    req = parse(json_request(FRAMES[:1], parameters={"binary_data_output": True}))
    assert all(o.binary for o in req.outputs)
    outputs = [{"name": "logits", "parameters": {"binary_data": False}}]
    req = parse(json_request(FRAMES[:1], parameters={"binary_data_output": True}, outputs=outputs))
    assert req.outputs == (RequestedOutput("logits", False),)


def test_request_id_and_timeout_are_read():
    req = parse(json_request(FRAMES[:1], id="abc", parameters={"timeout": 5000}))
    assert req.id == "abc" and req.timeout_us == 5000


def one_input(**fields) -> bytes:
    spec = {"name": "frame", "shape": [1], "datatype": "BYTES", **fields}
    return json.dumps({"inputs": [spec]}).encode()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000, "not valid JSON"),
        (b"[]", "JSON object"),
        (b"{}", "exactly one BYTES input"),
        (one_input(name="x"), "unknown input"),
        (one_input(datatype="FP32", data=[1]), "datatype BYTES"),
        (one_input(shape=[2], data=["AA=="]), "elements"),
        (one_input(data=["%%%"]), "base64"),
        (one_input(data=[7]), "base64 string"),
        (one_input(shape=[100], data=[]), "1..8"),
        (one_input(shape=[-1], data=[]), "non-negative"),
        (one_input(), "needs 'data'"),
        (json_request([b"x"], outputs=[{"name": "nope"}]), "unknown output"),
        (json_request([b"x"], outputs=[{"name": "class"}, {"name": "class"}]), "twice"),
        (json_request([b"x"], parameters={"binary_data_output": "yes"}), "true or false"),
        (json_request([b"x"], parameters={"timeout": -1}), "timeout"),
        (json_request([b"x"], id=5), "'id' must be a string"),
    ],
)
def test_malformed_json_requests_are_bad_requests(body, match):
    with pytest.raises(ProtocolError, match=match):
        parse(body)


def test_malformed_binary_requests_are_bad_requests():
    body, headers = build_binary_request("frame", FRAMES)
    header_len = int(headers[HEADER_LENGTH])
    cases = [
        ({**headers, HEADER_LENGTH: "abc"}, body, "non-negative integer"),
        ({**headers, HEADER_LENGTH: str(len(body) + 1)}, body, "body has"),
        (headers, body[:-1], "binary section"),  # truncated
        (headers, body + b"x", "binary section"),  # trailing bytes
    ]
    for hdrs, data, match in cases:
        with pytest.raises(ProtocolError, match=match):
            parse(data, hdrs)
    # a length prefix pointing past the end
    doc = json.loads(body[:header_len])
    blob = b"\xff\xff\x00\x00abc"  # claims 65535 bytes, holds 3
    doc["inputs"][0]["parameters"]["binary_data_size"] = len(blob)
    doc["inputs"][0]["shape"] = [1]
    head = json.dumps(doc).encode()
    with pytest.raises(ProtocolError, match="claims 65535 bytes"):
        parse(head + blob, {HEADER_LENGTH: str(len(head))})


def test_wrong_content_types_and_encodings_are_refused():
    with pytest.raises(UnsupportedMedia):
        parse(json_request([b"x"]), {"content-type": "text/plain"})
    with pytest.raises(ProtocolError, match="needs the Inference-Header-Content-Length"):
        parse(json_request([b"x"]), {"content-type": "application/octet-stream"})  # documented
    with pytest.raises(UnsupportedMedia):
        parse(json_request([b"x"]), {"content-encoding": "gzip"})
    body, headers = build_binary_request("frame", [b"x"])
    with pytest.raises(UnsupportedMedia):
        parse(body, {**headers, "content-type": "multipart/form-data"})


def test_responses_round_trip_in_json_and_binary():
    tensors = {
        "class": np.array([3, 1], dtype=np.int64),
        "probability": np.array([0.5, 0.25], dtype=np.float32),
        "logits": np.arange(20, dtype=np.float32).reshape(2, 10),
    }
    for binary in (False, True):
        outputs = [RequestedOutput(n, binary) for n in ("class", "probability", "logits")]
        body, headers = encode_infer_response(
            model_name="m", model_version="v", request_id="r", outputs=outputs, tensors=tensors
        )
        assert (HEADER_LENGTH in headers) == binary
        got = decode_infer_response(body, headers.get(HEADER_LENGTH))
        for name, want in tensors.items():
            np.testing.assert_array_equal(got[name], want)
        assert got["logits"].shape == (2, 10)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), length=st.one_of(st.none(), st.text(max_size=6)))
def test_random_bodies_raise_only_protocol_errors(body, length):
    headers = {} if length is None else {HEADER_LENGTH: length}
    try:
        parse(body, headers)
    except ProtocolError as e:
        assert 400 <= e.status < 500
