"""Preprocess (pixels -> normalized model input) and the image codecs."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from splitexit.errors import ConfigError
from splitexit.preprocess import Preprocess, decode_image, encode_image

rng = np.random.default_rng(0)


def _gray(n: int = 2, h: int = 28, w: int = 28) -> np.ndarray:
    return rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)


def _rgb(n: int = 2, h: int = 28, w: int = 28) -> np.ndarray:
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------- Preprocess


def test_output_is_float32_nchw_for_every_input_layout():
    pre = Preprocess(size=(28, 28), channels=1)
    for images in (_gray(), _gray()[..., None], torch.from_numpy(_gray())):
        out = pre(images)
        assert out.dtype == torch.float32 and out.shape == (2, 1, 28, 28)


def test_numpy_and_torch_inputs_give_identical_output():
    pre = Preprocess(size=(32, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), channels=3)
    x = _rgb(h=20, w=24)
    torch.testing.assert_close(pre(x), pre(torch.from_numpy(x)), rtol=0, atol=0)


def test_normalization_maps_pixels_through_mean_and_std():
    pre = Preprocess(size=(4, 4), mean=(0.5,), std=(0.25,), channels=1)
    x = np.array([[[0, 255], [51, 255]]], dtype=np.uint8).repeat(2, 1).repeat(2, 2)  # 4x4
    out = pre(x)
    expected = (torch.from_numpy(x).float()[:, None] / 255 - 0.5) / 0.25
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert out.max().item() == pytest.approx(2.0) and out.min().item() == pytest.approx(-2.0)


def test_per_channel_mean_and_std_apply_to_their_channel():
    pre = Preprocess(size=(2, 2), mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25), channels=3)
    out = pre(np.full((1, 2, 2, 3), 255, dtype=np.uint8))
    assert out[0, :, 0, 0].tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_gray_becomes_rgb_by_repeating_the_channel():
    out = Preprocess(size=(28, 28), channels=3)(_gray())
    assert out.shape == (2, 3, 28, 28)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])


def test_rgb_becomes_gray_by_luminance_like_pillow():
    x = _rgb(n=1)
    out = Preprocess(size=(28, 28), channels=1)(x)
    pil_gray = np.asarray(Image.fromarray(x[0]).convert("L"), dtype=np.float32) / 255
    assert out.shape == (1, 1, 28, 28)
    assert np.abs(out[0, 0].numpy() - pil_gray).max() <= 1 / 255 + 1e-6


def test_resize_is_antialiased_bilinear_like_pillow():
    x = _gray(n=1, h=96, w=64)
    out = Preprocess(size=(28, 20), channels=1)(x)
    ref = Image.fromarray(x[0]).resize((20, 28), Image.Resampling.BILINEAR)
    ref_arr = np.asarray(ref, dtype=np.float32) / 255
    assert out.shape == (1, 1, 28, 20)
    # Pillow rounds to uint8 on the way out; antialias-less or align_corners=True is far off.
    assert np.abs(out[0, 0].numpy() - ref_arr).max() <= 2 / 255


def test_upsizing_keeps_a_constant_image_constant():
    out = Preprocess(size=(224, 224), channels=3)(np.full((1, 28, 28), 128, dtype=np.uint8))
    assert out.shape == (1, 3, 224, 224)
    torch.testing.assert_close(out, torch.full_like(out, 128 / 255))


def test_one_takes_a_single_image_without_batch_dimension():
    pre = Preprocess(size=(14, 14), channels=1)
    x = _gray(n=1)
    assert pre.one(x[0]).shape == (1, 14, 14)
    torch.testing.assert_close(pre.one(x[0]), pre(x)[0])


def test_device_argument_moves_the_computation():
    out = Preprocess(size=(28, 28), channels=1)(_gray(), device="cpu")
    assert out.device.type == "cpu"


@pytest.mark.parametrize(
    "images, error",
    [
        (np.zeros((2, 28, 28), dtype=np.float32), TypeError),  # not uint8
        (np.zeros((28, 28), dtype=np.uint8), ValueError),  # no batch dimension
        (np.zeros((2, 28, 28, 4), dtype=np.uint8), ValueError),  # RGBA
        (np.zeros((2, 3, 28, 28), dtype=np.uint8), ValueError),  # channels-first
        ([[1, 2], [3, 4]], TypeError),  # a list
    ],
)
def test_bad_input_is_refused(images, error):
    with pytest.raises(error):
        Preprocess(size=(28, 28), channels=1)(images)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": (0, 28)},
        {"size": (28,)},
        {"size": (28, 28), "channels": 2},
        {"size": (28, 28), "std": (0.0,)},
        {"size": (28, 28), "channels": 3, "mean": (0.1, 0.2)},
        {"size": (28, 28), "mean": (float("nan"),)},
    ],
)
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        Preprocess(**kwargs)


def test_dict_round_trip_through_json():
    pre = Preprocess(
        size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels=3
    )
    d = json.loads(json.dumps(pre.to_dict()))
    assert d == {
        "size": [224, 224],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "channels": 3,
    }
    assert Preprocess.from_dict(d) == pre


@pytest.mark.parametrize(
    "d",
    [
        {"mean": [0.5], "std": [0.5], "channels": 1},  # no size
        {"size": [28, 28], "channels": 1, "interpolation": "nearest"},  # unknown key
        {"size": [28, 28], "channels": 5},
        {"size": "28x28", "channels": 1},
        [28, 28],
    ],
)
def test_from_dict_refuses_bad_manifests(d):
    with pytest.raises(ConfigError):
        Preprocess.from_dict(d)


# ----------------------------------------------------------------------------- image codecs


@pytest.mark.parametrize("shape", [(20, 30), (20, 30, 1), (20, 30, 3)])
def test_png_round_trip_is_lossless(shape):
    x = rng.integers(0, 256, size=shape, dtype=np.uint8)
    y = decode_image(encode_image(x, "png"))
    expected = x[:, :, None] if x.ndim == 2 else x
    assert y.dtype == np.uint8 and np.array_equal(y, expected)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_round_trip_is_close_and_quality_matters(fmt):
    yy, xx = np.mgrid[0:64, 0:64]
    x = np.stack([xx * 4, yy * 4, (xx + yy) * 2], axis=-1).astype(np.uint8)  # smooth gradient
    data = encode_image(x, fmt, quality=95)
    y = decode_image(data)
    assert y.shape == x.shape
    assert np.abs(y.astype(int) - x).mean() < 4
    assert len(encode_image(x, fmt, quality=10)) < len(data)


def test_png_is_optimized():
    x = np.zeros((64, 64), dtype=np.uint8)
    x[16:48, 16:48] = 255
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "PNG")
    assert len(encode_image(x, "png")) <= len(buf.getvalue())


def test_decode_converts_alpha_and_palette_images_to_rgb():
    rgba = rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
    assert decode_image(encode_image(rgba, "png")).shape == (8, 8, 3)
    assert decode_image(encode_image(rgba, "png"), mode="RGBA").shape == (8, 8, 4)
    buf = io.BytesIO()
    Image.fromarray(rgba[:, :, :3]).convert("P").save(buf, "PNG")
    assert decode_image(buf.getvalue()).shape == (8, 8, 3)


def test_decode_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buf, "JPEG", exif=exif)
    assert decode_image(buf.getvalue()).shape == (40, 20, 3)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", encode_image(np.zeros((32, 32), np.uint8), "png")[:40]],
)
def test_undecodable_bytes_raise_value_error(data):
    with pytest.raises(ValueError, match="cannot decode image"):
        decode_image(data)


def test_decode_refuses_images_over_the_pixel_cap_before_decoding():
    data = encode_image(np.zeros((100, 100), np.uint8), "png")
    with pytest.raises(ValueError, match="more than the limit"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=10_000).shape == (100, 100, 1)


@pytest.mark.parametrize(
    "array, fmt, quality",
    [
        (np.zeros((8, 8), np.float32), "png", 90),
        (np.zeros((8, 8, 2), np.uint8), "png", 90),
        (np.zeros((8, 8), np.uint8), "gif", 90),
        (np.zeros((8, 8), np.uint8), "jpeg", 0),
        (np.zeros((8, 8, 4), np.uint8), "jpeg", 90),
    ],
)
def test_encode_refuses_what_it_cannot_store(array, fmt, quality):
    with pytest.raises(ValueError):
        encode_image(array, fmt, quality=quality)


def test_encode_accepts_torch_tensors():
    x = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8)
    assert np.array_equal(decode_image(encode_image(x)), x.numpy())


def test_missing_pillow_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        decode_image(b"\x89PNG")
