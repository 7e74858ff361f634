import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from poisonguard.data import LabeledData
from poisonguard.errors import ConfigError, DataError, ModelError, UnsafeModelFileError
from poisonguard.models import InputSpec, TorchClassifier, TrainConfig, train_classifier
from poisonguard.models.architectures import choose_architecture
from poisonguard.models.io import load_model, save_model


@pytest.fixture(scope="module")
def trained(small_digits: LabeledData):
    return train_classifier(small_digits, TrainConfig(epochs=2, batch_size=64, seed=0))


def test_architecture_sizing() -> None:
    assert choose_architecture((1, 28, 28), 10)[0] == "cnn"
    assert choose_architecture((3, 32, 32), 10)[1]["width"] == 32
    assert choose_architecture((1, 8, 8), 10)[1]["pools"] == 0
    assert choose_architecture((20,), 3)[0] == "mlp"


def test_input_spec_layouts() -> None:
    x = np.zeros((2, 5, 6, 3), np.uint8)
    assert tuple(InputSpec.for_data(x).prepare(x).shape) == (2, 3, 5, 6)
    g = np.full((2, 5, 6), 255, np.uint8)
    t = InputSpec.for_data(g).prepare(g)
    assert tuple(t.shape) == (2, 1, 5, 6) and float(t.max()) == 1.0
    v = np.ones((3, 7), np.float64)
    assert tuple(InputSpec.for_data(v).prepare(v).shape) == (3, 7)
    assert InputSpec(layout="raw").prepare(g).dtype == torch.uint8


def test_training_is_seeded_and_learns(small_digits: LabeledData, trained) -> None:
    again = train_classifier(small_digits, TrainConfig(epochs=2, batch_size=64, seed=0))
    a = dict(trained.classifier.model.named_parameters())
    b = dict(again.classifier.model.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    acc = (trained.classifier.predict(small_digits.x) == small_digits.y).mean()
    assert acc > 0.5


def test_adapter_outputs(small_digits: LabeledData, trained) -> None:
    clf = trained.classifier
    out = clf.forward_all(small_digits.x[:50], small_digits.y[:50], extra_layers=("features",))
    assert out["representations"].shape == (50, 128)
    assert out["layer:features"].ndim == 2
    assert np.allclose(out["probs"].sum(1), 1, atol=1e-5)
    manual = F.cross_entropy(clf.model(clf.input_spec.prepare(small_digits.x[:50])),
                             torch.from_numpy(small_digits.y[:50]), reduction="none")
    assert np.allclose(out["losses"], manual.detach().numpy(), atol=1e-4)
    with pytest.raises(ModelError, match="does not exist.*available layers"):
        clf.representations(small_digits.x[:4], layer="nope.layer")


def test_per_sample_grad_norm_matches_autograd(small_digits: LabeledData, trained) -> None:
    clf = trained.classifier
    x, y = small_digits.x[:3], small_digits.y[:3]
    fast = clf.per_sample_grad_norm(x, y)
    for i in range(3):
        clf.model.zero_grad()
        loss = F.cross_entropy(clf.model(clf.input_spec.prepare(x[i:i + 1])),
                               torch.from_numpy(y[i:i + 1]))
        loss.backward()
        ref = torch.sqrt(sum((p.grad ** 2).sum() for p in clf.model.parameters()))
        assert fast[i] == pytest.approx(float(ref), rel=1e-3)


def test_closed_form_linear_grad_norms_match_torch_func(small_digits: LabeledData,
                                                        trained) -> None:
    clf = trained.classifier
    x, y = small_digits.x[:40], small_digits.y[:40]
    names = [n for n, _ in clf.model.named_parameters() if n.startswith(("embed", "head"))]
    assert names
    fast = clf.per_sample_grad_norm(x, y, params=names)  # closed form: all are Linear
    named = {n: p.detach() for n, p in clf.model.named_parameters() if n in names}
    slow = clf._func_grad_norms(x, y, named)
    assert np.allclose(fast, slow, rtol=1e-4, atol=1e-6)
    only_weight = [n for n in names if n.endswith("weight")]
    assert not np.allclose(clf.per_sample_grad_norm(x, y, params=only_weight), fast)
    assert np.allclose(clf.per_sample_grad_norm(x, y, params=only_weight),
                       clf._func_grad_norms(x, y, {n: named[n] for n in only_weight}),
                       rtol=1e-4, atol=1e-6)


def test_save_load_roundtrip(tmp_path: Path, small_digits: LabeledData, trained) -> None:
    clf = trained.classifier
    save_model(tmp_path / "m", clf.model, trained.arch, trained.arch_kwargs, clf.input_spec,
               10, clf.layer)
    loaded = load_model(tmp_path / "m")
    assert np.allclose(loaded.predict_proba(small_digits.x[:20]),
                       clf.predict_proba(small_digits.x[:20]), atol=1e-6)
    assert load_model(tmp_path / "m" / "model.safetensors").layer == "embed"


def test_pickles_refused_never_loaded(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self):  # pragma: no cover - must never run
            return (Path.touch, (tmp_path / "PWNED",))

    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(UnsafeModelFileError, match="refused"):
        load_model(p)
    # a zip-format torch.save of an arbitrary object is refused by weights_only
    meta_dir = tmp_path / "dir"
    meta_dir.mkdir()
    torch.save({"obj": Boom()}, meta_dir / "weights.pt")
    with pytest.raises(ModelError):
        load_model(meta_dir / "weights.pt")
    assert not (tmp_path / "PWNED").exists()


def test_pickled_module_and_lone_safetensors_one_line(tmp_path: Path, small_digits) -> None:
    t = train_classifier(small_digits, TrainConfig(epochs=1))
    clf = t.classifier
    save_model(tmp_path / "m", clf.model, t.arch, t.arch_kwargs, clf.input_spec, 10, clf.layer)
    torch.save(clf.model, tmp_path / "m" / "model.pt")  # a whole pickled module
    with pytest.raises(UnsafeModelFileError) as info:
        load_model(tmp_path / "m" / "model.pt")
    msg = str(info.value)
    assert "\n" not in msg and "\x1b" not in msg and "state_dict" in msg
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "w.safetensors").write_bytes((tmp_path / "m" / "model.safetensors").read_bytes()[:50])
    with pytest.raises(ModelError, match="safetensors weights alone") as info:
        load_model(lone / "w.safetensors")
    assert "raw pickle" not in str(info.value)


def test_torchscript_model_accepted(tmp_path: Path) -> None:
    class Raw(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.dtype == torch.uint8  # fed as the data holds it
            m = x.float().mean((1, 2))
            return torch.stack([m, 5 - m], 1)

    path = tmp_path / "m.pt"
    torch.jit.script(Raw()).save(str(path))
    clf = load_model(path)
    x = np.stack([np.zeros((4, 4), np.uint8), np.full((4, 4), 9, np.uint8)])
    assert clf.predict(x).tolist() == [1, 0]


def test_bad_training_inputs(small_digits: LabeledData) -> None:
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(DataError, match="too few"):
        train_classifier(small_digits.subset(np.arange(3)), TrainConfig(batch_size=128))


def test_output_class_mismatch_is_named(small_digits: LabeledData, trained) -> None:
    clf = TorchClassifier(trained.classifier.model, trained.classifier.input_spec, n_classes=3)
    with pytest.raises(ModelError, match="outputs 10 classes but the data has 3"):
        clf.predict(small_digits.x[:2])


def test_progress_names_the_stage_and_counts_every_step(small_digits, capsys) -> None:
    train_classifier(small_digits, TrainConfig(epochs=2), progress=True, stage="scan round 2/3")
    err = capsys.readouterr().err
    assert "scan round 2/3" in err and "epoch 2/2" in err
    assert "/8 [" in err  # 2 epochs x 4 batches of 128 in one bar: the ETA covers the stage
