"""The stream layout (`splitexit.protocol.stream`): a message is its frame without the
session's header, answers carry (id, class, probability), every field is checked, and
random bytes, truncations and bit flips only ever raise the stream's (or the frame's) error."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from splitexit.bottleneck.quantize import quantize
from splitexit.codec import decode_frame, encode_frame
from splitexit.errors import FrameError
from splitexit.protocol.stream import (
    MESSAGE_HEADER_SIZE,
    Accepted,
    Failure,
    MessageError,
    Session,
    StreamError,
    answer_size,
    decode_answer,
    decode_failure,
    encode_answer,
    encode_failure,
    message_from_frame,
    read_message,
    session_for,
    websocket_frame_bytes,
)

FP = "0f1e2d3c4b5a6978" * 4
SHAPE = (8, 7, 7)
POINTS = [(1, 2), (2, 4), (8, 8), (4, 8)]
SESSION = session_for("m", FP, SHAPE, POINTS)


def frame(k: int, bits: int, seed: int = 0, **kw: object) -> bytes:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((1, k, *SHAPE[1:]), generator=g).relu()
    return encode_frame(quantize(z, bits, channels=SHAPE[0]), FP, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- session


def test_the_handshake_round_trips_and_sorts_points() -> None:
    assert SESSION.points == ((1, 2), (2, 4), (4, 8), (8, 8))
    assert Session.decode(SESSION.encode()) == SESSION
    assert json.loads(SESSION.encode())["v"] == 1


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"v": 2}, "version 2 is not supported"),
        ({"fingerprint": "xyz"}, "fingerprint"),
        ({"fingerprint": FP.upper()}, "lowercase hex"),
        ({"model": ""}, "model"),
        ({"code_shape": [8, 7]}, "code_shape"),
        ({"code_shape": [8, 0, 7]}, "code_shape"),
        ({"points": []}, "points"),
        ({"points": [[9, 8]]}, "k <= C = 8"),
        ({"points": [[1, 3]]}, "bits 3"),
        ({"points": [[1, True]]}, "bits True"),
        ({"points": [[1, 8]] * 256}, "1..255"),
        ({"samples": 0}, "samples"),
        ({"top_k": 17}, "top_k"),
        ({"logits": 1}, "logits must be true or false"),
        ({"timeout_ms": 0}, "timeout_ms"),
        ({"extra": 1}, "unknown handshake fields"),
    ],
)
def test_each_bad_handshake_field_is_named(change: dict, match: str) -> None:
    doc = json.loads(SESSION.encode()) | change
    with pytest.raises(StreamError, match=match):
        Session.decode(json.dumps(doc))


def test_a_handshake_longer_than_4096_bytes_is_refused_unread() -> None:
    with pytest.raises(StreamError, match="more than 4096"):
        Session.decode("{" + " " * 5000 + "}")


def test_the_acceptance_is_checked() -> None:
    assert Accepted.decode(Accepted(8, 10, 500).encode()) == Accepted(8, 10, 500)
    with pytest.raises(StreamError, match="window"):
        Accepted.decode('{"v": 1, "window": 0, "classes": 10, "max_message_bytes": 500}')
    with pytest.raises(StreamError, match="refused"):
        Accepted.decode(encode_failure(Failure(None, "rejected", "no")))


# ------------------------------------------------------------------------------ messages


@pytest.mark.parametrize(("k", "bits"), POINTS)
@pytest.mark.parametrize("compress", [False, True])
def test_a_message_is_its_frame_without_the_header_and_reads_back_to_it(
    k: int, bits: int, compress: bool
) -> None:
    f = frame(k, bits, compress=compress)
    message = message_from_frame(f, 200, SESSION)
    assert len(message) == len(f) - 32 + MESSAGE_HEADER_SIZE
    assert message[0] == 200 and SESSION.points[message[1]] == (k, bits)
    assert read_message(message, SESSION) == (200, f)


def test_a_session_with_a_dictionary_rebuilds_dictionary_frames() -> None:
    samples = [frame(8, 8, seed=i, compress=False)[37:] for i in range(40)]
    d = zstandard.train_dictionary(512, samples)
    session = session_for("m", FP, SHAPE, POINTS, dictionary=True)
    f = frame(8, 8, seed=99, dictionary=d)
    _, rebuilt = read_message(message_from_frame(f, 1, session), session)
    assert rebuilt == f
    decode_frame(rebuilt, dictionary=d)
    with pytest.raises(ValueError, match="dictionary"):
        message_from_frame(f, 1, SESSION)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: message_from_frame(frame(8, 8), 256, SESSION), "0..255"),
        (lambda: message_from_frame(frame(2, 8), 0, SESSION), r"\(2, 8\) is not among"),
        (lambda: message_from_frame(b"junk", 0, SESSION), "not a frame"),
        (
            lambda: message_from_frame(frame(8, 8), 0, session_for("m", "ab" * 8, SHAPE, POINTS)),
            "fingerprint",
        ),
    ],
)
def test_a_frame_that_does_not_fit_the_session_is_refused(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


def test_a_bad_point_or_length_names_the_message() -> None:
    with pytest.raises(MessageError, match="operating point 9") as e:
        read_message(bytes([7, 9]) + bytes(10), SESSION)
    assert e.value.message_id == 7
    # (8, 8) is point 3: a raw payload of 8*7*7 bytes, and nothing longer
    with pytest.raises(MessageError, match=r"payload of 1\.\.392"):
        read_message(bytes([3, 3]) + bytes(5 + 393), SESSION)
    with pytest.raises(StreamError, match="no id"):
        read_message(b"\x01", SESSION)


def test_payloads_claiming_more_than_the_server_allows_are_refused_before_decompressing() -> None:
    message = message_from_frame(frame(8, 8), 0, SESSION)
    with pytest.raises(MessageError, match="max_raw_bytes"):
        read_message(message, SESSION, max_raw_bytes=100)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_random_messages_raise_only_the_streams_error(data: bytes) -> None:
    try:
        _, f = read_message(data, SESSION)
    except StreamError:
        return
    with contextlib.suppress(FrameError):  # what passes meets the frame decoder's checks
        decode_frame(f, expected_fingerprint=FP)


@settings(max_examples=300, deadline=None)
@given(
    point=st.sampled_from(POINTS),
    cut=st.integers(0, 400),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 7)), max_size=3),
)
def test_truncated_or_bit_flipped_messages_raise_only_stream_or_frame_errors(
    point: tuple[int, int], cut: int, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(message_from_frame(frame(*point), 0, SESSION))
    for i, bit in flips:
        data[i % len(data)] ^= 1 << bit
    data = data[: len(data) - cut % len(data)] if cut else data
    try:
        _, f = read_message(bytes(data), SESSION)
        decode_frame(f, expected_fingerprint=FP)
    except (StreamError, FrameError):
        pass


# ------------------------------------------------------------------------------- answers


def test_an_answer_is_id_class_and_probability_in_four_bytes() -> None:
    data = encode_answer(
        5, SESSION, 10, np.array([7]), np.array([0.5], np.float32), np.zeros((1, 10))
    )
    assert len(data) == answer_size(SESSION, 10) == 4
    reply = decode_answer(data, SESSION, 10)
    [got] = reply.samples
    assert (reply.id, got.answer.prediction) == (5, 7)
    assert reply.server_s is None  # no timing unless the session asks
    assert got.answer.probability == pytest.approx(0.5, abs=1 / 65535)


def test_a_session_with_timing_gets_the_servers_times_in_four_more_bytes() -> None:
    session = session_for("m", FP, SHAPE, POINTS, timing=True)
    args = (np.array([7]), np.array([0.5], np.float32), np.zeros((1, 10)))
    data = encode_answer(5, session, 10, *args, compute_s=0.00123, server_s=0.0042)
    assert len(data) == answer_size(session, 10) == 4 + 4
    reply = decode_answer(data, session, 10)
    assert reply.compute_s == pytest.approx(0.00123, abs=1e-5)
    assert reply.server_s == pytest.approx(0.0042, abs=1e-5)
    slow = decode_answer(encode_answer(5, session, 10, *args, server_s=9.0), session, 10)
    assert (slow.compute_s, slow.server_s) == (0.0, 0.65535)  # unknown; 655.35 ms or more


def test_more_than_256_classes_take_two_bytes_per_class() -> None:
    logits = np.zeros((1, 1000), np.float32)
    data = encode_answer(0, SESSION, 1000, np.array([999]), np.array([1.0]), logits)
    assert len(data) == 5
    assert decode_answer(data, SESSION, 1000).samples[0].answer.prediction == 999


def test_top_k_and_logits_answers_round_trip() -> None:
    session = Session(**{**SESSION.__dict__, "top_k": 2, "logits": True, "samples": 2})
    logits = np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 5.0]], np.float32)
    data = encode_answer(1, session, 3, np.array([1, 2]), np.array([0.8, 0.9]), logits)
    assert len(data) == answer_size(session, 3) == 1 + 2 * (3 * 3 + 12)
    answers = decode_answer(data, session, 3).samples
    assert [[c for c, _ in a.top_k] for a in answers] == [[1, 2], [2, 0]]
    assert answers[1].logits == pytest.approx((2.0, 0.0, 5.0))


@pytest.mark.parametrize(
    ("data", "match"),
    [(b"\x00\x01", "answer of 2 bytes"), (b"\x00\x0b\x00\x00", "class 11; the model has 10")],
)
def test_bad_answers_raise_stream_errors(data: bytes, match: str) -> None:
    with pytest.raises(StreamError, match=match):
        decode_answer(data, SESSION, 10)


def test_error_answers_round_trip_and_are_checked() -> None:
    f = Failure(3, "busy", "queue full", 1.0)
    assert decode_failure(encode_failure(f)) == f
    for text, match in [
        ('{"id": 300, "error": "busy"}', "0..255"),
        ('{"id": 1, "error": "nope"}', "not one of"),
        ('{"id": 1, "error": "busy", "retry_after_s": -1}', "retry_after_s"),
        ("[1]", "JSON object"),
    ]:
        with pytest.raises(StreamError, match=match):
            decode_failure(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_random_answers_and_errors_raise_only_the_streams_error(data: bytes) -> None:
    for read in (
        lambda: decode_answer(data, SESSION, 10),
        lambda: decode_failure(data),
        lambda: Accepted.decode(data),
        lambda: Session.decode(data),
    ):
        with contextlib.suppress(StreamError):
            read()


# ------------------------------------------------------------------------------- framing


@pytest.mark.parametrize(
    ("payload", "masked", "total"),
    [
        (0, True, 6),
        (125, True, 131),
        (126, True, 134),
        (65535, False, 65539),
        (65536, False, 65546),
    ],
)
def test_websocket_framing_is_counted_as_rfc_6455_puts_it_on_tcp(
    payload: int, masked: bool, total: int
) -> None:
    assert websocket_frame_bytes(payload, masked=masked) == total
