"""Seed unlearning: a detector whose premise is not a trigger's shape but how a backdoor is fitted.

After ABL (Li et al., "Anti-Backdoor Learning", NeurIPS 2021), whose second stage unlearns the
isolated lowest-loss samples by gradient ascent, used here as a test rather than a repair. For a
class holding the loss seed (the samples fitted fastest), a copy of the sacrificial model takes
gradient-ascent steps on that class's seed samples until they are no longer given their label
(mean p(label) < ``stop``). Two things are then measured:

- which of the class's samples lost their label with the seed (p(label) < 0.5): when the seed
  is poison, these are the samples fitted through the same shortcut, i.e. the other poisons;
  dirty-label poisons fall to the class their content shows, while the class's own images keep
  their label through their natural features;
- the collateral: the share of other-class samples whose prediction changed. Unlearning a
  shortcut (a trigger the rest of the data never uses) costs the rest of the model almost
  nothing; unlearning the easiest images of a natural class takes the shared features with it.

A class is suspicious when at least ``min_flipped`` samples lost their label and the collateral
is at most ``max_collateral`` (MNIST 5k, seed 0: WaNet 10% 0.1%, BadNets 10% 0.5%, the easy
zeros of clean data 2.5%). The samples that lost their label are flagged (refining them by
further ascent on the flagged set and descent on the rest of the class made MNIST WaNet worse:
410 poisons and 135 clean flagged instead of 468 and 83). Scores: 1 - p(label) under the
unlearned model, in the classes tested (0 elsewhere).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from poisonguard.data.labeled import LabeledData
from poisonguard.models.adapter import TorchClassifier
from poisonguard.types import ClassFinding, DetectorResult


@dataclass(frozen=True)
class SeedUnlearning:
    lr: float = 1e-4
    stop: float = 0.5
    max_steps: int = 100
    batch_size: int = 128
    min_flipped: int = 10
    max_collateral: float = 0.01
    n_collateral: int = 2000
    seed: int = 0
    name: str = "seed_unlearning"

    def detect(self, classifier: TorchClassifier, data: LabeledData, seed_mask: np.ndarray,
               classes: list[int]) -> DetectorResult:
        t0 = time.perf_counter()
        y = np.asarray(data.y)
        scores = np.zeros(len(y))
        flags = np.zeros(len(y), dtype=bool)
        findings = []
        params: dict[str, dict[str, float]] = {}
        for c in classes:
            in_class = np.flatnonzero(y == c)
            others = np.flatnonzero(y != c)
            others = others[:: max(1, len(others) // self.n_collateral)][: self.n_collateral]
            before = classifier.predict(data.x[others])
            seed_idx = np.flatnonzero(seed_mask & (y == c))
            model, steps, p_seed = self._unlearn(classifier, data, seed_idx)
            clf = TorchClassifier(model, classifier.input_spec, layer=None,
                                  n_classes=classifier.n_classes)
            collateral = float((clf.predict(data.x[others]) != before).mean())
            p_class = clf.predict_proba(data.x[in_class])[:, c]
            lost = p_class < 0.5
            n_first = int(lost.sum())
            suspicious = n_first >= self.min_flipped and collateral <= self.max_collateral
            if suspicious:
                flags[in_class[lost]] = True
            scores[in_class] = 1.0 - p_class
            params[str(c)] = {"seed_samples": len(seed_idx), "steps": steps,
                              "seed_p_label": round(p_seed, 4)}
            findings.append(ClassFinding(int(c), bool(suspicious), len(in_class),
                                         int(lost.sum()) if suspicious else 0, {
                "lost_label": n_first, "collateral": round(collateral, 4),
                "reason": (f"unlearning the class's {len(seed_idx)} fastest-fitted samples "
                           f"({steps} ascent steps) took the label from {n_first} of its "
                           f"{len(in_class)} samples and changed {collateral:.1%} of "
                           "other-class predictions"),
            }))
        rule = {"rule": "classes holding the loss seed: after gradient ascent on the class's "
                        "seed until its mean p(label) < stop, at least min_flipped class "
                        "samples have p(label) < 0.5 and at most max_collateral of other-class "
                        "predictions changed; flagged: those samples",
                "stop": self.stop, "min_flipped": self.min_flipped,
                "max_collateral": self.max_collateral}
        return DetectorResult(self.name, scores, flags, 0.5, rule, tuple(findings),
                              time.perf_counter() - t0, params={"classes": params})

    def _unlearn(self, classifier: TorchClassifier, data: LabeledData, forget: np.ndarray
                 ) -> tuple[torch.nn.Module, int, float]:
        """A copy of the model after gradient ascent on ``forget`` (all of one class) until
        their mean p(label) < ``stop``; the model, the steps taken and that mean."""
        model = copy.deepcopy(classifier.model)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.0)
        rng = np.random.default_rng(self.seed)
        spec = classifier.input_spec
        labels = torch.from_numpy(np.asarray(data.y, dtype=np.int64))
        check = forget[:: max(1, len(forget) // 256)]
        p_forget, steps = 1.0, 0
        while steps < self.max_steps:
            steps += 1
            model.train()
            f = forget if len(forget) <= self.batch_size else rng.choice(
                forget, self.batch_size, replace=False)
            loss = -F.cross_entropy(model(spec.prepare(data.x[f])), labels[f])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.eval()
            with torch.no_grad():
                probs = F.softmax(model(spec.prepare(data.x[check])), 1)
                p_forget = float(probs[torch.arange(len(check)), labels[check]].mean())
            if p_forget < self.stop:
                break
        model.eval()
        return model, steps, p_forget
