"""Bit packing: dense, exact, canonical, and strict about what it accepts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from splitexit.codec.bitpack import pack, packed_size, unpack
from splitexit.errors import FrameError


@st.composite
def values_and_bits(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    bits = draw(st.sampled_from([2, 4, 8]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=7))
    values = draw(
        hnp.arrays(np.uint8, shape, elements=st.integers(0, (1 << bits) - 1)),
    )
    return values, bits


@settings(max_examples=200, deadline=None)
@given(values_and_bits())
def test_unpack_inverts_pack_exactly(case: tuple[np.ndarray, int]) -> None:
    values, bits = case
    data = pack(values, bits)
    assert len(data) == packed_size(values.size, bits) == (values.size * bits + 7) // 8
    out = unpack(data, bits, values.size)
    assert out.dtype == np.uint8 and out.shape == (values.size,)
    np.testing.assert_array_equal(out, values.reshape(-1))


@pytest.mark.parametrize(
    ("values", "bits", "expected"),
    [
        ([1, 2, 3, 0], 2, bytes([1 | 2 << 2 | 3 << 4])),  # first value in the lowest bits
        ([3, 0, 0, 0, 1], 2, bytes([0x03, 0x01])),  # last byte zero-padded
        ([0x1, 0xA, 0xF], 4, bytes([0xA1, 0x0F])),
        ([0, 127, 255], 8, bytes([0, 127, 255])),  # 8 bits: the bytes are the values
    ],
)
def test_pack_layout_is_little_endian_within_a_byte(
    values: list[int], bits: int, expected: bytes
) -> None:
    assert pack(np.array(values, dtype=np.uint8), bits) == expected


def test_pack_accepts_wider_integer_dtypes_in_range() -> None:
    assert pack(np.array([[3, 1]], dtype=np.int64), 2) == bytes([3 | 1 << 2])


def test_unpack_returns_a_writable_array() -> None:
    for bits in (2, 4, 8):
        out = unpack(pack(np.zeros(5, np.uint8), bits), bits, 5)
        out[0] = 1  # torch.from_numpy warns on read-only arrays
        assert out.flags.writeable


def test_empty_input_packs_to_no_bytes() -> None:
    assert pack(np.zeros((0, 3), np.uint8), 4) == b""
    assert unpack(b"", 4, 0).shape == (0,)


@pytest.mark.parametrize(("bits", "bad"), [(2, 4), (4, 16), (4, 255), (2, -1)])
def test_pack_rejects_values_that_do_not_fit(bits: int, bad: int) -> None:
    with pytest.raises(ValueError, match=f"value {bad} does not fit in {bits} bits"):
        pack(np.array([0, bad], dtype=np.int16), bits)


@pytest.mark.parametrize("bits", [0, 1, 3, 16])
def test_unsupported_bit_widths_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        pack(np.zeros(4, np.uint8), bits)
    with pytest.raises(ValueError, match="bits must be 2, 4 or 8"):
        unpack(b"\x00", bits, 1)


def test_pack_rejects_non_integer_arrays() -> None:
    with pytest.raises(ValueError, match="dtype float32"):
        pack(np.zeros(4, np.float32), 8)


@pytest.mark.parametrize(("bits", "count", "length"), [(2, 5, 1), (2, 5, 3), (4, 3, 1), (8, 4, 5)])
def test_unpack_rejects_the_wrong_data_length(bits: int, count: int, length: int) -> None:
    with pytest.raises(FrameError, match=f"packed data is {length} bytes"):
        unpack(bytes(length), bits, count)


def test_unpack_rejects_non_zero_padding() -> None:
    # 3 two-bit values use 6 bits; the top 2 bits of the byte are padding.
    assert unpack(bytes([0b00_11_10_01]), 2, 3).tolist() == [1, 2, 3]
    with pytest.raises(FrameError, match="padding bits"):
        unpack(bytes([0b01_11_10_01]), 2, 3)
