import numpy as np
import pytest
import torch
from torch import nn

from poisonguard.errors import ConfigError
from poisonguard.models.adapter import InputSpec
from poisonguard.train.relabel import (
    minimum_share_weight,
    other_class_targets,
    relabelled_batches,
    weighted_mean_loss,
)


def _setup() -> tuple[nn.Module, InputSpec, np.ndarray, torch.Tensor]:
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    return nn.Linear(5, 4), InputSpec.for_data(x), x, torch.tensor([0, 1, 2, 3, 0, 1])


def test_other_class_targets_exclude_the_label_and_soften_with_temperature() -> None:
    model, spec, x, y = _setup()
    cold = other_class_targets(model, spec, x, y)
    warm = other_class_targets(model, spec, x, y, temperature=4.0)
    for t in (cold, warm):
        assert torch.allclose(t.sum(1), torch.ones(len(x)))
        assert torch.all(t[torch.arange(len(x)), y] == 0)
    entropy = [-(t.clamp_min(1e-12).log() * t).sum(1) for t in (cold, warm)]
    assert torch.all(entropy[1] > entropy[0])
    # the ranking of the other classes is the model's at any temperature
    assert torch.equal(cold.argmax(1), warm.argmax(1))
    second = other_class_targets(model, spec, x, y, mode="second")
    assert torch.equal(second.argmax(1), cold.argmax(1)) and torch.allclose(second.max(1).values,
                                                                            torch.ones(len(x)))


def test_other_class_targets_reject_a_bad_temperature() -> None:
    model, spec, x, y = _setup()
    with pytest.raises(ConfigError, match="temperature"):
        other_class_targets(model, spec, x, y, temperature=0.0)


def test_relabelled_batches_replace_only_masked_rows() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    soft = torch.full((1, 4), 0.25)
    hook = relabelled_batches(np.array([False, True, False, False]), labels, soft)
    assert hook(np.array([0, 2]), 0) is None
    t = hook(np.array([1, 2]), 0)
    assert torch.equal(t[0], soft[0]) and torch.equal(t[1], torch.tensor([0.0, 0, 1, 0]))
    with pytest.raises(ConfigError, match="one row per masked sample"):
        relabelled_batches(np.array([False, True, True, False]), labels, soft)


def test_minimum_share_weight_lifts_only_a_small_flagged_set() -> None:
    w = minimum_share_weight(100, 10_000, 0.05)
    assert w > 1 and abs(100 * w / (100 * w + 9_900) - 0.05) < 1e-9
    assert minimum_share_weight(1_000, 10_000, 0.05) == 1.0
    assert minimum_share_weight(0, 10_000) == 1.0
    with pytest.raises(ConfigError, match="min_share"):
        minimum_share_weight(10, 100, 1.5)


def test_weighted_mean_loss_weights_masked_samples() -> None:
    loss = weighted_mean_loss(np.array([True, False, False]), 3.0)
    per = torch.tensor([1.0, 2.0, 4.0])
    assert torch.isclose(loss(per, np.array([0, 1, 2]), 0), torch.tensor((3 + 2 + 4) / 5))
    assert torch.isclose(loss(per[1:], np.array([1, 2]), 0), torch.tensor(3.0))
