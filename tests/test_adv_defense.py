"""train --defense adv: PGD adversarial training (issue 22, item 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from poisonguard.cli import main
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError
from poisonguard.models import TrainConfig
from poisonguard.models.adapter import InputSpec
from poisonguard.train import GuardConfig, train_guarded
from poisonguard.train.guarded import input_range, pgd_attack

CFG = TrainConfig(epochs=2, batch_size=64, seed=0)


@pytest.fixture(scope="module")
def small(digits):
    train, _ = digits
    return train.subset(np.arange(300))


def _linear(n_in: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 10))


def test_pgd_stays_in_budget_and_range_and_raises_the_loss(small) -> None:
    spec = InputSpec.for_data(small.x)
    lo, hi = input_range(small, spec)
    assert (float(lo), float(hi)) == (0.0, 1.0)  # uint8 images: the 0-1 scale
    x, y = spec.prepare(small.x[:64]), torch.from_numpy(small.y[:64])
    model = _linear(64)
    for steps in (1, 3):
        adv = pgd_attack(model, x, y, 0.1, steps, lo, hi, generator=torch.Generator())
        assert (adv - x).abs().max() <= 0.1 + 1e-6
        assert adv.min() >= 0.0 and adv.max() <= 1.0
        with torch.no_grad():
            assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 0.05
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients left


def test_pgd_restores_train_mode(small) -> None:
    spec = InputSpec.for_data(small.x)
    model = _linear(64).train()
    pgd_attack(model, spec.prepare(small.x[:8]), torch.from_numpy(small.y[:8]), 0.1, 1, 0.0, 1.0)
    assert model.training


def test_vectors_use_each_features_range() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([rng.uniform(0, 1, 200), rng.uniform(-10, 10, 200)], 1).astype(np.float32)
    data = LabeledData.create(x, (x[:, 0] > 0.5).astype(np.int64))
    spec = InputSpec.for_data(x)
    lo, hi = input_range(data, spec)
    assert np.allclose(lo.numpy(), x.min(0)[None]) and np.allclose(hi.numpy(), x.max(0)[None])
    xt = spec.prepare(x[:50])
    model = nn.Linear(2, 2)
    adv = pgd_attack(model, xt, torch.from_numpy(data.y[:50]), 0.05 * (hi - lo), 3, lo, hi)
    bound = 0.05 * (hi - lo) + 1e-5
    assert ((adv - xt).abs() <= bound).all() and (adv >= lo).all() and (adv <= hi).all()
    r = train_guarded(data, GuardConfig(defense="adv", adv_epsilon=0.05),
                      TrainConfig(epochs=3, batch_size=32))
    assert r.info["adv_input_range"] == pytest.approx([float(x.min()), float(x.max())])
    assert (r.classifier.predict(x) == data.y).mean() > 0.8


def test_token_inputs_are_refused(small) -> None:
    with pytest.raises(ConfigError, match="does not apply to tokens"):
        input_range(small, InputSpec(layout="tokens"))


def test_adv_training_is_seeded_and_differs_from_plain(small) -> None:
    plain = train_guarded(small, GuardConfig(), CFG)
    adv = train_guarded(small, GuardConfig(defense="adv", adv_epsilon=0.1, adv_steps=2), CFG)
    assert adv.info["adv_recipe"].startswith("PGD-2")
    assert adv.info["adv_epsilon_max"] == pytest.approx(0.1)
    a = dict(plain.classifier.model.named_parameters())["head.weight"]
    b = dict(adv.classifier.model.named_parameters())["head.weight"]
    assert not torch.allclose(a, b)
    again = train_guarded(small, GuardConfig(defense="adv", adv_epsilon=0.1, adv_steps=2), CFG)
    assert torch.equal(b, dict(again.classifier.model.named_parameters())["head.weight"])
    assert (adv.classifier.predict(small.x) == small.y).mean() > 0.5


def test_training_batches_are_the_perturbed_ones(small, monkeypatch) -> None:
    import poisonguard.models.training as training

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = training.train_classifier

    def spy(*args, batch_inputs=None, **kwargs):  # noqa: ANN002, ANN003, ANN202
        def wrapped(model, xb, yb):  # noqa: ANN001, ANN202
            out = batch_inputs(model, xb, yb)
            seen.append((xb, out))
            return out
        return real(*args, batch_inputs=wrapped if batch_inputs else None, **kwargs)

    monkeypatch.setattr("poisonguard.train.guarded.train_classifier", spy)
    train_guarded(small, GuardConfig(defense="adv", adv_epsilon=0.2), CFG)
    assert len(seen) == 2 * 5  # 2 epochs of 5 batches of at most 64
    for clean, adv in seen:
        d = (adv - clean).abs().max()
        assert 0.05 < d <= 0.2 + 1e-6 and adv.min() >= 0 and adv.max() <= 1


def test_warmup_grows_the_budget(small, monkeypatch) -> None:
    import poisonguard.train.guarded as guarded

    budgets: list[float] = []
    real = guarded.pgd_attack

    def spy(model, x, y, epsilon, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        budgets.append(float(torch.as_tensor(epsilon).max()))
        return real(model, x, y, epsilon, *args, **kwargs)

    monkeypatch.setattr(guarded, "pgd_attack", spy)
    r = train_guarded(small, GuardConfig(defense="adv", adv_epsilon=0.2, adv_warmup=0.5), CFG)
    assert r.info["adv_warmup_steps"] == 5  # half of 2 epochs x 5 batches
    assert budgets[:5] == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.2])
    assert budgets[5:] == pytest.approx([0.2] * 5)


@pytest.mark.parametrize("kwargs,match", [
    ({"adv_epsilon": 0.0}, "adv epsilon"),
    ({"adv_epsilon": -0.1}, "adv epsilon"),
    ({"adv_epsilon": 1.5}, "adv epsilon"),
    ({"adv_steps": 0}, "adv steps"),
    ({"adv_steps": 1.5}, "adv steps"),
    ({"adv_warmup": 1.0}, "adv warmup"),
    ({"adv_warmup": -0.1}, "adv warmup"),
])
def test_adv_options_are_checked(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GuardConfig(defense="adv", **kwargs)


def test_train_command_adv(tmp_path, small, capsys) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=small.x, y=small.y)
    out = tmp_path / "m"
    assert main(["train", str(data), "--defense", "adv", "--adv-epsilon", "0.1", "--adv-steps",
                 "1", "--epochs", "2", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    layer = json.loads((out / "report.json").read_text())["layers"]["guarded_training"]
    assert layer["defense"] == "adv" and layer["config"]["adv_epsilon"] == 0.1
    assert layer["config"]["adv_steps"] == 1
    capsys.readouterr()
    for argv, msg in [(["--defense", "trim", "--adv-epsilon", "0.1"], "apply to --defense adv"),
                      (["--adv-steps", "2"], "apply to --defense adv"),
                      (["--adv-warmup", "0.2"], "apply to --defense adv"),
                      (["--defense", "adv", "--adv-epsilon", "0"], "adv epsilon must be"),
                      (["--defense", "adv", "--adv-steps", "0"], "adv steps must be")]:
        assert main(["train", str(data), *argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


def test_train_command_refuses_adv_for_text(tmp_path, capsys) -> None:
    posts = tmp_path / "p.csv"
    posts.write_text("text,label\n" + "".join(f"post {i},{i % 2}\n" for i in range(20)))
    assert main(["train", str(posts), "--defense", "adv", "--out", str(tmp_path / "t")]) == 2
    assert "for text choose none, trim or abl" in capsys.readouterr().err
