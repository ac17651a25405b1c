"""Split-point profiling measures every candidate cut, sizes the bytes exactly, predicts
latency from its own numbers, and recommends the option that its table says is fastest."""

from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from splitexit.commands.profile import add_arguments
from splitexit.commands.profile import run as profile_main
from splitexit.cost import Link
from splitexit.models import build_model
from splitexit.profile import profile_model, profile_zoo, synthetic_image

FAST = {"repeats": 5, "warmup": 1, "points": ("layer1", "layer2")}


@pytest.fixture(scope="module")
def small():
    """small_resnet (width 8) profiled at its four split points."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model("small_resnet", width=8)
        profile = profile_model(
            model, input_shape=(1, 28, 28), name="small_resnet", repeats=15, warmup=3
        )
    finally:
        torch.set_num_threads(threads)
    return model, profile


def test_every_split_point_is_profiled_with_exact_sizes(small):
    model, profile = small
    shapes = model.feature_shapes((1, 28, 28))
    assert [s.point for s in profile.splits] == ["stem", "layer1", "layer2", "layer3"]
    for s in profile.splits:
        c, h, w = shapes[s.point]
        assert s.feature_shape == (c, h, w)
        assert s.raw_bytes == 4 * c * h * w and s.int8_bytes == c * h * w
        # 12 channels at 1/4 resolution (two stride-2 convs round up), 4 bits, 37 B header
        code = (12, math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2))
        assert s.bottleneck_shape == code
        assert s.bottleneck_bytes == 32 + 5 + math.ceil(math.prod(code) * 4 / 8)


def test_head_plus_tail_is_about_the_full_model(small):
    _, profile = small
    for s in profile.splits:
        assert s.head_ms > 0 and s.tail_ms > 0
        assert abs(s.head_ms + s.tail_ms - profile.full_ms) <= 0.75 * profile.full_ms + 1.0


def test_latency_predictions_follow_from_the_measured_parts(small):
    _, profile = small
    for rate in profile.links:
        link = Link.mbit(rate, profile.rtt_ms)
        assert profile.offload_ms[rate] == pytest.approx(
            1e3 * link.transfer_s(profile.input_bytes) + profile.full_ms
        )
        for s in profile.splits:
            device = s.head_ms + s.encoder_ms
            server = s.decoder_ms + s.tail_ms
            expected = device + 1e3 * link.transfer_s(s.bottleneck_bytes) + server
            assert s.latency_ms[rate] == pytest.approx(expected)
        options = {"local": profile.local_ms, "offload": profile.offload_ms[rate]}
        options |= {f"split:{s.point}": s.latency_ms[rate] for s in profile.splits}
        assert profile.best[rate] == min(options, key=options.get)


def test_a_fast_device_runs_locally_and_a_slow_one_does_not():
    model = build_model("small_resnet", width=8)
    fast = profile_model(model, input_shape=(1, 28, 28), device_speed=1e-3, **FAST)
    assert fast.local_ms == pytest.approx(fast.full_ms * 1e-3)
    assert fast.recommendation.startswith("run locally") and "RTT" in fast.reason
    slow = profile_model(model, input_shape=(1, 28, 28), device_speed=1e4, **FAST)
    assert not slow.recommendation.startswith("run locally")
    assert slow.best[100.0] != "local"


def test_a_user_model_is_cut_where_one_tensor_crosses():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                OrderedDict(
                    conv1=nn.Conv2d(3, 8, 3, padding=1),
                    relu1=nn.ReLU(),
                    conv2=nn.Conv2d(8, 16, 3, stride=2, padding=1),
                )
            )
            self.fc = nn.Linear(16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x).mean((2, 3)))

    profile = profile_model(
        Net(), input_shape=(3, 16, 16), **{**FAST, "points": ["features.relu1", "features.conv2"]}
    )
    assert [s.feature_shape for s in profile.splits] == [(8, 16, 16), (16, 8, 8)]
    assert profile.input_format == "jpeg"  # a colour input is sent as JPEG


def test_profile_serialises_and_formats(small):
    _, profile = small
    d = json.loads(profile.to_json())
    assert [s["point"] for s in d["splits"]] == ["stem", "layer1", "layer2", "layer3"]
    assert set(d["offload_ms"]) == {"1", "5", "20", "100"}
    text = profile.format()
    for point in ("stem", "layer1", "layer2", "layer3", "local", "offload", "recommendation"):
        assert point in text


def test_zoo_profile_uses_the_entry_input_and_points():
    profile = profile_zoo("small_resnet", model_kwargs={"width": 8}, links=(10.0,), **FAST)
    assert profile.input_shape == (1, 28, 28) and profile.links == (10.0,)
    assert profile.input_format == "png"


def test_synthetic_image_is_deterministic():
    a, b = synthetic_image(32, 48, 3), synthetic_image(32, 48, 3)
    assert a.shape == (32, 48, 3) and a.dtype.name == "uint8" and (a == b).all()
    assert synthetic_image(8, 8, 1).shape == (8, 8)


def test_profile_command_prints_a_table_and_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "profile.json"
    args = parser.parse_args(
        ["small_resnet", "--points", "layer1", "layer2", "--repeats", "3", "--json", str(out)]
    )
    assert profile_main(args) == 0
    assert "recommendation:" in capsys.readouterr().out
    assert [s["point"] for s in json.loads(out.read_text())["splits"]] == ["layer1", "layer2"]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2", "resnet18"])
def test_larger_zoo_models_profile_at_their_default_split(name):
    from splitexit.models import get_spec, list_models

    if name not in list_models():
        pytest.skip(f"{name} needs an optional package")
    spec = get_spec(name)
    profile = profile_zoo(name, points=(spec.default_split,), repeats=1, warmup=0)
    (split,) = profile.splits
    assert split.point == spec.default_split and profile.input_shape == (3, 224, 224)
    assert split.bottleneck_bytes < split.int8_bytes < split.raw_bytes
