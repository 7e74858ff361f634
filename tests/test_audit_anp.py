"""ANP (adversarial neuron pruning) and the spatial units of fine-pruning, on tiny models of
8x8 digits (trained in about a second)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from poisonguard.audit import ANPConfig, anp_prune, load_audit_model
from poisonguard.audit.anp import learn_masks, neuron_layers
from poisonguard.audit.repair import RepairConfig, _spatial_head, _Units, last_conv
from poisonguard.cli import main
from poisonguard.data import LabeledData
from poisonguard.errors import ConfigError
from poisonguard.models.io import save_model
from poisonguard.models.training import TrainConfig, train_classifier


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, digits: tuple[LabeledData, LabeledData]
          ) -> dict[str, object]:
    train, test = digits
    res = train_classifier(train, TrainConfig(epochs=3, seed=0))
    folder = tmp_path_factory.mktemp("anp") / "m"
    clf = res.classifier
    save_model(folder, clf.model, res.arch, res.arch_kwargs, clf.input_spec, 10, clf.layer)
    return {"path": folder, "clean": test.subset(np.arange(200)), "test": test}


def test_anp_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError):
        ANPConfig(eps=2.0)
    with pytest.raises(ConfigError):
        ANPConfig(threshold=0.0)
    with pytest.raises(ConfigError):
        RepairConfig(tune="some")


def test_spatial_units_and_neuron_layers(small: dict) -> None:
    model = load_audit_model(small["path"])
    _n, conv, _b, _bn = last_conv(model.module)
    head = _spatial_head(model.module, conv)
    assert head is not None and head[1].weight.shape[1] % conv.weight.shape[0] == 0
    units = _Units(model.module)
    assert units.n == head[1].weight.shape[1]
    layers = neuron_layers(model.module, spatial=True, channels=True)
    assert layers[-1][2] == 1 and all(a == 0 for _n, _m, a in layers[:-1])


def test_anp_masks_leave_weights_and_prune_within_budget(small: dict) -> None:
    model = load_audit_model(small["path"])
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    cfg = ANPConfig(iterations=5, batch_size=32)
    masks, _layers, sizes, _curve = learn_masks(model, small["clean"], cfg)
    assert masks.shape == (sum(sizes),) and masks.min() >= 0 and masks.max() <= 1
    for k, v in model.module.state_dict().items():  # learning the masks changes no weight
        assert torch.equal(v, before[k]), k
    info = anp_prune(model, small["clean"], cfg)
    clean = small["clean"]
    acc = float(np.mean(model.classifier.predict(clean.x) == clean.y))
    assert acc >= info["clean_acc_before"] - cfg.acc_budget - 1e-9
    assert info["n_pruned"] <= int(cfg.max_fraction * info["n_neurons"])


def test_cli_repair_anp(small: dict, tmp_path: Path) -> None:
    clean = small["clean"]
    npz = tmp_path / "clean.npz"
    np.savez(npz, x=clean.x, y=clean.y)
    out = tmp_path / "rep"
    rc = main(["repair", str(small["path"]), "--clean", str(npz), "--out", str(out),
               "--method", "anp", "--steps", "20", "--quiet"])
    assert rc == 0 and (out / "report.json").exists()
    assert load_audit_model(out).module is not None
    rc = main(["repair", str(small["path"]), "--clean", str(npz), "--out", str(out),
               "--method", "anp", "--prune-budget", "1.5", "--quiet"])
    assert rc == 2
