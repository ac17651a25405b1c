"""The bottleneck's training and deployment faces agree, per sample, for every (k, bits)."""

import pytest
import torch

from splitexit.bottleneck import (
    Bottleneck,
    dequantize,
    fake_quantize,
    quantize,
    zero_fill,
)


@pytest.fixture
def bottleneck() -> Bottleneck:
    torch.manual_seed(0)
    return Bottleneck((32, 14, 14), channels=6, hidden=16, downsample=1).eval()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_values_lie_in_range_and_dequantize_is_close(bits: int) -> None:
    x = torch.randn(5, 3, 4, 4) * torch.arange(1, 6).view(5, 1, 1, 1)
    qt = quantize(x, bits)
    assert qt.values.dtype == torch.uint8
    assert int(qt.values.max()) <= 2**bits - 1
    err = (dequantize(qt) - x).abs().amax(dim=(1, 2, 3))
    assert torch.all(err <= qt.scale / 2 + 1e-6)


def test_quantization_is_per_sample_not_per_batch() -> None:
    torch.manual_seed(1)
    a, b = torch.randn(1, 4, 3, 3), 100 * torch.randn(1, 4, 3, 3)
    alone = quantize(a, 4)
    batched = quantize(torch.cat([a, b]), 4)
    assert torch.equal(batched.values[:1], alone.values)
    assert torch.equal(batched.scale[:1], alone.scale)


def test_zero_is_exact_and_constant_input_does_not_divide_by_zero() -> None:
    x = torch.zeros(2, 2, 3, 3)
    x[1] = 0.5
    xq = dequantize(quantize(x, 2))
    assert torch.equal(xq[0], x[0])
    assert torch.allclose(xq[1], x[1])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_equals_deployed_round_trip_and_passes_gradient(bits: int) -> None:
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    y = fake_quantize(x, bits)
    assert torch.equal(y.detach(), dequantize(quantize(x.detach(), bits)))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_unsupported_bits_are_refused() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize(torch.randn(1, 1, 2, 2), 3)


def test_decoder_restores_split_point_shape_for_odd_sizes() -> None:
    b = Bottleneck((24, 7, 7), channels=4, hidden=8, downsample=1)
    assert b.code_shape() == (4, 4, 4)
    assert b(torch.randn(2, 24, 7, 7), bits=4).shape == (2, 24, 7, 7)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("keep", [1, 3, 6])
def test_encode_decode_matches_training_forward(bottleneck: Bottleneck, bits: int, keep: int):
    f = torch.randn(3, 32, 14, 14)
    qt = bottleneck.encode(f, bits, keep)
    assert qt.values.shape == (3, keep, 7, 7) and qt.channels == 6
    with torch.no_grad():
        trained_view = bottleneck(f, bits=bits, keep=keep)
    torch.testing.assert_close(bottleneck.decode(qt), trained_view)


def test_missing_channels_are_zero_filled() -> None:
    z = torch.ones(2, 3, 2, 2)
    full = zero_fill(z, 5)
    assert full.shape == (2, 5, 2, 2)
    assert torch.equal(full[:, 3:], torch.zeros(2, 2, 2, 2))
    with pytest.raises(ValueError):
        zero_fill(z, 2)


def test_keep_out_of_range_is_refused(bottleneck: Bottleneck) -> None:
    with pytest.raises(ValueError, match="keep"):
        bottleneck.encode(torch.randn(1, 32, 14, 14), 4, keep=7)


def test_per_sample_operating_points_match_one_pass_per_point(bottleneck: Bottleneck) -> None:
    torch.manual_seed(2)
    f = torch.randn(4, 32, 14, 14)
    bits = torch.tensor([2, 4, 8, 4])
    keep = torch.tensor([1, 6, 3, 2])
    with torch.no_grad():
        mixed = bottleneck(f, bits=bits, keep=keep)
        for i in range(4):
            one = bottleneck(f[i : i + 1], bits=int(bits[i]), keep=int(keep[i]))
            torch.testing.assert_close(mixed[i : i + 1], one)
