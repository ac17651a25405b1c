"""The frame wire format: exact round trips, and nothing but FrameError from bad bytes."""

from __future__ import annotations

import math
import re
import struct
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from splitexit.bottleneck.quantize import QuantizedTensor, quantize
from splitexit.codec import (
    FRAME_VERSION,
    HEADER_SIZE,
    MAX_SCALE,
    QPARAM_SIZE,
    decode_frame,
    encode_frame,
    pack,
    read_header,
    train_dictionary,
)
from splitexit.errors import FingerprintMismatch, FrameError

FP = "0123456789abcdef" + "55" * 24  # a bundle's hex sha256 fingerprint
OTHER_FP = "fedcba9876543210" + "aa" * 24
HEADER = struct.Struct("<2sBB8sBBHHHHHII")  # the layout, restated from the spec
EXAMPLES = settings(max_examples=200, deadline=None)


def smooth_field(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """ReLU'd, spatially smooth random features: compressible, like a real bottleneck."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, c, h // 4 + 2, w // 4 + 2, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return torch.relu(x)


def smooth_qt(
    n: int = 2, c: int = 8, k: int = 6, h: int = 7, w: int = 7, bits: int = 4, seed: int = 0
) -> QuantizedTensor:
    return quantize(smooth_field(n, k, h, w, seed), bits, channels=c)


def noise_qt(n: int = 1, k: int = 2, h: int = 3, w: int = 3, bits: int = 8) -> QuantizedTensor:
    g = torch.Generator().manual_seed(1)
    return quantize(torch.randn(n, k, h, w, generator=g), bits)


def forge(
    *,
    magic: bytes = b"SX",
    version: int = FRAME_VERSION,
    flags: int = 0,
    fp: bytes = bytes.fromhex(FP[:16]),
    bits: int = 8,
    reserved: int = 0,
    n: int = 1,
    c: int = 2,
    k: int = 2,
    h: int = 2,
    w: int = 2,
    qparams: bytes | None = None,
    payload: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """Build a frame field by field, straight from the spec, with a correct crc."""
    if qparams is None:
        qparams = struct.pack("<fB", 0.5, 0) * n
    if payload is None:
        payload = bytes((n * k * h * w * bits + 7) // 8)
    length = len(payload) if length is None else length
    head = HEADER.pack(magic, version, flags, fp, bits, reserved, n, c, k, h, w, length, 0)[:28]
    crc = zlib.crc32(head + qparams + payload)
    return head + struct.pack("<I", crc) + qparams + payload


def assert_same_tensor(got: QuantizedTensor, want: QuantizedTensor) -> None:
    assert got.values.dtype == torch.uint8 and got.values.shape == want.values.shape
    assert torch.equal(got.values, want.values)
    assert got.scale.dtype == torch.float32 and torch.equal(got.scale, want.scale.float())
    assert got.zero_point.dtype == torch.uint8 and torch.equal(got.zero_point, want.zero_point)
    assert (got.bits, got.channels) == (want.bits, want.channels)


@st.composite
def quantized_tensors(draw: st.DrawFn) -> QuantizedTensor:
    bits = draw(st.sampled_from([2, 4, 8]))
    n, c = draw(st.integers(1, 4)), draw(st.integers(1, 8))
    k, h, w = draw(st.integers(1, c)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    qmax = (1 << bits) - 1
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    high = draw(st.sampled_from([1, 2, qmax + 1]))  # low-entropy draws exercise zstd
    values = rng.integers(0, min(high, qmax + 1), size=(n, k, h, w), dtype=np.uint8)
    positive = st.floats(min_value=0, max_value=MAX_SCALE, exclude_min=True, width=32)
    scale = draw(st.lists(positive, min_size=n, max_size=n))
    zero_point = draw(st.lists(st.integers(0, qmax), min_size=n, max_size=n))
    return QuantizedTensor(
        values=torch.from_numpy(values),
        scale=torch.tensor(scale, dtype=torch.float32),
        zero_point=torch.tensor(zero_point, dtype=torch.uint8),
        bits=bits,
        channels=c,
    )


@pytest.fixture(scope="module")
def dictionary() -> zstandard.ZstdCompressionDict:
    return train_dictionary([smooth_qt(n=1, seed=s) for s in range(100)], size=1024)


# ------------------------------------------------------------------------------ round trip


@EXAMPLES
@given(qt=quantized_tensors(), compress=st.booleans())
def test_round_trip_is_exact(qt: QuantizedTensor, compress: bool) -> None:
    frame = decode_frame(encode_frame(qt, FP, compress=compress), expected_fingerprint=FP)
    assert_same_tensor(frame.tensor, qt)
    h = frame.header
    assert (h.version, h.fingerprint, h.bits) == (FRAME_VERSION, FP[:16], qt.bits)
    assert h.shape == tuple(qt.values.shape) and h.channels == qt.channels
    assert h.compressed == bool(h.flags & 1) and (compress or not h.compressed)


@EXAMPLES
@given(qt=quantized_tensors())
def test_frame_is_never_larger_than_header_qparams_and_raw_payload(qt: QuantizedTensor) -> None:
    raw = math.ceil(qt.values.numel() * qt.bits / 8)
    assert len(encode_frame(qt, FP)) <= HEADER_SIZE + QPARAM_SIZE * qt.batch_size + raw


def test_tiny_frame_falls_back_to_a_raw_payload() -> None:
    qt = noise_qt(n=1, k=1, h=1, w=1)
    data = encode_frame(qt, FP)
    assert len(data) == HEADER_SIZE + QPARAM_SIZE + 1 and data[3] == 0  # flags: raw


def test_compressible_frame_is_zstd_compressed() -> None:
    qt = smooth_qt(n=2, k=8, h=14, w=14, bits=4)
    data = encode_frame(qt, FP)
    header = read_header(data)
    assert header.compressed and not header.uses_dictionary
    assert header.payload_length < header.raw_size
    assert_same_tensor(decode_frame(data).tensor, qt)


def test_compress_false_sends_the_payload_raw() -> None:
    qt = smooth_qt(n=2, k=8, h=14, w=14, bits=4)
    header = read_header(encode_frame(qt, FP, compress=False))
    assert header.flags == 0 and header.payload_length == header.raw_size


def test_round_trip_with_a_dictionary(dictionary: zstandard.ZstdCompressionDict) -> None:
    for seed in range(200, 210):
        qt = smooth_qt(n=1, seed=seed)
        data = encode_frame(qt, FP, dictionary=dictionary)
        assert read_header(data).flags == 0b11  # zstd + dictionary
        assert len(data) < len(encode_frame(qt, FP))  # the dictionary is worth having
        assert_same_tensor(decode_frame(data, dictionary=dictionary).tensor, qt)
        # the same dictionary as plain bytes works on either side
        raw_dict = dictionary.as_bytes()
        assert_same_tensor(decode_frame(data, dictionary=raw_dict).tensor, qt)
        assert encode_frame(qt, FP, dictionary=raw_dict) == data


def test_dictionary_frame_without_the_dictionary_is_refused(dictionary) -> None:
    data = encode_frame(smooth_qt(n=1, seed=300), FP, dictionary=dictionary)
    with pytest.raises(FrameError, match="compressed with a zstd dictionary but none was given"):
        decode_frame(data)


def test_train_dictionary_accepts_packed_payloads() -> None:
    payloads = [pack(smooth_qt(n=1, seed=s).values.numpy(), 4) for s in range(100)]
    d = train_dictionary(payloads, size=1024)
    qt = smooth_qt(n=1, seed=500)
    assert_same_tensor(decode_frame(encode_frame(qt, FP, dictionary=d), dictionary=d).tensor, qt)


def test_header_is_the_documented_32_byte_layout() -> None:
    qt = noise_qt(n=3, k=2, h=3, w=5, bits=8)
    data = encode_frame(qt, FP, compress=False)
    magic, version, flags, fp, bits, reserved, n, c, k, h, w, length, crc = HEADER.unpack_from(data)
    assert (magic, version, flags, fp.hex(), bits, reserved) == (b"SX", 1, 0, FP[:16], 8, 0)
    assert (n, c, k, h, w, length) == (3, 2, 2, 3, 5, 3 * 2 * 3 * 5)
    qparams = data[HEADER_SIZE : HEADER_SIZE + 3 * QPARAM_SIZE]
    scale_zp = [struct.unpack_from("<fB", qparams, 5 * i) for i in range(3)]
    assert [s for s, _ in scale_zp] == qt.scale.tolist()
    assert [z for _, z in scale_zp] == qt.zero_point.tolist()
    assert data[HEADER_SIZE + 15 :] == qt.values.numpy().tobytes()
    assert crc == zlib.crc32(data[:28] + data[32:])


def test_read_header_needs_only_the_first_32_bytes() -> None:
    data = encode_frame(smooth_qt(), FP)
    assert read_header(data[:HEADER_SIZE]) == decode_frame(data).header


def test_decode_accepts_bytearray_and_memoryview() -> None:
    qt = smooth_qt()
    data = encode_frame(qt, FP)
    assert_same_tensor(decode_frame(bytearray(data)).tensor, qt)
    assert_same_tensor(decode_frame(memoryview(data)).tensor, qt)


def test_concurrent_threads_encode_and_decode_correctly() -> None:
    tensors = [smooth_qt(n=1, k=8, h=14, w=14, seed=s) for s in range(32)]

    def roundtrip(qt: QuantizedTensor) -> bool:
        return all(
            torch.equal(decode_frame(encode_frame(qt, FP, level=lvl)).tensor.values, qt.values)
            for lvl in (1, 3)
            for _ in range(10)
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(roundtrip, tensors))


# ---------------------------------------------------------------------------- fingerprint


def test_a_frame_from_another_bundle_raises_fingerprint_mismatch_naming_both() -> None:
    data = encode_frame(smooth_qt(), OTHER_FP)
    with pytest.raises(FingerprintMismatch) as info:
        decode_frame(data, expected_fingerprint=FP)
    assert info.value.got == OTHER_FP[:16] and info.value.expected == FP
    assert OTHER_FP[:16] in str(info.value) and FP in str(info.value)
    assert isinstance(info.value, FrameError)


def test_expected_fingerprint_may_be_a_prefix_or_several() -> None:
    data = encode_frame(smooth_qt(), FP)
    decode_frame(data, expected_fingerprint=FP[:16])
    decode_frame(data, expected_fingerprint=FP.upper())
    decode_frame(data, expected_fingerprint=[OTHER_FP, FP])
    with pytest.raises(FingerprintMismatch) as info:
        decode_frame(data, expected_fingerprint=(OTHER_FP, "ab" * 32))
    assert info.value.expected == [OTHER_FP, "ab" * 32]


@pytest.mark.parametrize("fp", ["", "0123", "0123456789abcdeg", "01 23456789abcdef0"])
def test_encoder_refuses_a_malformed_fingerprint(fp: str) -> None:
    with pytest.raises(ValueError, match="fingerprint must be a hex string"):
        encode_frame(smooth_qt(), fp)


# ------------------------------------------------------------------- invalid encoder input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scale": torch.tensor([float("nan")])}, "scale of sample 0 is nan"),
        ({"scale": torch.tensor([0.0])}, "scale of sample 0 is 0.0"),
        ({"scale": torch.tensor([1e30])}, "scale of sample 0 is .*e\\+30"),
        ({"zero_point": torch.tensor([16], dtype=torch.uint8)}, "exceeds 15 for 4 bits"),
        ({"channels": 1}, "channels sent k=2 exceeds channels C=1"),
        ({"bits": 3}, "bits must be 2, 4 or 8, got 3"),
        ({"values": torch.full((1, 2, 2, 2), 16, dtype=torch.uint8)}, "does not fit in 4 bits"),
        ({"scale": torch.ones(2)}, r"must have shape \[1\]"),
    ],
)
def test_encoder_refuses_a_tensor_the_decoder_would_reject(change: dict, message: str) -> None:
    fields = {
        "values": torch.zeros((1, 2, 2, 2), dtype=torch.uint8),
        "scale": torch.ones(1),
        "zero_point": torch.zeros(1, dtype=torch.uint8),
        "bits": 4,
        "channels": 2,
    }
    with pytest.raises(ValueError, match=message):
        encode_frame(QuantizedTensor(**(fields | change)), FP)


# ------------------------------------------------------------------------ hostile input


def test_the_forge_helper_builds_valid_frames() -> None:
    frame = decode_frame(forge(n=2, bits=2, c=3, k=3, h=1, w=3))
    assert frame.header.shape == (2, 3, 1, 3) and frame.header.raw_size == 5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"magic": b"XS"}, "bad magic b'XS'"),
        ({"version": 2}, "frame version 2 is not supported"),
        ({"flags": 0x04}, "unknown flag bits 0x04"),
        ({"flags": 0x02}, r"bit1 \(zstd dictionary\) is set without bit0"),
        ({"bits": 3}, "bits must be 2, 4 or 8, got 3"),
        ({"reserved": 1}, "reserved byte must be 0, got 1"),
        ({"n": 0}, "sample count n=0 is outside 1..1024"),
        ({"n": 1025, "qparams": b""}, "sample count n=1025 is outside 1..1024"),
        ({"c": 0, "k": 0}, "channels C must be >= 1"),
        ({"k": 0}, "channels sent k must be >= 1"),
        ({"c": 8, "k": 9}, "channels sent k=9 exceeds channels C=8"),
        ({"h": 0}, "height and width must be >= 1, got H=0"),
        ({"w": 0}, "got H=2, W=0"),
        ({"length": 7}, "raw payload length 7 != 8 bytes"),
        ({"payload": bytes(9)}, "raw payload length 9 != 8 bytes"),
        ({"flags": 1, "payload": bytes(8)}, "zstd payload length 8 is not in 1..7"),
        ({"flags": 1, "payload": b""}, "zstd payload length 0 is not in 1..7"),
        ({"flags": 1, "payload": b"garbage"}, "payload is not a zstd frame"),
        ({"qparams": struct.pack("<fB", float("inf"), 0)}, "scale of sample 0 is inf"),
        ({"qparams": struct.pack("<fB", -1.0, 0)}, "scale of sample 0 is -1.0"),
        ({"qparams": struct.pack("<fB", 0.0, 0)}, "scale of sample 0 is 0.0"),
        ({"qparams": struct.pack("<fB", 1e38, 0)}, "scale of sample 0 is .*e\\+37.*MAX_SCALE"),
        ({"qparams": struct.pack("<fB", 65536.5, 0)}, "scale of sample 0 is 65536.5"),
        ({"qparams": struct.pack("<fB", 1.0, 4), "bits": 2}, "zero_point of sample 0 is 4"),
        ({"qparams": b""}, "frame is 40 bytes, but its header announces 32 \\+ 5\\*1 \\+ 8"),
    ],
)
def test_each_bad_field_is_named(fields: dict, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_frame(forge(**fields))


def test_a_short_frame_says_how_short() -> None:
    with pytest.raises(FrameError, match="frame is 20 bytes, shorter than the 32-byte header"):
        read_header(bytes(20))


def test_read_header_checks_fields_without_the_payload() -> None:
    with pytest.raises(FrameError, match="channels sent k=9 exceeds channels C=8"):
        read_header(forge(c=8, k=9)[:HEADER_SIZE])


def test_a_wrong_crc_is_detected() -> None:
    data = bytearray(forge())
    data[28] ^= 0xFF
    with pytest.raises(FrameError, match="crc32 mismatch"):
        decode_frame(bytes(data))


@EXAMPLES
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError):
        decode_frame(data)


@EXAMPLES
@given(st.binary(min_size=0, max_size=300), st.sampled_from([0, 1, 2, 3]))
def test_random_bytes_after_a_plausible_header_only_raise_frame_error(tail: bytes, flags) -> None:
    with pytest.raises(FrameError):
        decode_frame(b"SX\x01" + bytes([flags]) + tail)


VALID_FRAMES = {
    "raw": encode_frame(noise_qt(n=2, k=2, h=3, w=3, bits=4), FP),
    "zstd": encode_frame(smooth_qt(n=2, k=4, h=8, w=8, bits=4), FP),
}


@pytest.mark.parametrize("kind", VALID_FRAMES)
def test_every_truncation_and_extension_raises_frame_error(kind: str) -> None:
    data = VALID_FRAMES[kind]
    assert read_header(data).compressed == (kind == "zstd")
    for cut in range(len(data)):
        with pytest.raises(FrameError):
            decode_frame(data[:cut])
    with pytest.raises(FrameError, match="but its header announces"):
        decode_frame(data + b"\x00")


@pytest.mark.parametrize("kind", VALID_FRAMES)
def test_every_single_bit_flip_is_detected_as_corruption(kind: str) -> None:
    data = VALID_FRAMES[kind]
    decode_frame(data, expected_fingerprint=FP)
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(FrameError) as info:
            decode_frame(bytes(flipped), expected_fingerprint=FP)
        # corruption, including in the fingerprint field, is never reported as a 409
        assert type(info.value) is FrameError, (bit, info.value)


def with_fixed_crc(data: bytes) -> bytes:
    return data[:28] + struct.pack("<I", zlib.crc32(data[:28] + data[32:])) + data[32:]


@EXAMPLES
@given(
    kind=st.sampled_from(list(VALID_FRAMES)),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_corruption_behind_a_valid_crc_only_raises_frame_error(kind: str, edits: list) -> None:
    # A forger who recomputes the crc reaches the qparam, zstd and unpacking checks.
    data = bytearray(VALID_FRAMES[kind])
    for pos, byte in edits:
        data[pos % len(data)] = byte
    try:
        frame = decode_frame(with_fixed_crc(bytes(data)))
    except FrameError:
        return
    assert frame.header.shape == tuple(frame.tensor.values.shape)
    assert int(frame.tensor.values.max()) < 1 << frame.header.bits


def test_a_decompression_bomb_header_is_refused_before_any_allocation() -> None:
    huge = forge(n=1024, c=65535, k=65535, h=65535, w=65535, flags=1, payload=b"\x28\xb5\x2f\xfd")
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(FrameError, match=r"more than max_raw_bytes=67108864; refused before"):
        decode_frame(huge, max_samples=1024)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 1 << 20


def test_max_raw_bytes_is_enforced_exactly() -> None:
    data = forge(n=1, c=4, k=4, h=4, w=4)  # 64 raw bytes
    assert decode_frame(data, max_raw_bytes=64).header.raw_size == 64
    with pytest.raises(FrameError, match="= 64 bytes, more than max_raw_bytes=63"):
        decode_frame(data, max_raw_bytes=63)


def test_a_zstd_payload_declaring_a_larger_content_size_is_not_decompressed() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(8 * 2**20))  # 8 MiB of zeros
    header_says = 100 * 100
    assert len(bomb) < header_says
    data = forge(flags=1, n=1, c=1, k=1, h=100, w=100, payload=bomb)
    with pytest.raises(FrameError, match=f"declares {8 * 2**20} bytes, the header implies 10000"):
        decode_frame(data)


def test_a_zstd_payload_without_a_content_size_is_refused() -> None:
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64))
    with pytest.raises(FrameError, match="does not declare its content size"):
        decode_frame(forge(flags=1, c=4, k=4, h=4, w=4, payload=payload))


def test_a_zstd_payload_whose_content_size_lies_is_refused() -> None:
    content = bytes(range(150)) * 2  # 300 bytes, compressible
    payload = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(content))
    descriptor = payload[4]
    assert descriptor >> 6 == 1 and descriptor & 0x20  # 2-byte size field, single segment
    fcs = 5  # no window descriptor in a single-segment frame, no dictionary id
    declared = struct.unpack_from("<H", payload, fcs)[0] + 256
    assert declared == 300
    struct.pack_into("<H", payload, fcs, 301 - 256)  # now claims 301
    data = forge(flags=1, c=1, k=1, h=1, w=301, payload=bytes(payload))
    with pytest.raises(FrameError, match="zstd payload"):
        decode_frame(data)


def test_a_zstd_payload_with_trailing_data_is_refused() -> None:
    one = zstandard.ZstdCompressor().compress(bytes(200))
    data = forge(flags=1, c=1, k=1, h=1, w=200, payload=one + one)
    with pytest.raises(FrameError, match="does not decompress"):
        decode_frame(data)


def test_invalid_expected_fingerprint_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match=re.escape("got 'nope'")):
        decode_frame(forge(), expected_fingerprint="nope")
