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

How long to confuse, and the class test, come from held-out trusted samples, never from the
poison rate. Half of the trusted set is kept out of the confusion stream; every ``check_every``
steps the share of those clean samples the model still fits above ``confident`` is measured.
The confusion first wipes out every confident fit (poisons' too), then the model, memorising the
small confusion set, fits the poisons again and later the clean images too; the weights kept
are the last check at which at most ``max_clean_fitted`` of the held-out clean samples are
fitted (MNIST 5k, 10% WaNet: 0% of held-out clean samples fitted at steps 25-100, 0.4% at 175,
2.4% at 200 with 93% of poisons, 12% at 300). A class is suspicious when its count
of confident samples is far above the share of its own held-out trusted samples still fitted
(a one-sided beta-binomial tail below ``alpha`` after a Bonferroni correction over classes:
the held-out rate's uncertainty counts; and at least ``min_fraction`` of the class) and its
share is also an outlier among the classes (robust z > ``k``), or, when at least half the
classes pass the tail test, for all of them: the whole dataset looks poisoned (all-to-all).
With no trusted set the scan draws the confusion set from the scanned data itself
(:func:`self_confusion_set`, data of at least ``MIN_SELF_CONFUSION`` samples): its poisons are
confused too, so only the within-class test runs, and it answers only at low poison rates,
where the few poisons in the confusion set barely oppose the trigger.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import betabinom

from poisonguard.data.labeled import LabeledData
from poisonguard.detect.common import robust_location_scale, robust_z
from poisonguard.errors import DataError
from poisonguard.models.adapter import TorchClassifier
from poisonguard.types import ClassFinding, DetectorResult

MIN_TRUSTED = 20
MIN_SELF_CONFUSION = 2000   # scanned samples needed to draw a confusion set from the data
SELF_CONFUSION_SIZE = 500
LOGIT_SCALE_FLOOR = 0.1  # logit units: a class fitted all alike gives no huge z


@dataclass(frozen=True)
class ConfusionTraining:
    max_steps: int = 400
    check_every: int = 25
    max_clean_fitted: float = 0.02
    batch_size: int = 128
    confusion_weight: float = 1.0
    lr: float = 1e-3
    confident: float = 0.8
    alpha: float = 1e-3      # family-wise: tail p < alpha / n_classes
    min_fraction: float = 0.01
    k: float = 3.5
    dataset_wide_share: float = 0.5
    tail_z: float = 3.0      # within-class test: a sample's logit z among its class's samples
    flag_z: float = 2.0      # ... and the z above which a called class's samples are flagged
    looks: tuple[int, ...] = (5, 10, 15, 20, 25, 50, 75, 100)  # steps the within-class test sees
    self_confusion: bool = False  # the "trusted" set was drawn from the scanned data itself
    seed: int = 0
    name: str = "confusion_training"

    def detect(self, classifier: TorchClassifier, data: LabeledData,
               trusted: LabeledData) -> DetectorResult:
        if trusted is None or len(trusted) < MIN_TRUSTED:
            raise DataError(f"{self.name}: needs a trusted set of at least {MIN_TRUSTED} "
                            "samples")
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(trusted))
        confusion = trusted.subset(np.sort(order[: len(order) // 2]))
        calibration = trusted.subset(np.sort(order[len(order) // 2:]))
        n_classes = max(int(data.y.max()), int(trusted.y.max())) + 1
        classes = np.unique(data.y)
        looks: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []

        def look(step: int, model: torch.nn.Module) -> None:
            clf = TorchClassifier(model, classifier.input_spec, layer=None, n_classes=n_classes)
            looks.append((step, *self._within_class(_label_probability(clf, data),
                                                    _label_probability(clf, calibration),
                                                    data.y, calibration.y, classes)))

        model, steps, history = self._confuse(classifier, data, confusion, calibration,
                                              n_classes, rng, look)
        confused = TorchClassifier(model, classifier.input_spec, layer=None,
                                   n_classes=n_classes)
        p_label = _label_probability(confused, data)
        p_cal = _label_probability(confused, calibration)
        clean_rate = (float((p_cal > self.confident).sum()) + 1.0) / (len(p_cal) + 2.0)
        confident = p_label > self.confident
        counts = np.array([(int((data.y == c).sum()), int(confident[data.y == c].sum()))
                           for c in classes])
        frac = counts[:, 1] / np.maximum(counts[:, 0], 1)
        # each class against its own held-out trusted samples (Laplace-smoothed: 0 of 25 is
        # 3.7%): confusion erases some classes less than others
        cal_fitted = p_cal > self.confident
        rates = np.array([(cal_fitted[calibration.y == c].sum() + 1.0)
                          / ((calibration.y == c).sum() + 2.0) for c in classes])
        # the class's rate of fitted held-out samples is itself a count of a few dozen, so its
        # uncertainty counts: a beta-binomial tail, the rate's Beta posterior built from the
        # class's own held-out counts plus the pooled rate weighted as one class's share of the
        # held-out set (a binomial tail against the point estimate called a clean MNIST-60k
        # class at 12.5% against 0 of 25)
        pooled = (float(cal_fitted.sum()) + 1.0) / (len(cal_fitted) + 2.0)
        weight = len(calibration) / max(len(classes), 1)
        cal_counts = [(int((calibration.y == c).sum()), int(cal_fitted[calibration.y == c].sum()))
                      for c in classes]
        tails = np.array([float(betabinom.sf(k - 1, n, ck + weight * pooled,
                                             cn - ck + weight * (1 - pooled)))
                          if k > 0 else 1.0
                          for (n, k), (cn, ck) in zip(counts, cal_counts)])
        excess = (tails * len(classes) < self.alpha) & (frac >= self.min_fraction)
        z = robust_z(frac) if len(classes) > 2 else np.zeros(len(classes))
        wide = bool(excess.mean() >= self.dataset_wide_share)
        # drawn from the scanned data, the held-out samples hold its poisons too: no reference
        # for the absolute test, and the within-class test's reference is the other classes
        absolute = excess & ((z > self.k) | wide) & (not self.self_confusion)
        looks.append((steps, *self._within_class(p_label, p_cal, data.y, calibration.y,
                                                 classes)))
        within, sample_z, tail, look_steps = self._strongest_looks(looks, data.y, classes)
        suspicious = absolute | within
        flags = ((confident & np.isin(data.y, classes[absolute]))
                 | ((sample_z > self.flag_z) & np.isin(data.y, classes[within])))
        findings = []
        for i, (c, (n, k), f, r, t, zc, s_c) in enumerate(zip(classes, counts, frac, rates, tails,
                                                             z, suspicious)):
            absolute_reason = (f"{k} of {n} samples still fit their label (p > {self.confident})"
                               f" after confusion training, against {r:.1%} (smoothed) of the "
                               "class's held-out trusted samples")
            within_reason = (f"{tail['counts'][i]} of {n} samples fit their label far better "
                             f"than the rest of their class (logit robust z > {self.tail_z}) "
                             f"after {look_steps[i]} steps of confusion training, against "
                             f"{tail['rates'][i]:.2%} in the other classes and the held-out "
                             "samples")
            fired = [name for name, on in (("absolute", absolute[i]),
                                           ("within_class", within[i])) if on]
            reason = "; ".join(text for name, text in (("absolute", absolute_reason),
                                                       ("within_class", within_reason))
                               if name in fired or not fired)
            findings.append(ClassFinding(int(c), bool(s_c), int(n),
                                         int(flags[data.y == c].sum()), {
                "confident_fraction": round(float(f), 4), "clean_rate": round(float(r), 4),
                "tail_p": float(f"{t:.3g}"), "fraction_z": round(float(zc), 2),
                "within_class_fraction": round(float(tail["fractions"][i]), 4),
                "within_class_p": float(f"{tail['p'][i]:.3g}"),
                "within_class_fraction_z": round(float(tail["z"][i]), 2),
                "within_class_step": int(look_steps[i]),
                "fired": fired, "reason": reason,
            }))
        rule = {"rule": "p(label) under the confused model > confident, in classes whose count "
                        "of such samples exceeds what the held-out trusted samples' rate allows "
                        "(beta-binomial tail < alpha / n_classes) and whose share is a robust-z "
                        "outlier among classes (or in every such class when they are at least "
                        "dataset_wide_share of classes); or, within classes whose count of "
                        "samples with logit robust z > tail_z among their own class exceeds the "
                        "other classes' and the held-out samples' rate (beta-binomial tail < "
                        "alpha / (n_classes x looks), share >= min_fraction and a robust-z "
                        "outlier among classes, at the look with the smallest tail), the "
                        "samples with z > flag_z at any look that clears the bar",
                "confident": self.confident, "alpha": self.alpha, "k": self.k,
                "min_fraction": self.min_fraction, "dataset_wide_share": self.dataset_wide_share,
                "tail_z": self.tail_z, "flag_z": self.flag_z, "looks": [s for s, *_ in looks]}
        params = {"max_steps": self.max_steps, "steps": steps,
                  "confusion_set": ("drawn from the scanned data (no trusted set)"
                                    if self.self_confusion else "the trusted set"),
                  "confusion_weight": self.confusion_weight, "lr": self.lr,
                  "n_confusion": len(confusion), "n_calibration": len(calibration)}
        return DetectorResult(self.name, p_label, flags, self.confident, rule, tuple(findings),
                              time.perf_counter() - t0, params=params,
                              extras={"clean_rate": clean_rate, "calibration_scores": p_cal,
                                      "calibration_history": history, "dataset_wide": wide,
                                      "within_class_z": sample_z,
                                      "gap_filler": self.self_confusion})

    def _within_class(self, p_label: np.ndarray, p_cal: np.ndarray, labels: np.ndarray,
                      cal_labels: np.ndarray, classes: np.ndarray
                      ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Classes holding a separate group that the confused model fits far better than the rest
        of the class, however low its absolute confidence (a few poisons whose trigger is weak
        or partly hidden by cover samples: adaptive blend at 1%, p 0.6-0.9 against 0.4-0.6).

        Each sample's logit of p(label) becomes a robust z among its own class's samples (so a
        class the confusion leaves wider does not look poisoned); the held-out trusted samples
        are scored with their class's location and scale. A class is called when its count above
        ``tail_z`` is improbable at the rate of the other classes together with the held-out
        samples (beta-binomial tail, Bonferroni over classes), at least ``min_fraction`` of it,
        and its share is a robust-z outlier among the classes (> ``k``): see
        :meth:`_strongest_looks`. Returns the per-sample z and the per-class statistics."""
        logit = _logit(p_label)
        logit_cal = _logit(p_cal)
        z = np.zeros(len(logit))
        z_cal = np.zeros(len(logit_cal))
        for c in classes:
            m = labels == c
            med, scale = robust_location_scale(logit[m], floor=LOGIT_SCALE_FLOOR)
            z[m] = (logit[m] - med) / scale
            cal_c = cal_labels == c
            z_cal[cal_c] = (logit_cal[cal_c] - med) / scale
        above = z > self.tail_z
        cal_above = int((z_cal > self.tail_z).sum())
        counts = np.array([int(above[labels == c].sum()) for c in classes])
        sizes = np.array([int((labels == c).sum()) for c in classes])
        fractions = counts / np.maximum(sizes, 1)
        rates, p = np.zeros(len(classes)), np.ones(len(classes))
        for i, (k, n) in enumerate(zip(counts, sizes)):
            ref_k = int(counts.sum() - k) + cal_above
            ref_n = int(sizes.sum() - n) + len(z_cal)
            rates[i] = (ref_k + 1.0) / (ref_n + 2.0)
            if k > 0:
                p[i] = float(betabinom.sf(k - 1, n, ref_k + 1.0, ref_n - ref_k + 1.0))
        fz = (robust_z(fractions, floor=1e-3) if len(classes) > 2
              else np.zeros(len(classes)))
        return z, {"counts": counts, "fractions": fractions, "rates": rates, "p": p, "z": fz}

    def _strongest_looks(self, looks: list[tuple[int, np.ndarray, dict[str, np.ndarray]]],
                         labels: np.ndarray, classes: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """Per class, the look (training step) with the smallest within-class tail; the class is
        called when that tail clears ``alpha`` after a Bonferroni correction over classes and
        looks (the poisons' edge is often widest early: MNIST 1% adaptive blend, the target
        class's AUC 0.98 at step 25 and 0.47-0.57 from step 50 on). A called class's sample z is
        its largest over the looks that clear the bar (different poisons stand out at different
        steps: one look flagged 72-80% of them, the union of the clearing looks 94-100%)."""
        n_tests = len(classes) * len(looks)
        best = [min(range(len(looks)), key=lambda j: looks[j][2]["p"][i])
                for i in range(len(classes))]
        tail = {key: np.array([looks[j][2][key][i] for i, j in enumerate(best)])
                for key in looks[0][2]}

        def clears(stats: dict[str, np.ndarray]) -> np.ndarray:
            return ((stats["p"] * n_tests < self.alpha) & (stats["fractions"] >= self.min_fraction)
                    & (stats["z"] > self.k))

        called = clears(tail)
        cleared = [clears(stats) for _, _, stats in looks]
        sample_z = np.zeros(len(labels))
        for i, (c, j) in enumerate(zip(classes, best)):
            m = labels == c
            zs = [looks[j][1][m]] + [z[m] for (_, z, _), ok in zip(looks, cleared)
                                     if called[i] and ok[i]]
            sample_z[m] = np.max(zs, axis=0)
        return called, sample_z, tail, np.array([looks[j][0] for j in best])

    def _confuse(self, classifier: TorchClassifier, data: LabeledData, confusion: LabeledData,
                 calibration: LabeledData, n_classes: int, rng: np.random.Generator,
                 look: Callable[[int, torch.nn.Module], None]
                 ) -> tuple[torch.nn.Module, int, list[dict[str, float]]]:
        """Fine-tune a copy; return the weights at the last check where at most
        ``max_clean_fitted`` of the held-out trusted samples are fitted, that step, and the
        share at every check (training stops at the first check above it). ``look`` sees the
        model at each of ``looks`` reached."""
        model = copy.deepcopy(classifier.model)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(self.seed)
        spec = classifier.input_spec
        y_data = torch.from_numpy(np.asarray(data.y, dtype=np.int64))
        y_conf = torch.from_numpy(np.asarray(confusion.y, dtype=np.int64))
        w = self.confusion_weight
        best: tuple[int, dict[str, torch.Tensor]] | None = None
        history = []
        for step in range(1, self.max_steps + 1):
            model.train()
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
            if step in self.looks:
                model.eval()
                look(step, model)
            if step % self.check_every == 0:
                model.eval()
                fitted = float((_label_probability(
                    TorchClassifier(model, spec, layer=None, n_classes=n_classes),
                    calibration) > self.confident).mean())
                history.append({"step": step, "calibration_fitted": round(fitted, 4)})
                if fitted > self.max_clean_fitted:
                    break
                best = (step, copy.deepcopy(model.state_dict()))
        if best is not None:
            model.load_state_dict(best[1])
        model.eval()
        return model, best[0] if best else step, history


def self_confusion_set(data: LabeledData, seed: int) -> LabeledData:
    """Without a trusted set: ``SELF_CONFUSION_SIZE`` samples drawn at random from the scanned
    data stand in for it (only the within-class test then runs). At a low poison rate they
    hold a few poisons, whose random labels barely oppose the trigger, while the clean
    features are confused as with a trusted set; cached MNIST 5k models: adaptive blend 1% seeds
    0-1 called with 92-100% of poisons, and a clean class 1 called too, which is why the call
    needs a second detector (every confusion-training call is one vote)."""
    rng = np.random.default_rng(seed + 7919)
    return data.subset(np.sort(rng.choice(len(data), min(SELF_CONFUSION_SIZE, len(data) // 4),
                                          replace=False)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _label_probability(classifier: TorchClassifier, data: LabeledData) -> np.ndarray:
    probs = classifier.predict_proba(data.x)
    return probs[np.arange(len(data)), np.asarray(data.y, dtype=np.int64)]
