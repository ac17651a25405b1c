"""Dense packing of 2-, 4- and 8-bit unsigned integers into bytes.

    values (uint8, each < 2**bits) ─ flatten (C order) ─ pack ─ bytes ─ unpack ─ values

With `bits` = 2 or 4, 8 // bits values share one byte, the first value in the lowest bits
(little-endian within the byte):

    bits=2:  byte = v0 | v1 << 2 | v2 << 4 | v3 << 6
    bits=4:  byte = v0 | v1 << 4

The last byte is zero-padded; `unpack` refuses non-zero padding so that every value array has
exactly one encoding. With `bits` = 8 the bytes are the values. Everything is vectorised; the
only Python loop runs over the (at most 4) positions within a byte.
"""

from __future__ import annotations

import numpy as np

from splitexit.errors import FrameError

PACKABLE_BITS = (2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be 2, 4 or 8, got {bits!r}")
    return bits


def packed_size(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits take once packed: ceil(count * bits / 8)."""
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (count * bits + 7) // 8


def pack(values: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integers (any shape, C order) into ceil(size * bits / 8) bytes.

    Raises ValueError if `bits` is not 2, 4 or 8, `values` is not an integer array, or a value
    lies outside [0, 2**bits - 1].
    """
    _check_bits(bits)
    values = np.asarray(values)
    if values.dtype.kind not in "ui":
        raise ValueError(f"values must be an unsigned integer array, got dtype {values.dtype}")
    flat = values.reshape(-1)
    if flat.size:
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi > (1 << bits) - 1:
            bad = lo if lo < 0 else hi
            raise ValueError(f"value {bad} does not fit in {bits} bits (0..{(1 << bits) - 1})")
    flat = flat.astype(np.uint8, copy=False)
    if bits == 8:
        return flat.tobytes()
    per_byte = 8 // bits
    pad = -flat.size % per_byte
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, dtype=np.uint8)])
    groups = flat.reshape(-1, per_byte)
    out = groups[:, 0].copy()
    for i in range(1, per_byte):
        out |= groups[:, i] << np.uint8(i * bits)
    return out.tobytes()


def unpack(data: bytes | bytearray | memoryview, bits: int, count: int) -> np.ndarray:
    """Unpack `count` `bits`-bit values from `data`; returns a new writable uint8 array [count].

    Raises ValueError for a bad `bits` or negative `count` (caller errors) and FrameError when
    `data` is not exactly ceil(count * bits / 8) bytes or its padding bits are not zero (bad
    input).
    """
    expected = packed_size(count, bits)
    buf = np.frombuffer(data, dtype=np.uint8)
    if buf.size != expected:
        raise FrameError(
            f"packed data is {buf.size} bytes, expected {expected} for {count} {bits}-bit values"
        )
    if bits == 8:
        return buf.copy()
    per_byte = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    out: np.ndarray = np.empty((buf.size, per_byte), dtype=np.uint8)
    for i in range(per_byte):
        np.bitwise_and(buf >> np.uint8(i * bits), mask, out=out[:, i])
    out = out.reshape(-1)
    if out.size > count and out[count:].any():
        raise FrameError(f"padding bits after the last of {count} {bits}-bit values are not zero")
    return out[:count]
