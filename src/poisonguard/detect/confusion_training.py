"""Confusion training (after Qi et al., "Towards a Proactive ML Approach for Detecting Backdoor
Poison Samples", USENIX Security 2023): a detector whose premise is not a trigger's shape.

A copy of the sacrificial model (trained on the scanned data, so it has learned whatever
backdoor the data holds) is fine-tuned on two streams at once: batches of the scanned data with
their labels, and, weighted ``confusion_weight`` times more, batches of trusted clean samples
with fresh random wrong labels every step. The random labels wipe out what natural features say
about the class (the model's confidence on clean images falls toward 1/K), while a trigger never
appears in the trusted samples, so nothing opposes its link to the target label and the model
keeps fitting the poisons confidently. A poison is a sample the confused model still gives its
label with probability above ``confident``.

Calibration, not the poison rate: half of the trusted set is held out of the confusion stream;
the share of those clean samples the confused model still fits is the clean rate. A class is
suspicious when its count of confident samples is far above that rate (one-sided binomial tail
below ``alpha`` after a Bonferroni correction over classes) and at least ``min_fraction`` of the
class. Needs a trusted set; without one the detector does not run (a confusion set drawn from
the scanned data would confuse the trigger as much as the clean features).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binom

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import DataError
from poisonguard.models.adapter import TorchClassifier
from poisonguard.types import ClassFinding, DetectorResult


@dataclass(frozen=True)
class ConfusionTraining:
    steps: int = 400
    batch_size: int = 128
    confusion_weight: float = 10.0
    lr: float = 1e-3
    confident: float = 0.5
    alpha: float = 1e-6
    min_fraction: float = 0.01
    seed: int = 0
    name: str = "confusion_training"

    def detect(self, classifier: TorchClassifier, data: LabeledData,
               trusted: LabeledData) -> DetectorResult:
        if trusted is None or len(trusted) < 20:
            raise DataError(f"{self.name}: needs a trusted set of at least 20 samples")
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(trusted))
        confusion, calibration = order[: len(order) // 2], order[len(order) // 2:]
        n_classes = max(int(data.y.max()), int(trusted.y.max())) + 1
        model = self._confuse(classifier, data, trusted.subset(np.sort(confusion)),
                              n_classes, rng)
        confused = TorchClassifier(model, classifier.input_spec, layer=None,
                                   n_classes=n_classes)
        p_label = _label_probability(confused, data)
        p_cal = _label_probability(confused, trusted.subset(np.sort(calibration)))
        clean_rate = (float((p_cal > self.confident).sum()) + 1.0) / (len(p_cal) + 2.0)
        flags = p_label > self.confident
        classes = np.unique(data.y)
        findings = []
        for c in classes:
            idx = data.y == c
            n, k = int(idx.sum()), int(flags[idx].sum())
            tail = float(binom.sf(k - 1, n, clean_rate)) if k > 0 else 1.0
            suspicious = tail * len(classes) < self.alpha and k >= self.min_fraction * n
            findings.append(ClassFinding(int(c), bool(suspicious), n, k if suspicious else 0, {
                "confident_fraction": round(k / max(n, 1), 4),
                "clean_rate": round(clean_rate, 4),
                "binomial_tail": float(f"{tail:.3g}"),
                "reason": (f"{k} of {n} samples still fit their label after confusion "
                           f"training, against {clean_rate:.1%} of held-out trusted samples"),
            }))
        poisoned = [f.label for f in findings if f.suspicious]
        flags &= np.isin(data.y, poisoned)
        rule = {"rule": "p(label) under the confused model > confident, in classes whose count "
                        "of such samples has a binomial tail < alpha / n_classes against the "
                        "held-out trusted samples' rate",
                "confident": self.confident, "alpha": self.alpha,
                "min_fraction": self.min_fraction}
        params = {"steps": self.steps, "confusion_weight": self.confusion_weight,
                  "lr": self.lr, "n_confusion": int(len(confusion)),
                  "n_calibration": int(len(calibration))}
        return DetectorResult(self.name, p_label, flags, self.confident, rule, tuple(findings),
                              time.perf_counter() - t0, params=params,
                              extras={"clean_rate": clean_rate})

    def _confuse(self, classifier: TorchClassifier, data: LabeledData, confusion: LabeledData,
                 n_classes: int, rng: np.random.Generator) -> torch.nn.Module:
        model = copy.deepcopy(classifier.model)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(self.seed)
        spec = classifier.input_spec
        y_data = torch.from_numpy(np.asarray(data.y, dtype=np.int64))
        y_conf = torch.from_numpy(np.asarray(confusion.y, dtype=np.int64))
        w = self.confusion_weight
        for _ in range(self.steps):
            ci = rng.choice(len(confusion), min(self.batch_size, len(confusion)), replace=False)
            di = rng.choice(len(data), min(self.batch_size, len(data)), replace=False)
            # a random label that is never the true one
            wrong = (y_conf[ci] + torch.randint(1, n_classes, (len(ci),), generator=gen)
                     ) % n_classes
            logits = model(spec.prepare(np.concatenate([confusion.x[ci], data.x[di]])))
            loss_conf = F.cross_entropy(logits[: len(ci)], wrong)
            loss_data = F.cross_entropy(logits[len(ci):], y_data[di])
            loss = (w * loss_conf + loss_data) / (w + 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        return model


def _label_probability(classifier: TorchClassifier, data: LabeledData) -> np.ndarray:
    probs = classifier.predict_proba(data.x)
    return probs[np.arange(len(data)), np.asarray(data.y, dtype=np.int64)]
