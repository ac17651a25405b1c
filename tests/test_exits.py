"""Exit branches classify intermediate features; confidence measures rank as they should."""

import math

import pytest
import torch

from splitexit.exits import CONFIDENCE_MEASURES, ExitBranch, confidence


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("hidden", [None, 16])
def test_exit_branch_maps_features_to_logits(conv: bool, hidden: int | None) -> None:
    branch = ExitBranch(12, 10, hidden=hidden, conv=conv)
    assert branch(torch.randn(4, 12, 7, 7)).shape == (4, 10)


@pytest.mark.parametrize("measure", CONFIDENCE_MEASURES)
def test_confident_logits_score_higher_than_uniform(measure: str) -> None:
    logits = torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 1.9, 0.0, 0.0]])
    c = confidence(logits, measure)
    assert c.shape == (3,)
    assert torch.all((c >= 0) & (c <= 1))
    assert c[0] > c[2] > c[1]
    assert c[1] == pytest.approx(0.0 if measure != "max_prob" else 0.25, abs=1e-6)


def test_margin_and_entropy_values() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1]])
    logits = p.log()
    assert confidence(logits, "margin").item() == pytest.approx(0.5, abs=1e-6)
    h = -(p * p.log()).sum().item()
    assert confidence(logits, "entropy").item() == pytest.approx(1 - h / math.log(3), abs=1e-6)


def test_confidence_is_batched_per_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 10)
    for measure in CONFIDENCE_MEASURES:
        rows = torch.stack([confidence(logits[i : i + 1], measure)[0] for i in range(64)])
        torch.testing.assert_close(confidence(logits, measure), rows)


def test_unknown_measure_and_bad_shape_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown confidence measure"):
        confidence(torch.randn(2, 3), "vibes")
    with pytest.raises(ValueError, match="shape"):
        confidence(torch.randn(3), "max_prob")
