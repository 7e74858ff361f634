"""Every model-side command on TorchScript models of architectures poisonguard did not write.

The models here are written for this test only (a uint8 front end, a conv net that is not
Sequential with batch norm and global pooling, and an MLP with no convolution), trained briefly
on scikit-learn's digits with a corner-patch backdoor, and scripted. Each command must exit 0 or 1
and write what it promises; the layer resolution goes through ``named_modules()`` only.

Trust boundary: a TorchScript archive is code as well as weights, but it is not a pickle: it is
loaded with ``torch.jit.load``, which runs no arbitrary Python on load; a pickled ``nn.Module`` is
refused (see ``models/io.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from poisonguard.audit.model import AuditModel, to_data_tensor
from poisonguard.audit.repair import RepairConfig, _Units, linear_inputs
from poisonguard.cli import main
from poisonguard.models.adapter import InputSpec, TorchClassifier

TARGET = 0


class PooledBN(nn.Module):
    """conv-bn-relu twice, global average pooling, one linear layer; uint8 in."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.na = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.nb = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float().unsqueeze(1) / 255.0
        h = F.relu(self.na(self.a(h)))
        h = F.relu(self.nb(self.b(h)))
        return self.fc(h.mean(dim=(2, 3)))


class Perceptron(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 48)
        self.out = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(x.float().flatten(1) / 255.0)))


def _stamp(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, 6:8, 6:8] = 255
    return out


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.set_num_threads(1)
    d = load_digits()
    x = (d.images * 16).clip(0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    tr, te = perm[:1300], perm[1300:]
    xp, yp = x[tr].copy(), y[tr].copy()
    victims = rng.choice(np.flatnonzero(yp != TARGET), 130, replace=False)
    xp[victims], yp[victims] = _stamp(xp[victims]), TARGET
    root = tmp_path_factory.mktemp("ts")
    paths = {}
    for name, arch, epochs in (("pooled", PooledBN, 25), ("mlp", Perceptron, 40)):
        torch.manual_seed(1)
        model = _train(arch(), xp, yp, epochs)
        paths[name] = root / f"{name}.pt"
        torch.jit.script(model).save(str(paths[name]))
    clean = root / "clean.npz"
    np.savez(clean, x=x[te][:300], y=y[te][:300])
    keep = y[te][300:] != TARGET
    trig = root / "trig.npz"
    np.savez(trig, x=_stamp(x[te][300:][keep]), y=y[te][300:][keep])
    test = root / "test.npz"
    np.savez(test, x=x[te][300:], y=y[te][300:])
    return {"root": root, "clean": clean, "trig": trig, "test": test, **paths}


def _rate(csv_path: Path, npz: Path, target: int | None) -> float:
    rows = csv_path.read_text().splitlines()[1:]
    pred = np.array([int(r.split(",")[1]) for r in rows])
    y = np.load(npz)["y"]
    return float(np.mean(pred == (y if target is None else target)))


def test_audit_model_names_the_target(zoo: dict, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    rc = main(["audit-model", str(zoo["pooled"]), "--clean", str(zoo["clean"]), "--steps", "80",
               "--out", str(out), "--quiet"])
    verdict = json.loads((out / "report.json").read_text())["verdict"]
    assert rc == 1 and verdict["backdoored"] and verdict["target_class"] == TARGET


@pytest.mark.parametrize("arch,method", [("pooled", "fine-prune"), ("mlp", "unlearn")])
def test_repair_writes_a_loadable_folder(zoo: dict, tmp_path: Path, arch: str,
                                         method: str) -> None:
    before = tmp_path / "before.csv"
    assert main(["predict", str(zoo[arch]), str(zoo["trig"]), "--out", str(before)]) == 0
    asr_before = _rate(before, zoo["trig"], TARGET)
    out = tmp_path / "rep"
    rc = main(["repair", str(zoo[arch]), "--clean", str(zoo["clean"]), "--method", method,
               "--steps", "80", "--epochs", "4", "--out", str(out), "--quiet"])
    assert rc == 0 and json.loads((out / "model.json").read_text())["kind"] == "torchscript"
    after = tmp_path / "after.csv"
    assert main(["predict", str(out), str(zoo["trig"]), "--out", str(after)]) == 0
    assert asr_before > 0.8
    rep = json.loads((out / "report.json").read_text())["layers"]["model_audit"]["repair"]
    # (how far each repair lowers the ASR on such models is measured by
    # benchmarks/foreign_audit.py; these digits models are too small to judge it)
    assert rep["method"] == method and 0 <= _rate(after, zoo["trig"], TARGET) <= 1
    if method == "fine-prune":
        # the pooled channels as the classifier reads them, ranked by activation
        assert rep["details"]["layer"] == "fc" and rep["details"]["ranking"].startswith("mean")
        # the fine-tuning stamps the reversed trigger (a short unlearning after the prune)
        # exactly when pruning used its whole unit budget, and then each epoch is judged by its
        # held-out trigger ASR
        d = rep["details"]
        ft = d["finetune"]
        assert d["finetune_stamped"] == (d["pruning_capped"] and bool(d["trigger_kinds"]))
        if d["finetune_stamped"]:
            assert ft["lr"] <= RepairConfig().trigger_lr
            assert all(h["val_trigger_asr"] is not None for h in ft["history"])


def test_fine_prune_a_network_without_convolutions(zoo: dict, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    rc = main(["repair", str(zoo["mlp"]), "--clean", str(zoo["clean"]), "--method",
               "fine-prune", "--steps", "80", "--epochs", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    details = json.loads((out / "report.json").read_text())["layers"]["model_audit"]["repair"][
        "details"]
    assert details["layer"] in ("hidden", "out") and details["units"] == "inputs of a linear layer"
    p = tmp_path / "p.csv"
    assert main(["predict", str(out), str(zoo["test"]), "--out", str(p)]) == 0


def test_filter_and_scan_with_a_scripted_model(zoo: dict, tmp_path: Path) -> None:
    rc = main(["filter", str(zoo["pooled"]), str(zoo["trig"]), "--clean", str(zoo["clean"]),
               "--n-blends", "8", "--out", str(tmp_path / "f"), "--quiet"])
    assert rc in (0, 1) and (tmp_path / "f" / "flags.csv").exists()
    rc = main(["scan", str(zoo["clean"]), "--model", str(zoo["pooled"]), "--out",
               str(tmp_path / "s"), "--quiet"])
    assert rc in (0, 1) and (tmp_path / "s" / "report.json").exists()


def test_serve_builds_its_app_on_a_scripted_model(zoo: dict, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn
    from fastapi.testclient import TestClient

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **_kw: seen.setdefault("app", app))
    rc = main(["serve", str(zoo["pooled"]), "--clean", str(zoo["clean"]), "--n-blends", "8"])
    assert rc == 0
    client = TestClient(seen["app"])
    x = np.load(zoo["test"])["x"][:2]
    r = client.post("/predict", json={"inputs": x.tolist()})
    assert r.status_code == 200 and r.json()["n"] == 2


def test_linear_inputs_from_gradients_match_hooks() -> None:
    torch.manual_seed(0)
    net = Perceptron().eval()
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8)).astype(np.uint8)
    model = AuditModel(TorchClassifier(torch.jit.script(net), InputSpec(layout="raw", scale=1.0),
                                       layer=None), kind="torchscript", path=Path("m.pt"))
    seen = []
    h = net.out.register_forward_pre_hook(lambda _m, i: seen.append(i[0].detach()))
    with torch.no_grad():
        net(torch.from_numpy(x))
    h.remove()
    got = linear_inputs(model, dict(model.module.named_modules())["out"], to_data_tensor(x))
    assert torch.allclose(got, seen[0], atol=1e-4)
    units = _Units(model.module)
    assert units.layer == "out" and units.n == 48
