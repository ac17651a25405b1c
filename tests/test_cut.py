"""Cutting models in two: StagedModel.cut and the generic cut_model (Sequential and torch.fx)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitexit.errors import SplitPointError
from splitexit.models import ClassifierHead, StagedModel, cut_model, valid_split_points

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_staged() -> StagedModel:
    torch.manual_seed(0)
    return StagedModel(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
            block=nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
            classifier=ClassifierHead(nn.Linear(8, 3)),
        ),
        input_shape=(1, 12, 12),
    )


class ConvChain(nn.Module):
    """A user model with an fx-traceable forward: conv -> relu -> conv -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.act(self.conv1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Residual(nn.Module):
    """conv1 -> conv2, with x added back after conv2: a skip connection around conv1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.conv2(F.relu(self.conv1(x))) + x)
        return self.head(y.mean(dim=(2, 3)))


class Branchy(nn.Module):
    """A non-leaf custom submodule (``block``) used once: cuttable as a whole."""

    def __init__(self) -> None:
        super().__init__()
        self.block = Residual()
        self.out = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.block(x)))


def assert_exact(model: nn.Module, point: str, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    model.eval()
    head, tail = cut_model(model, point)
    with torch.no_grad():
        torch.testing.assert_close(tail(head(x)), model(x))
    return head, tail


# ─── StagedModel ──────────────────────────────────────────────────────────────────────────


def test_split_points_are_every_stage_but_the_last() -> None:
    model = tiny_staged()
    assert model.stage_names == ("stem", "block", "classifier")
    assert model.split_points == ("stem", "block")


@pytest.mark.parametrize("point", ["stem", "block"])
def test_staged_cut_is_exact_and_shares_modules(point: str) -> None:
    model = tiny_staged().eval()
    head, tail = model.cut(point)
    x = torch.randn(2, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(tail(head(x)), model(x))
    assert isinstance(head, StagedModel) and isinstance(tail, StagedModel)
    assert head.stage_names + tail.stage_names == model.stage_names
    assert head.stage_names == model.head_stages(point)
    assert tail.stage_names == model.tail_stages(point)
    assert all(head[n] is model[n] for n in head.stage_names)
    assert all(tail[n] is model[n] for n in tail.stage_names)
    assert head.input_shape == model.input_shape


def test_staged_cut_halves_follow_the_models_mode() -> None:
    model = tiny_staged().eval()
    head, tail = model.cut("stem")
    assert not head.training and not tail.training
    head, tail = model.train().cut("stem")
    assert head.training and tail.training


@pytest.mark.parametrize("point", ["nope", "classifier"])
def test_staged_cut_at_unknown_or_last_stage_lists_valid_points(point: str) -> None:
    with pytest.raises(SplitPointError, match=r"valid split points are: stem, block$"):
        tiny_staged().cut(point)


def test_feature_shapes_leave_train_mode_and_batchnorm_stats_untouched() -> None:
    model = tiny_staged().train()
    model.stem[1].eval()  # a deliberately mixed state must survive too
    stats = model.stem[1].running_mean.clone()
    shapes = model.feature_shapes()
    assert shapes == {"stem": (4, 12, 12), "block": (8, 6, 6), "classifier": (3,)}
    assert model.feature_shapes((5, 1, 20, 20))["block"] == (8, 10, 10)
    assert model.training and not model.stem[1].training and model.block.training
    torch.testing.assert_close(model.stem[1].running_mean, stats)


def test_feature_shapes_without_a_known_input_shape_asks_for_one() -> None:
    model = StagedModel(OrderedDict(a=nn.Identity(), b=nn.Identity()))
    with pytest.raises(ValueError, match="input_shape"):
        model.feature_shapes()


def test_forward_features_returns_the_named_stage_outputs() -> None:
    model = tiny_staged().eval()
    x = torch.randn(2, 1, 12, 12)
    features = model.forward_features(x, ["block", "stem"])
    head, _ = model.cut("block")
    torch.testing.assert_close(features["block"], head(x))
    assert features["stem"].shape == (2, 4, 12, 12)
    with pytest.raises(SplitPointError, match="stem, block, classifier"):
        model.forward_features(x, ["missing"])


def test_classifier_head_reset_changes_only_the_number_of_classes() -> None:
    head = ClassifierHead(nn.Linear(8, 3), dropout=0.1)
    head.reset(7)
    assert head.num_classes == 7 and head.fc.in_features == 8
    assert head(torch.randn(2, 8, 4, 4)).shape == (2, 7)


# ─── cut_model on nn.Sequential ─────────────────────────────────────────────────────────────


def test_cut_model_cuts_a_user_sequential_by_child_name() -> None:
    model = nn.Sequential(
        OrderedDict(
            features=nn.Conv2d(3, 4, 3),
            act=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(4, 2),
        )
    )
    x = torch.randn(2, 3, 8, 8)
    for point in ("features", "act", "pool", "flat"):
        head, _ = assert_exact(model, point, x)
        assert isinstance(head, StagedModel) and head.features is model.features
    assert valid_split_points(model) == ("features", "act", "pool", "flat")
    with pytest.raises(SplitPointError, match="features, act, pool, flat"):
        cut_model(model, "fc")


def test_cut_model_cuts_an_unnamed_sequential_by_index() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    head, tail = assert_exact(model, "1", torch.randn(3, 4))
    assert len(head) == 2 and len(tail) == 1


# ─── cut_model on fx-traceable modules ──────────────────────────────────────────────────────


@pytest.mark.parametrize("point", ["conv1", "act", "conv2", "pool"])
def test_cut_model_cuts_a_traceable_module_at_a_named_submodule(point: str) -> None:
    model = ConvChain()
    head, tail = assert_exact(model, point, torch.randn(2, 3, 16, 16))
    assert isinstance(head, torch.fx.GraphModule) and isinstance(tail, torch.fx.GraphModule)
    assert valid_split_points(model) == ("conv1", "act", "conv2", "pool")


def test_fx_head_ends_at_the_named_module_and_shares_its_weights() -> None:
    model = ConvChain().eval()
    head, tail = cut_model(model, "act")
    x = torch.randn(1, 3, 8, 8)
    assert head(x).shape == (1, 8, 8, 8)
    assert head.conv1 is model.conv1 and tail.conv2 is model.conv2
    assert not hasattr(head, "conv2") and not hasattr(tail, "conv1")
    with torch.no_grad():
        model.fc.bias.add_(1.0)  # a change to the model is seen by the tail: same tensors
        torch.testing.assert_close(tail(head(x)), model(x))


def test_fx_cut_inside_a_skip_connection_is_refused_and_names_valid_points() -> None:
    model = Residual()
    with pytest.raises(SplitPointError) as caught:
        cut_model(model, "conv1")
    message = str(caught.value)
    assert "more than one value would cross" in message
    assert message.endswith("valid split points (where exactly one tensor crosses) are: stem")
    assert_exact(model, "stem", torch.randn(2, 3, 6, 6))


def test_fx_unknown_name_lists_the_valid_points() -> None:
    with pytest.raises(SplitPointError, match=r"no submodule .* are: conv1, act, conv2, pool$"):
        cut_model(ConvChain(), "conv3")


def test_fx_cuts_after_a_whole_custom_submodule() -> None:
    model = Branchy()
    assert valid_split_points(model) == ("block.stem", "block", "block.head")
    head, _ = assert_exact(model, "block", torch.randn(2, 3, 6, 6))
    assert head(torch.randn(2, 3, 6, 6)).shape == (2, 2)


def test_fx_refuses_a_module_called_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.lin(x) + self.lin(x * 2))

    with pytest.raises(SplitPointError, match="'lin'"):
        cut_model(Twice(), "lin")


def test_untraceable_model_says_how_to_make_it_cuttable() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) if x.sum() > 0 else x

    with pytest.raises(SplitPointError, match="StagedModel"):
        cut_model(DataDependent(), "lin")


def test_fx_halves_keep_the_models_train_eval_mode() -> None:
    model = Branchy().eval()  # nested names make fx create fresh container modules
    head, tail = cut_model(model, "block.head")
    assert not any(m.training for m in [*head.modules(), *tail.modules()])
    head, tail = cut_model(model.train(), "block.head")
    assert all(m.training for m in [*head.modules(), *tail.modules()])
