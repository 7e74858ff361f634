"""Exploratory (not in the CLI): MNTD-style jointly optimised queries (Xu et al., IEEE S&P 2021)
on benchmarks/meta.py's zoo with hard negatives, leave one attack out, the same splits.

Per split, 16 queries (the model-input space of the digits CNN, 1x8x8 in [0, 1]) and a linear
head on the zoo models' sorted class probabilities on them are optimised together (Adam, 80
steps, balanced binary cross-entropy) on the split's training models; the held-out models are
scored by that head. Three seeds (query and head initialisation); reported alone and
averaged with the weight meta model's probability (``benchmarks/meta.py``'s fit on the same
split). Needs benchmarks/meta.py's cache.

    python benchmarks/meta_mntd.py

Results: benchmarks/results/meta_mntd.{json,md}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import meta as B  # noqa: E402

N_QUERIES, STEPS, SEEDS = 16, 80, (0, 1, 2)


def _features(mods: list[Any], queries: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.sort(torch.softmax(mods[i](queries), 1), 1,
                                   descending=True)[0].flatten() for i in idx])


def fit(mods: list[Any], y: np.ndarray, train: np.ndarray, seed: int = 0
        ) -> tuple[torch.Tensor, torch.nn.Linear]:
    """Queries and head optimised together on the ``train`` models."""
    torch.manual_seed(seed)   # the head's initialisation
    g = torch.Generator().manual_seed(seed)
    queries = torch.rand(N_QUERIES, 1, 8, 8, generator=g).requires_grad_(True)
    head = torch.nn.Linear(N_QUERIES * 10, 1)
    opt = torch.optim.Adam([{"params": [queries], "lr": 0.05},
                            {"params": head.parameters(), "lr": 0.01}])
    yt = torch.tensor(y[train], dtype=torch.float32)
    w = torch.where(yt > 0, 0.5 / yt.mean(), 0.5 / (1 - yt.mean()))
    for _ in range(STEPS):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            head(_features(mods, queries, train))[:, 0], yt, weight=w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            queries.clamp_(0, 1)
    return queries.detach(), head


def main() -> int:
    from poisonguard.models.io import load_model

    torch.set_num_threads(1)
    code = B.code_version()
    t0 = time.perf_counter()
    zoo = json.loads((B.CACHE / "zoo" / "zoo.json").read_text())["models"]
    names, x, _ = B.features(zoo)
    mods = []
    for e in zoo:
        m = load_model(B.CACHE / "zoo" / e["folder"]).model.eval()
        for p in m.parameters():
            p.requires_grad_(False)
        mods.append(m)
    y = np.array([e["backdoored"] for e in zoo])
    attack = np.array([e["attack"] or "" for e in zoo])
    clean = np.flatnonzero(~y)
    halves = [clean[clean % 2 == 0], clean[clean % 2 == 1]]
    runs = [run(mods, x, y, attack, clean, halves, seed) for seed in SEEDS]
    out = {k: {a: round(float(np.mean([r[k][a] for r in runs])), 4) for a in B.ATTACKS}
           for k in runs[0]}
    res = {"code": code, "n_models": len(zoo), "n_queries": N_QUERIES, "steps": STEPS,
           "seeds": list(SEEDS), "leave_one_attack_out_mean_over_seeds": out,
           "per_seed": runs,
           "mean_auroc": {k: round(float(np.mean(list(v.values()))), 4) for k, v in out.items()},
           "wall_s": round(time.perf_counter() - t0, 1)}
    lines = ["# Jointly optimised queries (exploratory; zoo with hard negatives)", "",
             f"`python benchmarks/meta_mntd.py` (code {code}, {res['wall_s']:.0f} s). Method "
             "in the script's docstring. Leave-one-attack-out AUROC, mean over seeds "
             f"{list(SEEDS)} (per seed in the JSON):", "",
             "| scores | mean | " + " | ".join(B.ATTACKS) + " |",
             "|---|---|" + "---|" * len(B.ATTACKS)]
    for k, v in out.items():
        lines.append(f"| {k} | {res['mean_auroc'][k]} | "
                     + " | ".join(str(v[a]) for a in B.ATTACKS) + " |")
    lines += ["", "Per seed, averaged with weights: "
              + "; ".join(f"seed {sd}: " + ", ".join(f"{a} {r['averaged_with_weights'][a]}"
                                                    for a in B.ATTACKS)
                          for sd, r in zip(SEEDS, runs))]
    B.RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(res, indent=1) + "\n"),
                         ("md", "\n".join(lines) + "\n")):
        tmp = B.RESULTS / f".meta_mntd.{suffix}.tmp"
        tmp.write_text(text)
        tmp.replace(B.RESULTS / f"meta_mntd.{suffix}")
    return 0


def run(mods: list[Any], x: np.ndarray, y: np.ndarray, attack: np.ndarray, clean: np.ndarray,
        halves: list[np.ndarray], seed: int) -> dict[str, dict[str, float]]:
    """One seed's leave-one-attack-out AUROC per attack, both scorings."""
    from poisonguard.metrics import auroc

    out: dict[str, dict[str, float]] = {"optimised_queries": {}, "averaged_with_weights": {}}
    for a in B.ATTACKS:
        held = np.flatnonzero(attack == a)
        scores = {k: (np.zeros(len(held)), np.zeros(len(y))) for k in out}
        for h in halves:
            train = np.setdiff1d(np.arange(len(y)), np.concatenate([held, h]))
            test = np.concatenate([held, h])
            queries, head = fit(mods, y, train, seed)
            with torch.no_grad():
                sq = torch.sigmoid(head(_features(mods, queries, test))[:, 0]).numpy()
            sw, _ = B.fit_score(x, y, train, test)
            for k, s in (("optimised_queries", sq), ("averaged_with_weights", (sq + sw) / 2)):
                scores[k][0][:] += s[:len(held)] / len(halves)
                scores[k][1][h] = s[len(held):]
        truth = np.concatenate([np.ones(len(held), bool), np.zeros(len(clean), bool)])
        for k, (bd, cs) in scores.items():
            out[k][a] = round(float(auroc(np.concatenate([bd, cs[clean]]), truth)), 4)
        print(seed, a, {k: v[a] for k, v in out.items()}, flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
