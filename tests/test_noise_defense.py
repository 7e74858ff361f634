"""train --defense noise: Gaussian noise on every training input (issue 22, item 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from poisonguard.cli import main
from poisonguard.errors import ConfigError
from poisonguard.models import TrainConfig
from poisonguard.train import GuardConfig, train_guarded

CFG = TrainConfig(epochs=2, batch_size=64, seed=0)


@pytest.fixture(scope="module")
def small(digits):
    train, _ = digits
    return train.subset(np.arange(300))


def test_noise_training_perturbs_inputs_and_records_sigma(small) -> None:
    plain = train_guarded(small, GuardConfig(), CFG)
    noisy = train_guarded(small, GuardConfig(defense="noise", noise_sigma=0.3), CFG)
    assert noisy.train.config.input_noise == 0.3 and plain.train.config.input_noise == 0.0
    a = dict(plain.classifier.model.named_parameters())["head.weight"]
    b = dict(noisy.classifier.model.named_parameters())["head.weight"]
    assert not torch.allclose(a, b)
    again = train_guarded(small, GuardConfig(defense="noise", noise_sigma=0.3), CFG)
    assert torch.equal(b, dict(again.classifier.model.named_parameters())["head.weight"])
    assert (noisy.classifier.predict(small.x) == small.y).mean() > 0.5


def test_noise_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="noise sigma"):
        GuardConfig(defense="noise", noise_sigma=0.0)
    with pytest.raises(ConfigError, match="input_noise"):
        TrainConfig(input_noise=-1.0)


def test_train_command_noise(tmp_path, small, capsys) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=small.x, y=small.y)
    out = tmp_path / "m"
    assert main(["train", str(data), "--defense", "noise", "--noise-sigma", "0.2",
                 "--epochs", "2", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    layer = json.loads((out / "report.json").read_text())["layers"]["guarded_training"]
    assert layer["defense"] == "noise" and layer["config"]["noise_sigma"] == 0.2
    assert layer["train_config"]["input_noise"] == 0.2
    bad = tmp_path / "bad"
    assert main(["train", str(data), "--defense", "trim", "--noise-sigma", "0.2",
                 "--out", str(bad)]) == 2
    assert "--noise-sigma applies to --defense noise only" in capsys.readouterr().err
