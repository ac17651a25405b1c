"""The frame: the bytes that carry a quantized bottleneck tensor from the head to the tail.

    QuantizedTensor ─ pack(bits) ─ zstd (only if smaller) ─ header + qparams + payload ─► bytes
    bytes ─ read_header ─ check every field, length, crc, fingerprint ─ unzstd ─ unpack ─► Frame

Layout (all integers little-endian):

    offset  size  field
    ──────  ────  ──────────────────────────────────────────────────────────────────────
         0     2  magic b"SX"
         2     1  version (FRAME_VERSION = 1)
         3     1  flags: bit0 payload is zstd-compressed, bit1 with a zstd dictionary;
                  every other bit is 0
         4     8  fingerprint: bytes.fromhex(bundle_fingerprint[:16])
        12     1  bits: 2, 4 or 8
        13     1  reserved, 0
        14     2  n: samples (1..65535)
        16     2  C: bottleneck channels (>= 1)
        18     2  k: channels sent (1..C)
        20     2  H (>= 1)
        22     2  W (>= 1)
        24     4  L: payload length in bytes
        28     4  crc32 of bytes 0..27, then the qparams, then the payload
    ──────  ────  ── end of the 32-byte header ──────────────────────────────────────────
        32    5n  qparams: n records of (scale float32 in (0, MAX_SCALE], zero_point u8
                  <= 2^bits - 1)
     32+5n     L  payload: pack(values [n, k, H, W] in C order, bits), zstd-compressed when
                  that makes it smaller (flag bit0), otherwise raw (L = ceil(n*k*H*W*bits/8))

A decoder trusts nothing: every field is checked before it is used, the decompressed size is
bounded before anything is decompressed or allocated, and whatever goes wrong (including
errors from zstandard, struct or numpy) surfaces as `FrameError`. A frame made by a head with
another fingerprint raises `FingerprintMismatch` (the server answers HTTP 409).
"""

from __future__ import annotations

import math
import re
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from splitexit.bottleneck.quantize import SUPPORTED_BITS, QuantizedTensor
from splitexit.codec.bitpack import pack, packed_size, unpack
from splitexit.errors import FingerprintMismatch, FrameError

MAGIC = b"SX"
FRAME_VERSION = 1
HEADER_SIZE = 32
QPARAM_SIZE = 5
FLAG_ZSTD = 0x01
FLAG_DICTIONARY = 0x02
DEFAULT_MAX_RAW_BYTES = 64 * 2**20
DEFAULT_MAX_SAMPLES = 1024
MAX_SCALE = 2.0**16  # a code value then stands for at most 255 * 2^16: no float32 overflow

_HEADER = struct.Struct("<2sBB8sBBHHHHHII")
_HEADER_NO_CRC = struct.Struct("<2sBB8sBBHHHHHI")
_CRC = struct.Struct("<I")
_QPARAM_DTYPE = np.dtype([("scale", "<f4"), ("zero_point", "u1")])
_U16_MAX = 0xFFFF
_HEX16 = re.compile(r"[0-9a-fA-F]{16}")
_CACHE_LIMIT = 8
assert _HEADER.size == HEADER_SIZE and _QPARAM_DTYPE.itemsize == QPARAM_SIZE

Dictionary = zstandard.ZstdCompressionDict | bytes


@dataclass(frozen=True)
class FrameHeader:
    """The 32-byte header, parsed and validated; `fingerprint` is 16 lowercase hex chars."""

    version: int
    flags: int
    fingerprint: str
    bits: int
    batch_size: int
    channels: int
    sent_channels: int
    height: int
    width: int
    payload_length: int
    crc: int

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)

    @property
    def uses_dictionary(self) -> bool:
        return bool(self.flags & FLAG_DICTIONARY)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Shape [n, k, H, W] of the values the frame carries."""
        return (self.batch_size, self.sent_channels, self.height, self.width)

    @property
    def raw_size(self) -> int:
        """Bytes of the packed, uncompressed payload: ceil(n*k*H*W*bits/8)."""
        return packed_size(math.prod(self.shape), self.bits)

    @property
    def frame_size(self) -> int:
        """Total bytes of the frame this header announces."""
        return HEADER_SIZE + QPARAM_SIZE * self.batch_size + self.payload_length


@dataclass(frozen=True)
class Frame:
    """A decoded frame: its header and the quantized tensor it carried."""

    header: FrameHeader
    tensor: QuantizedTensor


# --------------------------------------------------------------------------------- encoding


def encode_frame(
    qt: QuantizedTensor,
    fingerprint: str,
    *,
    level: int = 3,
    dictionary: Dictionary | None = None,
    compress: bool = True,
) -> bytes:
    """Serialize `qt` into one frame stamped with the bundle's `fingerprint` (hex sha256).

    The payload is zstd-compressed at `level` (with `dictionary`, if given) only when that
    makes it smaller; `compress=False` always sends it raw (cheapest on a weak CPU).
    Raises ValueError if `qt` cannot be represented (see the layout in the module docstring).
    """
    _fingerprint_bytes(fingerprint)
    if qt.bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be 2, 4 or 8, got {qt.bits!r}")
    qt = qt.numpy()  # torch tensors come to the CPU; numpy arrays are used as they are
    values = np.asarray(qt.values)
    if values.dtype != np.uint8 or values.ndim != 4:
        raise ValueError("qt.values must be a uint8 array or tensor of shape [n, k, H, W]")
    n, k, h, w = (int(s) for s in values.shape)
    c = int(qt.channels)
    for name, v in (("n", n), ("C", c), ("k", k), ("H", h), ("W", w)):
        if not 1 <= v <= _U16_MAX:
            raise ValueError(f"{name}={v} does not fit the frame (1..{_U16_MAX})")
    if k > c:
        raise ValueError(f"channels sent k={k} exceeds channels C={c}")
    scale = np.asarray(qt.scale).reshape(-1).astype(np.float32, copy=False)
    zero_point = np.asarray(qt.zero_point).reshape(-1)
    if scale.shape != (n,) or zero_point.shape != (n,):
        raise ValueError(f"scale and zero_point must have shape [{n}], one entry per sample")
    if zero_point.dtype != np.uint8:
        raise ValueError(f"zero_point must be uint8, got {zero_point.dtype}")
    _check_qparams(scale, zero_point, qt.bits, ValueError)

    raw = pack(np.ascontiguousarray(values), qt.bits)
    payload, flags = raw, 0
    if compress:
        squeezed = _compressor(level, dictionary).compress(raw)
        if len(squeezed) < len(raw):
            payload = squeezed
            flags = FLAG_ZSTD | (FLAG_DICTIONARY if dictionary is not None else 0)
    if len(payload) > 0xFFFFFFFF:
        raise ValueError(f"payload of {len(payload)} bytes does not fit the frame's u32 length")

    qparams = np.empty(n, dtype=_QPARAM_DTYPE)
    qparams["scale"] = scale
    qparams["zero_point"] = zero_point
    return assemble_frame(fingerprint, flags, qt.bits, (n, c, k, h, w), qparams.tobytes(), payload)


def assemble_frame(
    fingerprint: str,
    flags: int,
    bits: int,
    shape: tuple[int, int, int, int, int],
    qparams: bytes | memoryview,
    payload: bytes | memoryview,
) -> bytes:
    """A frame from its parts, header and crc computed here: `shape` is (n, C, k, H, W),
    `qparams` the 5n bytes of (scale, zero_point) records, `payload` the (compressed) packed
    values. Nothing is checked: read the result with `read_header` / `decode_frame`, as the
    stream does with the parts its messages carry (`splitexit.protocol.stream`)."""
    head = _HEADER_NO_CRC.pack(
        MAGIC, FRAME_VERSION, flags, _fingerprint_bytes(fingerprint), bits, 0, *shape, len(payload)
    )
    crc = zlib.crc32(payload, zlib.crc32(qparams, zlib.crc32(head)))
    return b"".join((head, _CRC.pack(crc), qparams, payload))


# --------------------------------------------------------------------------------- decoding


def read_header(
    data: bytes | bytearray | memoryview,
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES,
) -> FrameHeader:
    """Parse and validate the 32-byte header only (no crc, no payload): cheap routing.

    `data` may be the whole frame or just its first 32 bytes. Checks magic, version, flags,
    bits, reserved, the shape fields, and the raw size against `max_raw_bytes`; raises
    FrameError saying which field is wrong. `decode_frame` does the rest.
    """
    view = memoryview(data).cast("B")
    try:
        return _parse_header(view, max_samples, max_raw_bytes)
    except FrameError:
        raise
    except Exception as e:  # anything else is a bug in a check; still a bad frame to callers
        raise FrameError(f"malformed frame header: {type(e).__name__}: {e}") from e


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    expected_fingerprint: str | Iterable[str] | None = None,
    dictionary: Dictionary | None = None,
    max_raw_bytes: int = DEFAULT_MAX_RAW_BYTES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> Frame:
    """Validate and decode one frame.

    Raises FingerprintMismatch if `expected_fingerprint` (one hex fingerprint or several) is
    given and the frame's differs, and FrameError for anything else wrong with the bytes.
    A frame compressed with a dictionary needs the same `dictionary` here.
    """
    wanted = _expected_prefixes(expected_fingerprint)
    view = memoryview(data).cast("B")
    try:
        return _decode(view, wanted, expected_fingerprint, dictionary, max_raw_bytes, max_samples)
    except FrameError:
        raise
    except Exception as e:
        raise FrameError(f"malformed frame: {type(e).__name__}: {e}") from e


def _parse_header(view: memoryview, max_samples: int, max_raw_bytes: int) -> FrameHeader:
    if len(view) < HEADER_SIZE:
        raise FrameError(f"frame is {len(view)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, flags, fp, bits, reserved, n, c, k, h, w, length, crc = _HEADER.unpack_from(
        view
    )
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: not a splitexit frame")
    if version != FRAME_VERSION:
        raise FrameError(
            f"frame version {version} is not supported (this splitexit reads version "
            f"{FRAME_VERSION}); run the same splitexit release on the device and the server"
        )
    if flags & ~(FLAG_ZSTD | FLAG_DICTIONARY):
        raise FrameError(f"unknown flag bits 0x{flags & ~3:02x} set (flags=0x{flags:02x})")
    if flags & FLAG_DICTIONARY and not flags & FLAG_ZSTD:
        raise FrameError("flag bit1 (zstd dictionary) is set without bit0 (zstd-compressed)")
    if bits not in SUPPORTED_BITS:
        raise FrameError(f"bits must be 2, 4 or 8, got {bits}")
    if reserved != 0:
        raise FrameError(f"reserved byte must be 0, got {reserved}")
    if not 1 <= n <= max_samples:
        raise FrameError(f"sample count n={n} is outside 1..{max_samples} (max_samples)")
    if c < 1:
        raise FrameError("channels C must be >= 1, got 0")
    if k < 1:
        raise FrameError("channels sent k must be >= 1, got 0")
    if k > c:
        raise FrameError(f"channels sent k={k} exceeds channels C={c}")
    if h < 1 or w < 1:
        raise FrameError(f"height and width must be >= 1, got H={h}, W={w}")
    header = FrameHeader(FRAME_VERSION, flags, bytes(fp).hex(), bits, n, c, k, h, w, length, crc)
    raw = header.raw_size
    if raw > max_raw_bytes:
        raise FrameError(
            f"frame claims {n}x{k}x{h}x{w} values at {bits} bits = {raw} bytes, more than "
            f"max_raw_bytes={max_raw_bytes}; refused before decompressing"
        )
    if not header.compressed and length != raw:
        raise FrameError(f"raw payload length {length} != {raw} bytes for shape {header.shape}")
    if header.compressed and not 0 < length < raw:
        raise FrameError(
            f"zstd payload length {length} is not in 1..{raw - 1}: a compressed payload must "
            f"be smaller than the {raw}-byte raw one (encoders send it raw otherwise)"
        )
    return header


def _decode(
    view: memoryview,
    wanted: set[str] | None,
    expected: str | Iterable[str] | None,
    dictionary: Dictionary | None,
    max_raw_bytes: int,
    max_samples: int,
) -> Frame:
    header = _parse_header(view, max_samples, max_raw_bytes)
    if len(view) != header.frame_size:
        raise FrameError(
            f"frame is {len(view)} bytes, but its header announces {HEADER_SIZE} + "
            f"{QPARAM_SIZE}*{header.batch_size} + {header.payload_length} = {header.frame_size}"
        )
    crc = zlib.crc32(view[HEADER_SIZE:], zlib.crc32(view[: HEADER_SIZE - 4]))
    if crc != header.crc:
        raise FrameError(
            f"crc32 mismatch (header 0x{header.crc:08x}, content 0x{crc:08x}): "
            "the frame was corrupted or truncated in transit"
        )
    if wanted is not None and header.fingerprint not in wanted:
        assert expected is not None
        raise FingerprintMismatch(
            header.fingerprint, expected if isinstance(expected, str) else list(expected)
        )

    n = header.batch_size
    qparams = np.frombuffer(view, dtype=_QPARAM_DTYPE, count=n, offset=HEADER_SIZE)
    scale = qparams["scale"].astype(np.float32)  # native-endian copy
    zero_point = qparams["zero_point"].copy()
    _check_qparams(scale, zero_point, header.bits, FrameError)

    body = view[HEADER_SIZE + QPARAM_SIZE * n :]
    payload = _decompress(body, header, dictionary) if header.compressed else body
    values = unpack(payload, header.bits, math.prod(header.shape)).reshape(header.shape)
    import torch  # decoded codes go to a torch tail (the server); framing needs no torch

    tensor = QuantizedTensor(
        values=torch.from_numpy(values),
        scale=torch.from_numpy(scale),
        zero_point=torch.from_numpy(zero_point),
        bits=header.bits,
        channels=header.channels,
    )
    return Frame(header=header, tensor=tensor)


def _decompress(payload: memoryview, header: FrameHeader, dictionary: Dictionary | None) -> bytes:
    if header.uses_dictionary and dictionary is None:
        raise FrameError(
            "frame was compressed with a zstd dictionary but none was given to the decoder; "
            "load the bundle's dictionary"
        )
    raw = header.raw_size
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError as e:
        raise FrameError(f"payload is not a zstd frame: {e}") from e
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        raise FrameError("zstd payload does not declare its content size")
    if declared != raw:
        raise FrameError(f"zstd payload declares {declared} bytes, the header implies {raw}")
    dctx = _decompressor(dictionary if header.uses_dictionary else None)
    try:
        out = dctx.decompress(payload, max_output_size=raw, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise FrameError(f"zstd payload does not decompress: {e}") from e
    if len(out) != raw:
        raise FrameError(f"zstd payload decompressed to {len(out)} bytes, expected {raw}")
    return out


def _check_qparams(
    scale: np.ndarray, zero_point: np.ndarray, bits: int, error: type[ValueError]
) -> None:
    bad = ~(np.isfinite(scale) & (scale > 0) & (scale <= MAX_SCALE))
    if bad.any():
        i = int(np.argmax(bad))
        raise error(
            f"scale of sample {i} is {scale[i]}, must be finite, > 0 and <= {MAX_SCALE:g} "
            "(MAX_SCALE): larger ones overflow when dequantized"
        )
    qmax = (1 << bits) - 1
    if zero_point.size and int(zero_point.max()) > qmax:
        i = int(np.argmax(zero_point > qmax))
        raise error(f"zero_point of sample {i} is {zero_point[i]}, exceeds {qmax} for {bits} bits")


# ------------------------------------------------------------------------------ fingerprint


def _fingerprint_bytes(fingerprint: str) -> bytes:
    if not isinstance(fingerprint, str) or not _HEX16.fullmatch(fingerprint[:16]):
        raise ValueError(
            f"fingerprint must be a hex string of at least 16 characters, got {fingerprint!r}"
        )
    return bytes.fromhex(fingerprint[:16])


def _expected_prefixes(expected: str | Iterable[str] | None) -> set[str] | None:
    if expected is None:
        return None
    items = [expected] if isinstance(expected, str) else list(expected)
    return {_fingerprint_bytes(fp).hex() for fp in items}


# ------------------------------------------------------------------------- zstd contexts
# zstandard's (de)compressor objects must not be used by two threads at once. A cached
# object per thread costs ~2-4 µs per small frame against ~10-17 µs to build one per call
# (measured with zstandard 0.25), so each thread keeps its own, keyed by level and by the
# dictionary object (held in the entry, so its id cannot be reused while cached).

_local = threading.local()


def _cache(name: str) -> dict[Any, Any]:
    cache: dict[Any, Any] = _local.__dict__.setdefault(name, {})
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    return cache


def _as_dict(dictionary: Dictionary) -> zstandard.ZstdCompressionDict:
    if isinstance(dictionary, zstandard.ZstdCompressionDict):
        return dictionary
    return zstandard.ZstdCompressionDict(bytes(dictionary))


def _compressor(level: int, dictionary: Dictionary | None) -> zstandard.ZstdCompressor:
    cache = _cache("compressors")
    key = (level, id(dictionary))
    entry = cache.get(key)
    if entry is None or entry[0] is not dictionary:
        cctx = zstandard.ZstdCompressor(
            level=level,
            write_checksum=False,
            write_content_size=True,
            write_dict_id=False,
            dict_data=None if dictionary is None else _as_dict(dictionary),
        )
        entry = cache[key] = (dictionary, cctx)
    return entry[1]


def _decompressor(dictionary: Dictionary | None) -> zstandard.ZstdDecompressor:
    cache = _cache("decompressors")
    key = id(dictionary)
    entry = cache.get(key)
    if entry is None or entry[0] is not dictionary:
        dctx = zstandard.ZstdDecompressor(
            dict_data=None if dictionary is None else _as_dict(dictionary)
        )
        entry = cache[key] = (dictionary, dctx)
    return entry[1]


# ------------------------------------------------------------------------------ dictionary


def train_dictionary(
    samples: Iterable[QuantizedTensor | bytes | bytearray | memoryview], size: int = 4096
) -> zstandard.ZstdCompressionDict:
    """Train a zstd dictionary for frame payloads from representative samples.

    Each sample is either a `QuantizedTensor` (each of its n samples is packed and used as one
    training sample) or the bytes of an already packed payload, i.e. `pack(values, bits)`
    (uncompressed; not a whole frame). Use tensors produced by the same bundle, bit-width and
    channel count as the frames it will compress; a few hundred samples is typical. Pass the
    result as `dictionary=` to both `encode_frame` and `decode_frame`.
    """
    payloads: list[bytes | bytearray | memoryview] = []
    for s in samples:
        if isinstance(s, QuantizedTensor):
            values = s.values.detach().cpu().contiguous().numpy()
            payloads.extend(pack(v, s.bits) for v in values)
        else:
            payloads.append(bytes(s))
    try:
        return zstandard.train_dictionary(size, payloads)
    except zstandard.ZstdError as e:
        raise ValueError(
            f"could not train a {size}-byte dictionary from {len(payloads)} samples "
            f"({sum(map(len, payloads))} bytes): {e}; give more or larger samples"
        ) from e
