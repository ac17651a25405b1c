"""The stream: one WebSocket per device and model, the session said once, then small messages.

    device ─ upgrade (subprotocol splitexit.stream.v1, bearer token) ─► server
           ─ handshake (text, JSON: model, fingerprint, code shape, codec, options) ─►
           ◄─ accepted (text, JSON: window, classes, largest message), or an error + close
           ─ message (binary: id, operating point, qparams, payload) ─►    ┐ up to `window`
           ◄─ answer (binary: id, class, probability) or error (text, JSON) ┘ in flight

A message is a frame (`splitexit.codec.frame`) without what the session fixed: the device
cuts the 32-byte header off the frame it built (`message_from_frame`), the server puts it
back (`read_message`) and decodes the frame as any other (same checks, same packing code).

Handshake (device → server, the first message, text, at most 4096 bytes of JSON):

    field        type             meaning
    ───────────  ───────────────  ─────────────────────────────────────────────────────────
    v            int              STREAM_VERSION (1)
    model        str              the model's name on the server (1..128 characters)
    fingerprint  str              the bundle's fingerprint, lowercase hex (16..64 digits)
    code_shape   [int, int, int]  (C, H, W) of the bottleneck code, each 1..65535
    points       [[int, int], …]  the (k, bits) operating points messages use, 1..255 of
                                  them: 1 <= k <= min(C, 65535), bits 2, 4 or 8
    samples      int              samples per message, n (1..1024; default 1)
    dictionary   bool             compressed payloads use the bundle's zstd dictionary
    top_k        int              answers also carry the best top_k classes (0..min(16, K))
    logits       bool             answers also carry all logits (false)
    timeout_ms   int | null       the server drops a message's work after this (null: its own)
    timing       bool             answers also carry the server's times (false)

Accepted (server → device, text JSON): `{"v": 1, "window": W, "classes": K,
"max_message_bytes": M}`; W messages may be in flight at once (1..256), K classes the model
has, M the largest message the server reads. A refused handshake gets an error (below, with
id null) and the connection closes with a code from CLOSE_CODES (4409: another fingerprint).

Message (device → server, binary; all integers little-endian):

    offset  size  field
    ──────  ────  ──────────────────────────────────────────────────────────────────────
         0     1  id: any value not in flight on this connection (0..255)
         1     1  point: index into the handshake's points, giving (k, bits)
         2    5n  qparams: n records of (scale float32, zero_point u8), as in the frame
      2+5n     L  payload: pack(values [n, k, H, W] in C order, bits); raw when
                  L = ceil(n*k*H*W*bits/8), zstd-compressed (content size declared; with
                  the bundle's dictionary when the session says so) when 0 < L < raw

Answer (server → device, binary), c = 1 if K <= 256, else 2:

    offset  size  field
    ──────  ────  ──────────────────────────────────────────────────────────────────────
         0     1  id of the message answered
         1  c+2   per sample: class (u8 or u16), probability round(p * 65535) (u16)
                  then top_k records of (class, probability) as above, best first
                  then K logits (float32), when the session asked for them
    end          4    with timing: compute, then total server time, u16 each, in 10 µs
                      (the batch's model time; message in to answer out; 65535: or more)

Error (server → device, text JSON): `{"id": <id or null>, "error": <code>, "message": <str>,
"retry_after_s": <float, with busy>}`, code one of ERROR_CODES: busy (queue or window full,
draining, warming up: answer locally now, like HTTP 429/503), deadline (504), rejected (this
message cannot work: 400/413), server_error (500).

Close codes (the server's; the device's answer in brackets): 4400 a handshake or message
that breaks this layout [use HTTP], 4404 no such model [stop offloading], 4409 another
fingerprint [stop offloading], 4503 draining or not ready [reconnect with backoff: another
replica, or this one when back], 1009 a message over the server's size limit, 1011 the
server failed or a keepalive ping went unanswered [reconnect]. The version is in the
subprotocol's name and the handshake's `v`; a server refuses versions it does not speak.

Every field is checked before it is used and every size is bounded by the session before
anything is allocated; bytes that break the layout raise `StreamError` (`MessageError` when
the message's id is known, so that the server can answer that one message).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np

from splitexit.codec.bitpack import packed_size
from splitexit.codec.frame import (
    DEFAULT_MAX_RAW_BYTES,
    FLAG_DICTIONARY,
    FLAG_ZSTD,
    HEADER_SIZE,
    QPARAM_SIZE,
    assemble_frame,
    read_header,
)
from splitexit.confidence import softmax
from splitexit.errors import FrameError
from splitexit.protocol.errors import StreamError
from splitexit.protocol.kserve import Answer

SUBPROTOCOL = "splitexit.stream.v1"
STREAM_VERSION = 1
MESSAGE_HEADER_SIZE = 2
MAX_HANDSHAKE_BYTES = 4096
MAX_POINTS = 255
MAX_WINDOW = 256
MAX_TOP_K = 16
MAX_SAMPLES = 1024
ERROR_CODES = ("busy", "deadline", "rejected", "server_error")
CLOSE_PROTOCOL = 4400  # bad handshake or a message without an id: use HTTP
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_FINGERPRINT = 4409  # the server runs another bundle: stop offloading
CLOSE_DRAINING = 4503  # shutting down or warming up: reconnect later (another replica)
CLOSE_CODES = {
    CLOSE_PROTOCOL: "protocol",
    CLOSE_UNAUTHORIZED: "unauthorized",
    CLOSE_NOT_FOUND: "not_found",
    CLOSE_FINGERPRINT: "fingerprint",
    CLOSE_DRAINING: "draining",
}
_SUPPORTED_BITS = (2, 4, 8)
_HEX = re.compile(r"[0-9a-f]{16,64}")
_PROBABILITY_SCALE = 65535
_TIMING = struct.Struct("<HH")
_TICKS_PER_S = 100_000  # 10 µs


class MessageError(StreamError):
    """A message that cannot work, whose id is known: answer it `rejected`."""

    def __init__(self, message_id: int, text: str) -> None:
        super().__init__(text)
        self.message_id = message_id


# ------------------------------------------------------------------------------- session


@dataclass(frozen=True)
class Session:
    """What a device states once per connection (the handshake; see the module docstring)."""

    model: str
    fingerprint: str
    code_shape: tuple[int, int, int]
    points: tuple[tuple[int, int], ...]
    samples: int = 1
    dictionary: bool = False
    top_k: int = 0
    logits: bool = False
    timeout_ms: int | None = None
    timing: bool = False

    def __post_init__(self) -> None:
        problems = _session_problems(self)
        if problems:
            raise StreamError("bad stream handshake: " + "; ".join(problems))

    def encode(self) -> str:
        """The handshake message (JSON text)."""
        doc: dict[str, Any] = {"v": STREAM_VERSION, "model": self.model}
        doc["fingerprint"] = self.fingerprint
        doc["code_shape"] = list(self.code_shape)
        doc["points"] = [list(p) for p in self.points]
        for name in ("samples", "dictionary", "top_k", "logits", "timeout_ms", "timing"):
            doc[name] = getattr(self, name)
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | bytes) -> Session:
        """Read and validate a handshake; raises StreamError saying what is wrong."""
        if len(text) > MAX_HANDSHAKE_BYTES:
            raise StreamError(f"handshake of {len(text)} bytes, more than {MAX_HANDSHAKE_BYTES}")
        doc = _json_object(text, "handshake")
        if doc.get("v") != STREAM_VERSION:
            raise StreamError(
                f"stream version {doc.get('v')!r} is not supported (this server speaks "
                f"{STREAM_VERSION}); run the same splitexit release on the device and the server"
            )
        unknown = sorted(set(doc) - {"v", *cls.__dataclass_fields__})
        if unknown:
            raise StreamError(f"unknown handshake fields {unknown}")
        try:
            return cls(
                model=doc.get("model"),  # type: ignore[arg-type]
                fingerprint=doc.get("fingerprint"),  # type: ignore[arg-type]
                code_shape=_tuple(doc.get("code_shape")),
                points=_tuple(doc.get("points"), _tuple),
                samples=doc.get("samples", 1),
                dictionary=doc.get("dictionary", False),
                top_k=doc.get("top_k", 0),
                logits=doc.get("logits", False),
                timeout_ms=doc.get("timeout_ms"),
                timing=doc.get("timing", False),
            )
        except TypeError as e:
            raise StreamError(f"bad stream handshake: {e}") from None

    @property
    def max_message_bytes(self) -> int:
        """The largest message this session can produce (the raw payload at its largest)."""
        _, h, w = self.code_shape
        raw = max(packed_size(self.samples * k * h * w, bits) for k, bits in self.points)
        return MESSAGE_HEADER_SIZE + QPARAM_SIZE * self.samples + raw


def _tuple(value: Any, item: Any = None) -> Any:
    """JSON lists as tuples (`item` applied to each element); anything else unchanged."""
    if not isinstance(value, list):
        return value
    return tuple(value if item is None else (item(v) for v in value))


def _is_int(v: Any, lo: int, hi: int) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _session_problems(s: Session) -> list[str]:
    out = []
    if not isinstance(s.model, str) or not 1 <= len(s.model) <= 128:
        out.append(f"model must be a name of 1..128 characters, got {s.model!r}")
    if not isinstance(s.fingerprint, str) or not _HEX.fullmatch(s.fingerprint):
        out.append(f"fingerprint must be 16..64 lowercase hex digits, got {s.fingerprint!r}")
    shape = s.code_shape
    if not (
        isinstance(shape, tuple) and len(shape) == 3 and all(_is_int(d, 1, 65535) for d in shape)
    ):
        out.append(f"code_shape must be [C, H, W] of integers 1..65535, got {shape!r}")
        return out
    points = s.points
    if not isinstance(points, tuple) or not 1 <= len(points) <= MAX_POINTS:
        out.append(f"points must list 1..{MAX_POINTS} [k, bits] pairs, got {points!r}")
    else:
        for p in points:
            if not (isinstance(p, tuple) and len(p) == 2 and _is_int(p[0], 1, shape[0])):
                out.append(f"point {p!r} must be [k, bits] with 1 <= k <= C = {shape[0]}")
            elif p[1] not in _SUPPORTED_BITS or isinstance(p[1], bool):
                out.append(f"point {list(p)} has bits {p[1]!r}, not 2, 4 or 8")
    if not _is_int(s.samples, 1, MAX_SAMPLES):
        out.append(f"samples must be 1..{MAX_SAMPLES}, got {s.samples!r}")
    for name in ("dictionary", "logits", "timing"):
        if not isinstance(getattr(s, name), bool):
            out.append(f"{name} must be true or false, got {getattr(s, name)!r}")
    if not _is_int(s.top_k, 0, MAX_TOP_K):
        out.append(f"top_k must be 0..{MAX_TOP_K}, got {s.top_k!r}")
    if s.timeout_ms is not None and not _is_int(s.timeout_ms, 1, 3_600_000):
        out.append(f"timeout_ms must be null or 1..3600000, got {s.timeout_ms!r}")
    return out


@dataclass(frozen=True)
class Accepted:
    """The server's yes to a handshake: messages in flight at most, classes, largest message."""

    window: int
    classes: int
    max_message_bytes: int

    def encode(self) -> str:
        doc = {"v": STREAM_VERSION, "window": self.window, "classes": self.classes}
        doc["max_message_bytes"] = self.max_message_bytes
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | bytes) -> Accepted:
        """Read the server's acceptance; raises StreamError (a refusal is a `Failure`)."""
        if len(text) > MAX_HANDSHAKE_BYTES:
            raise StreamError(f"handshake answer of {len(text)} bytes is too long")
        doc = _json_object(text, "handshake answer")
        if "error" in doc:
            raise StreamError(f"the server refused the stream: {doc.get('message')!r}")
        window, classes, size = doc.get("window"), doc.get("classes"), doc.get("max_message_bytes")
        if doc.get("v") != STREAM_VERSION:
            raise StreamError(f"the server speaks stream version {doc.get('v')!r}, not 1")
        if not _is_int(window, 1, MAX_WINDOW):
            raise StreamError(f"window must be 1..{MAX_WINDOW}, got {window!r}")
        if not _is_int(classes, 1, 65536):
            raise StreamError(f"classes must be 1..65536, got {classes!r}")
        if not _is_int(size, MESSAGE_HEADER_SIZE + QPARAM_SIZE, 2**31):
            raise StreamError(f"max_message_bytes must be a size, got {size!r}")
        return cls(window, classes, size)


def _json_object(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise StreamError(f"{what} is not JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise StreamError(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


# ------------------------------------------------------------------------------ messages


def message_from_frame(frame: bytes, message_id: int, session: Session) -> bytes:
    """The message for `frame` (made by this session's bundle): its header swapped for
    (id, point). Raises ValueError if the frame does not fit the session."""
    if not 0 <= message_id <= 255:
        raise ValueError(f"message id must be 0..255, got {message_id}")
    try:
        h = read_header(frame, max_samples=MAX_SAMPLES, max_raw_bytes=DEFAULT_MAX_RAW_BYTES)
    except FrameError as e:
        raise ValueError(f"not a frame: {e}") from e
    if h.fingerprint != session.fingerprint[:16]:
        raise ValueError(f"frame of fingerprint {h.fingerprint}, the session's is another")
    if (h.channels, h.height, h.width) != session.code_shape or h.batch_size != session.samples:
        raise ValueError(f"frame of shape {h.shape} does not fit the session's {session}")
    if h.uses_dictionary != (session.dictionary and h.compressed):
        raise ValueError("the frame's zstd dictionary use differs from the session's")
    try:
        point = session.points.index((h.sent_channels, h.bits))
    except ValueError:
        raise ValueError(
            f"operating point ({h.sent_channels}, {h.bits}) is not among the session's points"
        ) from None
    return bytes((message_id, point)) + memoryview(frame)[HEADER_SIZE:]


def read_message(
    data: bytes | bytearray | memoryview,
    session: Session,
    *,
    max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES,
) -> tuple[int, bytes]:
    """A message's id and the frame it stands for (header rebuilt, checked by `read_header`).

    Raises StreamError when the message has no id, MessageError for anything else wrong.
    The frame's payload and qparams are checked where frames are decoded (`decode_frame`).
    """
    view = memoryview(data).cast("B")
    if len(view) < MESSAGE_HEADER_SIZE:
        raise StreamError(f"a {len(view)}-byte message has no id and operating point")
    message_id, point = view[0], view[1]
    if point >= len(session.points):
        raise MessageError(
            message_id, f"operating point {point} is not one of the {len(session.points)} stated"
        )
    k, bits = session.points[point]
    n = session.samples
    c, h, w = session.code_shape
    raw = packed_size(n * k * h * w, bits)
    length = len(view) - MESSAGE_HEADER_SIZE - QPARAM_SIZE * n
    if not 0 < length <= raw:
        raise MessageError(
            message_id,
            f"message of {len(view)} bytes: at ({k}, {bits}) it needs {MESSAGE_HEADER_SIZE} + "
            f"{QPARAM_SIZE}*{n} bytes and a payload of 1..{raw} (raw: {raw}, zstd: fewer)",
        )
    flags = 0 if length == raw else FLAG_ZSTD | (FLAG_DICTIONARY if session.dictionary else 0)
    qparams = view[MESSAGE_HEADER_SIZE : MESSAGE_HEADER_SIZE + QPARAM_SIZE * n]
    payload = view[MESSAGE_HEADER_SIZE + QPARAM_SIZE * n :]
    frame = assemble_frame(session.fingerprint, flags, bits, (n, c, k, h, w), qparams, payload)
    try:
        read_header(frame, max_samples=n, max_raw_bytes=max_raw_bytes)
    except FrameError as e:
        raise MessageError(message_id, str(e)) from None
    return message_id, frame


# ------------------------------------------------------------------------------- answers


@dataclass(frozen=True)
class SampleAnswer:
    """One sample's answer on the stream: the class and probability, and what the session
    asked for besides (top-k pairs, logits)."""

    answer: Answer
    top_k: tuple[tuple[int, float], ...] = ()
    logits: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Reply:
    """A decoded answer: the message's id, its samples' answers, and the server's times
    (seconds; None unless the session asked for timing)."""

    id: int
    samples: list[SampleAnswer]
    compute_s: float | None = None
    server_s: float | None = None


@dataclass(frozen=True)
class Failure:
    """An error answer: the message's id (None: the handshake), its code, what to do."""

    id: int | None
    code: str
    message: str
    retry_after_s: float = 0.0


def class_bytes(classes: int) -> int:
    """Bytes of a class index in answers: 1 for up to 256 classes, else 2."""
    return 1 if classes <= 256 else 2


def answer_size(session: Session, classes: int) -> int:
    """Bytes of an answer to one message of this session (the WebSocket framing aside)."""
    pair = class_bytes(classes) + 2
    per_sample = pair * (1 + session.top_k) + (4 * classes if session.logits else 0)
    return 1 + session.samples * per_sample + (_TIMING.size if session.timing else 0)


def encode_answer(
    message_id: int,
    session: Session,
    classes: int,
    prediction: np.ndarray,
    probability: np.ndarray,
    logits: np.ndarray,
    *,
    compute_s: float | None = None,
    server_s: float | None = None,
) -> bytes:
    """The answer to one message: `prediction` [n], `probability` [n], `logits` [n, K];
    the server's times (seconds) go in when the session asked for timing."""
    cls = "<u1" if class_bytes(classes) == 1 else "<u2"
    n = session.samples
    probs = np.rint(np.clip(probability, 0.0, 1.0) * _PROBABILITY_SCALE).astype("<u2")
    k = session.top_k
    pair = np.dtype([("c", cls), ("p", "<u2")])
    parts = [bytes((message_id,))]
    top = None
    if session.top_k:
        order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        soft = softmax(logits)
        top = (order, np.take_along_axis(soft, order, axis=1))
    for i in range(n):
        rec = np.empty(1 + session.top_k, dtype=pair)
        rec["c"][0], rec["p"][0] = prediction[i], probs[i]
        if top is not None:
            rec["c"][1 : 1 + k] = top[0][i]
            rec["p"][1 : 1 + k] = np.rint(top[1][i] * _PROBABILITY_SCALE)
        parts.append(rec.tobytes())
        if session.logits:
            parts.append(np.ascontiguousarray(logits[i], dtype="<f4").tobytes())
    if session.timing:
        parts.append(_TIMING.pack(_ticks(compute_s), _ticks(server_s)))
    return b"".join(parts)


def _ticks(seconds: float | None) -> int:
    """Seconds in 10 µs ticks, 0..65535 (65535: that long or longer; 0 also when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return 0
    return max(0, min(0xFFFF, round(seconds * _TICKS_PER_S)))


def decode_answer(data: bytes | bytearray | memoryview, session: Session, classes: int) -> Reply:
    """The id, per-sample answers and (with timing) server times of an answer; raises
    StreamError."""
    view = memoryview(data).cast("B")
    size = answer_size(session, classes)
    if len(view) != size:
        raise StreamError(f"answer of {len(view)} bytes, this session's are {size}")
    cls = "<u1" if class_bytes(classes) == 1 else "<u2"
    pair = np.dtype([("c", cls), ("p", "<u2")])
    out: list[SampleAnswer] = []
    offset = 1
    for _ in range(session.samples):
        rec = np.frombuffer(view, dtype=pair, count=1 + session.top_k, offset=offset)
        offset += pair.itemsize * (1 + session.top_k)
        if int(rec["c"].max()) >= classes:
            raise StreamError(f"answer names class {int(rec['c'].max())}; the model has {classes}")
        pairs = [(int(c), int(p) / _PROBABILITY_SCALE) for c, p in rec.tolist()]
        logits = None
        if session.logits:
            values = np.frombuffer(view, dtype="<f4", count=classes, offset=offset)
            offset += 4 * classes
            if not np.isfinite(values).all():
                raise StreamError("answer logits hold NaN or infinity")
            logits = tuple(values.tolist())
        top = tuple(pairs[1:])
        out.append(SampleAnswer(Answer(*pairs[0]), top, logits))
    if not session.timing:
        return Reply(view[0], out)
    compute, total = _TIMING.unpack_from(view, offset)
    return Reply(view[0], out, compute / _TICKS_PER_S, total / _TICKS_PER_S)


def encode_failure(failure: Failure) -> str:
    """An error answer (JSON text)."""
    if failure.code not in ERROR_CODES:
        raise ValueError(f"error code must be one of {ERROR_CODES}, got {failure.code!r}")
    doc: dict[str, Any] = {"id": failure.id, "error": failure.code, "message": failure.message}
    if failure.retry_after_s:
        doc["retry_after_s"] = failure.retry_after_s
    return json.dumps(doc, separators=(",", ":"))


def decode_failure(text: str | bytes) -> Failure:
    """Read an error answer; raises StreamError."""
    if len(text) > MAX_HANDSHAKE_BYTES:
        raise StreamError(f"error answer of {len(text)} bytes is too long")
    doc = _json_object(text, "error answer")
    mid, code, message = doc.get("id"), doc.get("error"), doc.get("message", "")
    retry = doc.get("retry_after_s", 0.0)
    if mid is not None and not _is_int(mid, 0, 255):
        raise StreamError(f"error answer id must be 0..255 or null, got {mid!r}")
    if code not in ERROR_CODES:
        raise StreamError(f"error answer code {code!r} is not one of {ERROR_CODES}")
    if not isinstance(message, str):
        raise StreamError("error answer message must be a string")
    if isinstance(retry, bool) or not isinstance(retry, int | float) or not 0 <= retry < 86400:
        raise StreamError(f"retry_after_s must be 0..86400, got {retry!r}")
    return Failure(mid, code, message[:500], float(retry))


# ------------------------------------------------------------------------------- framing


def websocket_frame_bytes(payload: int, *, masked: bool) -> int:
    """Bytes one unfragmented WebSocket frame of `payload` bytes takes on TCP (RFC 6455:
    2 header bytes, 2 or 8 more for a length over 125 or 65535, 4 for a client's mask)."""
    extra = 0 if payload < 126 else 2 if payload < 65536 else 8
    return 2 + extra + (4 if masked else 0) + payload


def session_for(
    model: str,
    fingerprint: str,
    code_shape: Sequence[int],
    points: Sequence[tuple[int, int]],
    *,
    dictionary: bool = False,
    timeout_ms: float | None = None,
    timing: bool = False,
) -> Session:
    """A one-sample session for a bundle's operating points (sorted, duplicates dropped);
    `timeout_ms` is rounded up to a whole millisecond."""
    pts = tuple(sorted({(int(k), int(b)) for k, b in points}))
    c, h, w = (int(d) for d in code_shape)
    if timeout_ms is not None:
        timeout_ms = max(1, min(3_600_000, math.ceil(timeout_ms)))
    return Session(
        model, fingerprint.lower(), (c, h, w), pts, 1, dictionary, 0, False, timeout_ms, timing
    )
