"""A FedAvg simulation with backdoor attackers, to measure the server-side defences.

``n`` clients hold IID shards of MNIST or CIFAR-10; each round every client trains the global
model locally (SGD, a few epochs) and sends its delta; the :class:`FederatedServer` aggregates.
From ``attack_start`` on, the malicious clients attack every round:

- ``data``: they train on their shard with a BadNets patch stamped on ``poison_fraction`` of it
  (relabelled to the target), otherwise like everyone else;
- ``replace``: model replacement (Bagdasaryan et al. 2020): they train on that poisoned shard
  and scale the delta of the weights (not of BatchNorm's running statistics, which scaled
  could turn negative) by gamma = n_clients / server_lr, so that FedAvg's mean is about the
  backdoored model.

Every round records clean accuracy, ASR (the triggered test set's share classified as the
target) and the clients the defence named.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from poisonguard.attacks import badnets
from poisonguard.data import LabeledData, load_shared
from poisonguard.errors import ConfigError
from poisonguard.federated.aggregators import trim_count
from poisonguard.federated.server import DEFENSES, FederatedServer
from poisonguard.models.adapter import InputSpec
from poisonguard.models.architectures import build_model

DATASETS = ("mnist", "cifar10")
ATTACKS = ("none", "data", "replace")
MODELS = ("mlp", "cnn")


@dataclass(frozen=True)
class SimConfig:
    """Simulation settings; see the module docstring. ``target`` None: (3 * seed + 1) % 10."""

    dataset: str = "mnist"
    data_root: str = "../shared/datasets"
    clients: int = 10
    malicious: int = 1
    attack: str = "data"
    defense: str = "cluster"
    rounds: int = 15
    attack_start: int = 5
    seed: int = 0
    samples_per_client: int = 1000
    test_size: int = 5000
    model: str = "mlp"
    cnn_width: int = 8
    local_epochs: int = 1
    local_lr: float = 0.05
    batch_size: int = 32
    server_lr: float = 1.0
    poison_fraction: float = 0.5
    attack_epochs: int = 2
    target: int | None = None
    patch_size: int = 3
    noise: float = 0.0
    trim_fraction: float = 0.1
    krum_f: int | None = None
    z: float | None = None
    alpha: float = 0.002

    def check(self) -> None:
        """ConfigError on any bad setting, before data is loaded."""
        if self.dataset not in DATASETS:
            raise ConfigError(f"--dataset must be one of {list(DATASETS)}, got {self.dataset!r}")
        if self.attack not in ATTACKS:
            raise ConfigError(f"--attack must be one of {list(ATTACKS)}, got {self.attack!r}")
        if self.defense not in DEFENSES:
            raise ConfigError(f"--defense must be one of {list(DEFENSES)}, got "
                              f"{self.defense!r}")
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {list(MODELS)}, got {self.model!r}")
        if self.clients < 3:
            raise ConfigError(f"--clients must be >= 3, got {self.clients}")
        if not 0 <= self.malicious < self.clients / 2:
            raise ConfigError(f"--malicious must be in 0..{(self.clients - 1) // 2} (fewer "
                              f"than half of {self.clients} clients), got {self.malicious}")
        if self.attack != "none" and self.malicious == 0:
            raise ConfigError(f"--attack {self.attack} needs --malicious >= 1")
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if not 1 <= self.attack_start <= self.rounds:
            raise ConfigError(f"--attack-start must be in 1..{self.rounds}, got "
                              f"{self.attack_start}")
        for name in ("samples_per_client", "test_size", "local_epochs", "attack_epochs",
                     "batch_size", "cnn_width", "patch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got "
                                  f"{getattr(self, name)}")
        for name in ("local_lr", "server_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if not 0.0 < self.poison_fraction < 1.0:
            raise ConfigError(f"--poison-fraction must be in (0, 1), got {self.poison_fraction}")
        if self.target is not None and not 0 <= self.target < 10:
            raise ConfigError(f"--target must be a class in 0..9, got {self.target}")
        if self.defense == "trimmed":
            trim_count(self.clients, self.trim_fraction)
        if self.defense == "krum":
            f = (self.clients - 3) // 2 if self.krum_f is None else self.krum_f
            if f < 0 or self.clients < 2 * f + 3:
                raise ConfigError(f"Krum with f={f} needs at least {2 * f + 3} clients, got "
                                  f"{self.clients}")
        FederatedServer(self.defense, noise=self.noise, trim_fraction=self.trim_fraction,
                        krum_f=self.krum_f, z=self.z, alpha=self.alpha)

    @property
    def attack_target(self) -> int:
        return (3 * self.seed + 1) % 10 if self.target is None else self.target

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_federation(cfg: SimConfig) -> tuple[list[LabeledData], LabeledData]:
    """IID shards (``samples_per_client`` each, seeded) and a seeded test subset."""
    train = load_shared(cfg.dataset, cfg.data_root)
    test = load_shared(cfg.dataset, cfg.data_root, split="test")
    need = cfg.clients * cfg.samples_per_client
    if need > len(train):
        raise ConfigError(f"{cfg.clients} clients x {cfg.samples_per_client} samples = {need} "
                          f"exceeds the {len(train)} training samples; lower either")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(train))[:need]
    shards = [train.subset(np.sort(part)) for part in np.array_split(order, cfg.clients)]
    keep = np.sort(rng.permutation(len(test))[:min(cfg.test_size, len(test))])
    return shards, test.subset(keep)


def _build(cfg: SimConfig, sample: np.ndarray, spec: InputSpec) -> nn.Module:
    shape = tuple(spec.prepare(sample[:1]).shape[1:])
    torch.manual_seed(cfg.seed)
    if cfg.model == "mlp":
        return build_model("mlp", in_features=int(np.prod(shape)), n_classes=10)
    return build_model("cnn", in_channels=shape[0], n_classes=10, width=cfg.cnn_width,
                       pools=2)


def _float_keys(model: nn.Module) -> list[str]:
    return [k for k, v in model.state_dict().items() if v.is_floating_point()]


def local_update(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor,
                 y: torch.Tensor, epochs: int, lr: float, batch_size: int,
                 gen: torch.Generator, keys: list[str]) -> dict[str, np.ndarray]:
    """Train ``model`` from ``state`` on (x, y) with SGD (momentum 0.9); return the delta of
    its floating-point entries (parameters and float buffers)."""
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = perm[start:start + batch_size]
            if len(idx) < 2:
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    new = model.state_dict()
    return {k: (new[k] - state[k]).numpy().copy() for k in keys}


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), 1000):
        correct += int((model(x[start:start + 1000]).argmax(1) == y[start:start + 1000]).sum())
    return correct / max(len(x), 1)


def simulate(cfg: SimConfig, progress: Any = None) -> dict[str, Any]:
    """Run the simulation; return the report (config, per-round records, summary).
    ``progress(record)`` is called after every round when given."""
    cfg.check()
    t0 = time.perf_counter()
    shards, test = load_federation(cfg)
    spec = InputSpec.for_data(test.x)
    rng = np.random.default_rng(cfg.seed + 1)
    ids = [f"client-{i:02d}" for i in range(cfg.clients)]
    bad = sorted(rng.choice(cfg.clients, cfg.malicious, replace=False).tolist())
    malicious = [ids[i] for i in bad] if cfg.attack != "none" else []
    target = cfg.attack_target
    clean_xy = [(spec.prepare(s.x), torch.from_numpy(s.y)) for s in shards]
    poisoned_xy: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    triggered = None
    for i in bad:
        p = badnets(shards[i], rate=cfg.poison_fraction, target=target, seed=cfg.seed + 100 + i,
                    test=test, size=cfg.patch_size)
        poisoned_xy[i] = (spec.prepare(p.data.x), torch.from_numpy(p.data.y))
        triggered = p.test_triggered
    if triggered is None:  # no attacker: ASR of the same trigger, for reference
        triggered = badnets(shards[0], rate=cfg.poison_fraction, target=target, seed=cfg.seed,
                            test=test, size=cfg.patch_size).test_triggered
    x_test, y_test = spec.prepare(test.x), torch.from_numpy(test.y)
    x_trig, y_trig = spec.prepare(triggered.x), torch.from_numpy(triggered.y)
    model = _build(cfg, shards[0].x, spec)
    keys = _float_keys(model)
    params = {name for name, _ in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    server = FederatedServer(cfg.defense, noise=cfg.noise, trim_fraction=cfg.trim_fraction,
                             krum_f=cfg.krum_f, z=cfg.z, alpha=cfg.alpha, seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    weights = {cid: len(s) for cid, s in zip(ids, shards)}
    records = []
    for rnd in range(1, cfg.rounds + 1):
        attacking = cfg.attack != "none" and rnd >= cfg.attack_start
        updates = {}
        for i, cid in enumerate(ids):
            if attacking and i in poisoned_xy:
                x, y = poisoned_xy[i]
                epochs = cfg.local_epochs if cfg.attack == "data" else cfg.attack_epochs
                delta = local_update(model, state, x, y, epochs, cfg.local_lr,
                                     cfg.batch_size, gen, keys)
                if cfg.attack == "replace":  # weights scaled; BatchNorm statistics kept
                    gamma = cfg.clients / cfg.server_lr
                    delta = {k: v * gamma if k in params else v for k, v in delta.items()}
            else:
                x, y = clean_xy[i]
                delta = local_update(model, state, x, y, cfg.local_epochs, cfg.local_lr,
                                     cfg.batch_size, gen, keys)
            updates[cid] = delta
        result = server.aggregate(updates, weights)
        for k in keys:
            state[k] = state[k] + cfg.server_lr * torch.from_numpy(result.update[k])
        model.load_state_dict(state)
        named = result.named
        record = {"round": rnd, "attacking": attacking,
                  "accuracy": round(_accuracy(model, x_test, y_test), 4),
                  "asr": round(_accuracy(model, x_trig, y_trig), 4), "named": named,
                  "malicious_named": bool(malicious) and all(m in named for m in malicious),
                  "false_positives": sum(c not in malicious for c in named),
                  "scores": {c: round(s, 4) for c, s in result.scores.items()},
                  "threshold": result.verdict.threshold,
                  "update_norms": {c: round(float(np.sqrt(sum(np.square(v).sum()
                                                              for v in u.values()))), 4)
                                   for c, u in updates.items()}}
        records.append(record)
        if progress is not None:
            progress(record)
    attack_rounds = [r for r in records if r["attacking"]]
    n_honest = cfg.clients - len(malicious)
    summary = {
        "final_accuracy": records[-1]["accuracy"], "final_asr": records[-1]["asr"],
        "names_clients": server.defense in ("krum", "cluster"),
        "named_rate": (sum(r["malicious_named"] for r in attack_rounds) / len(attack_rounds)
                       if attack_rounds else None),
        "named_rounds": sum(r["malicious_named"] for r in attack_rounds),
        "attack_rounds": len(attack_rounds),
        "false_positive_rate": round(sum(r["false_positives"] for r in records)
                                     / (n_honest * len(records)), 4),
        "max_asr_after_start": max((r["asr"] for r in attack_rounds), default=None),
        "wall_s": round(time.perf_counter() - t0, 2)}
    return {"schema": "poisonguard-federated-v1", "config": cfg.to_dict(),
            "clients": ids, "malicious": malicious, "target": target,
            "threshold_rule": result.verdict.threshold_rule, "rounds": records,
            "summary": summary}


def write_report(report: dict[str, Any], out: str | Path) -> Path:
    """Write ``report`` to ``out``/report.json atomically."""
    from poisonguard.io import atomic_write_json
    from poisonguard.types import jsonable

    return atomic_write_json(Path(out) / "report.json", jsonable(report))
