"""Train a zoo of MNIST models whose architectures poisonguard did not write, as TorchScript.

This script imports only numpy and torch (never poisonguard): it stands for a third party who
hands over a scripted model. Four architectures, none of them a built-in: a conv-conv-fc network
behind a uint8 front end, a batch-norm CNN with global pooling (not Sequential), a residual CNN
and a plain MLP. Six models are backdoored (a stamped patch or pixel pattern, or a blend, each
with its own target) and six are clean twins (other seeds). Every model takes raw uint8 images
(N, 28, 28) and does its own scaling.

    python benchmarks/foreign_zoo.py [--out benchmarks/cache/foreign_zoo]

Writes OUT/<name>.pt (TorchScript), OUT/clean.npz (500 trusted test images, ``x``/``y``),
OUT/test.npz (2000 other test images), OUT/<name>_triggered.npz (those of them not of the
target class, trigger stamped, true labels) and OUT/zoo.json (each model's architecture, attack,
target, clean accuracy and ASR as measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent
MNIST = ROOT.parent.parent / "shared" / "datasets" / "mnist" / "mnist.npz"
N_TRAIN, EPOCHS, RATE = 12000, 2, 0.05


class ConvConvFC(nn.Module):
    """conv-pool-conv-pool-fc-fc behind a uint8 front end."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 5, padding=2)
        self.c2 = nn.Conv2d(16, 32, 5, padding=2)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float().unsqueeze(1) / 255.0
        h = F.max_pool2d(F.relu(self.c1(h)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        return self.fc2(F.relu(self.fc1(h.flatten(1))))


class BNGlobal(nn.Module):
    """Three strided conv + batch-norm blocks, global average pooling, one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for cin, cout in ((1, 24), (24, 48), (48, 64)):
            self.blocks.append(nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1,
                                                       bias=False),
                                             nn.BatchNorm2d(cout), nn.ReLU()))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x.float().unsqueeze(1) - 33.3) / 78.6
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean(dim=(2, 3)))


class Residual(nn.Module):
    """A stem, two residual blocks with a skip connection, pooling and a two-layer head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 32, 3, padding=1)
        self.r1a = nn.Conv2d(32, 32, 3, padding=1)
        self.r1b = nn.Conv2d(32, 32, 3, padding=1)
        self.down = nn.Conv2d(32, 48, 3, stride=2, padding=1)
        self.r2a = nn.Conv2d(48, 48, 3, padding=1)
        self.r2b = nn.Conv2d(48, 48, 3, padding=1)
        self.hidden = nn.Linear(48 * 7 * 7, 100)
        self.out = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x.float().unsqueeze(1) / 255.0))
        h = F.relu(h + self.r1b(F.relu(self.r1a(h))))
        h = F.relu(self.down(h))
        h = F.relu(h + self.r2b(F.relu(self.r2a(h))))
        h = F.max_pool2d(h, 2)
        return self.out(F.relu(self.hidden(h.flatten(1))))


class MLP(nn.Module):
    """784-256-128-10 with dropout; no convolution at all."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255.0)


ARCHS = {"convconvfc": ConvConvFC, "bnglobal": BNGlobal, "residual": Residual, "mlp": MLP}

# (name, arch, attack, target, attack parameters, seed); the clean twins come after
BACKDOORED = [
    ("fz_convfc_pattern", "convconvfc", "pattern", 7, {"corner": "bottom-right"}, 11),
    ("fz_bn_patch", "bnglobal", "patch", 2, {"size": 4, "corner": "top-left"}, 12),
    ("fz_res_patch", "residual", "patch", 5, {"size": 3, "corner": "bottom-left"}, 13),
    ("fz_mlp_patch", "mlp", "patch", 9, {"size": 4, "corner": "top-right"}, 14),
    ("fz_convfc_blend", "convconvfc", "blend", 1, {"alpha": 0.2}, 15),
    ("fz_bn_pattern", "bnglobal", "pattern", 4, {"corner": "top-right"}, 16),
]
CLEAN = [("fz_convfc_clean", "convconvfc", 21), ("fz_bn_clean", "bnglobal", 22),
         ("fz_res_clean", "residual", 23), ("fz_mlp_clean", "mlp", 24),
         ("fz_convfc_clean2", "convconvfc", 25), ("fz_res_clean2", "residual", 26)]


def _corner(corner: str, size: int) -> tuple[slice, slice]:
    r = slice(0, size) if corner.startswith("top") else slice(28 - size - 1, 27)
    c = slice(0, size) if corner.endswith("left") else slice(28 - size - 1, 27)
    return r, c


def stamp(x: np.ndarray, attack: str, params: dict[str, Any]) -> np.ndarray:
    """The trigger on uint8 images (N, 28, 28)."""
    out = x.copy()
    if attack == "patch":
        r, c = _corner(params["corner"], params["size"])
        out[:, r, c] = 255
    elif attack == "pattern":  # four pixels in a small diagonal-and-corner shape
        r, c = _corner(params["corner"], 4)
        for dr, dc in ((0, 0), (1, 1), (2, 2), (0, 2)):
            out[:, r.start + dr, c.start + dc] = 255
    elif attack == "blend":
        noise = np.random.default_rng(1234).integers(0, 256, (28, 28)).astype(np.float32)
        a = params["alpha"]
        out = np.clip((1 - a) * x.astype(np.float32) + a * noise, 0, 255).astype(np.uint8)
    else:
        raise ValueError(attack)
    return out


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    pred = torch.cat([model(torch.from_numpy(x[i:i + 500])).argmax(1)
                      for i in range(0, len(x), 500)])
    return float((pred.numpy() == y).mean())


def build(out: Path) -> dict[str, Any]:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with np.load(MNIST, allow_pickle=False) as d:
        x_tr, y_tr, x_te, y_te = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    rng = np.random.default_rng(0)
    sub = rng.permutation(len(x_tr))[:N_TRAIN]
    x_tr, y_tr = x_tr[sub], y_tr[sub].astype(np.int64)
    te = rng.permutation(len(x_te))
    clean_idx, test_idx = te[:500], te[500:2500]
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "clean.npz", x=x_te[clean_idx], y=y_te[clean_idx].astype(np.int64))
    x_test, y_test = x_te[test_idx], y_te[test_idx].astype(np.int64)
    np.savez(out / "test.npz", x=x_test, y=y_test)
    records = []
    jobs = [(n, a, atk, t, p, s) for n, a, atk, t, p, s in BACKDOORED]
    jobs += [(n, a, None, None, {}, s) for n, a, s in CLEAN]
    for name, arch, attack, target, params, seed in jobs:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = ARCHS[arch]()
        x, y = x_tr, y_tr
        rec: dict[str, Any] = {"name": name, "arch": arch, "seed": seed, "attack": attack,
                               "target": target, "params": params}
        if attack is not None:
            prng = np.random.default_rng(seed)
            pool = np.flatnonzero(y_tr != target)
            victims = prng.choice(pool, int(RATE * len(y_tr)), replace=False)
            x, y = x_tr.copy(), y_tr.copy()
            x[victims] = stamp(x_tr[victims], attack, params)
            y[victims] = target
        train(model, x, y, seed)
        scripted = torch.jit.script(model)
        scripted.save(str(out / f"{name}.pt"))
        rec["clean_acc"] = accuracy(model, x_test, y_test)
        if attack is not None:
            keep = y_test != target
            xt = stamp(x_test[keep], attack, params)
            np.savez(out / f"{name}_triggered.npz", x=xt, y=y_test[keep])
            rec["asr"] = float(np.mean(accuracy(model, xt, np.full(len(xt), target))))
        rec["train_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(rec), flush=True)
        records.append(rec)
    zoo = {"n_train": N_TRAIN, "epochs": EPOCHS, "poison_rate": RATE, "models": records}
    (out / "zoo.json").write_text(json.dumps(zoo, indent=2) + "\n")
    return zoo


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "cache" / "foreign_zoo"))
    args = p.parse_args()
    build(Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
