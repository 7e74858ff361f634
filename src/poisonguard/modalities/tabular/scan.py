"""The quarantine scan for tables: the built-in MLP (standardised numeric columns, embeddings
for categoricals) trained on the rows, the representation detectors on its ``embed`` layer,
then the rule miner in every class. Only confirmed rules call a class and flag rows: the
representation detectors' flags are the miner's input, not the scan's output (on a clean table
they flag natural outliers, and a rule that explains them fails the miner's tests). One
round, as for text and audio: the miner already flags every row matching a rule."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from poisonguard.data.labeled import check_scannable
from poisonguard.modalities.tabular.data import TabularData
from poisonguard.modalities.tabular.miner import RuleMiner
from poisonguard.modalities.tabular.model import ARCH, TabularMLP
from poisonguard.models.adapter import InputSpec, TorchClassifier
from poisonguard.models.training import TrainConfig, TrainResult, train_classifier
from poisonguard.pipeline import RoundResult, ScanConfig, ScanResult, embed_and_detect
from poisonguard.types import ClassFinding, DetectorResult

ROW_SPEC = InputSpec(layout="raw", scale=1.0, dtype="float32")
TABULAR_DETECTORS = ("activation_clustering", "spectral_signatures", "loss_outliers",
                     "scan_decomposition")
# about 1M row visits (25 epochs of 40k rows): at 400k a 2-column trigger on 0.3% of bank
# marketing was not learned (ASR 1.5%), at 1M it was (76%)
ROW_VISITS = 1_000_000
BATCH_SIZE = 256


def tabular_epochs(n_rows: int) -> int:
    return int(np.clip(round(ROW_VISITS / max(n_rows, 1)), 4, 60))


@dataclass(frozen=True)
class TabularOptions:
    """Tabular-specific settings: the built-in MLP's learning rate and width, the miner."""

    lr: float = 2e-3
    hidden: int = 128
    outlier_z: float = 3.5
    miner: RuleMiner = field(default_factory=RuleMiner)


def score_outliers(scores: np.ndarray, labels: np.ndarray, z: float) -> np.ndarray:
    """Rows whose score is more than ``z`` robust standard deviations (1.4826 MAD) above
    their class's median: a detector's own outliers, whether or not it called the class."""
    out = np.zeros(len(scores), dtype=bool)
    for c in np.unique(labels):
        m = labels == c
        s = scores[m]
        med = np.median(s)
        mad = 1.4826 * np.median(np.abs(s - med))
        if mad > 0:
            out[m] = (s - med) / mad > z
    return out


@dataclass
class TabularScanResult(ScanResult):
    """A :class:`~poisonguard.pipeline.ScanResult` plus what the tabular modality adds."""

    triggers: list[dict[str, Any]] = field(default_factory=list)
    tabular_info: dict[str, Any] = field(default_factory=dict)


def cardinalities(data: TabularData) -> list[int]:
    return [data.cardinality(j) if c in data.encodings else 0
            for j, c in enumerate(data.columns)]


def train_tabular_model(data: TabularData, n_classes: int, seed: int = 0,
                        epochs: int | None = None, options: TabularOptions | None = None,
                        progress: bool = False,
                        stage: str = "tabular scan: sacrificial model") -> TrainResult:
    """The built-in tabular MLP trained on ``data`` (seeded; standardisation fit on it)."""
    from poisonguard.models.training import seed_everything

    options = options or TabularOptions()
    seed_everything(seed)
    cards = cardinalities(data)
    model = TabularMLP(cards, n_classes, hidden=options.hidden)
    model.fit_normalization(data.x)
    tc = TrainConfig(epochs=epochs or tabular_epochs(len(data)), batch_size=BATCH_SIZE,
                     lr=options.lr, weight_decay=1e-5, seed=seed)
    train = train_classifier(data, tc, model=model, input_spec=ROW_SPEC, arch=ARCH,
                             n_classes=n_classes, progress=progress, stage=stage)
    train.arch_kwargs = {"cardinalities": cards, "n_classes": n_classes,
                         "hidden": options.hidden}
    return train


def _rule_verdict(data: TabularData, results: list[DetectorResult], first: DetectorResult,
                  mined: DetectorResult) -> DetectorResult:
    """The scan's cross-referenced result: the miner's flags, classes called by confirmed
    rules only (the first stage's opinion kept as evidence)."""
    confirmed = {f.label for f in mined.findings if f.suspicious}
    det_flags = {**first.extras["detector_flags"], mined.name: mined.flags}
    votes = first.extras["votes"] + mined.flags
    findings = []
    for f in first.findings:
        poisoned = f.label in confirmed
        detectors = [*f.evidence.get("detectors", []), mined.name] if poisoned else []
        findings.append(ClassFinding(
            f.label, poisoned, f.n_samples, int(mined.flags[data.y == f.label].sum()),
            {"verdict": "poisoned" if poisoned else "clean", "detectors": detectors,
             "first_stage": f.evidence.get("verdict"),
             "n_flagged_first_stage": f.n_flagged}))
    scores = np.where(mined.flags, np.maximum(mined.scores, 0.5),
                      0.5 * first.scores)
    return DetectorResult(first.name, scores, mined.flags.copy(), None,
                          {**first.threshold_rule, "second_stage": mined.name,
                           "flags": "rows matching a confirmed rule"}, tuple(findings),
                          first.runtime_s + mined.runtime_s,
                          extras={"votes": votes, "detector_flags": det_flags,
                                  "rounds": []})


def scan_tabular(data: TabularData, config: ScanConfig | None = None,
                 options: TabularOptions | None = None,
                 predict: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> TabularScanResult:
    """Scan a table for poisoned rows; told nothing about any attack (see the module
    docstring). ``predict`` (a user's model's ``predict_proba`` over the encoded rows) replaces
    the sacrificial model in the miner's flip test; the representations still come from the
    sacrificial MLP."""
    config = config or ScanConfig(detectors=TABULAR_DETECTORS)
    options = options or TabularOptions()
    check_scannable(data)
    t_start = time.perf_counter()
    k = data.n_classes
    train = train_tabular_model(data, k, config.seed, config.epochs, options, config.progress)
    clf: TorchClassifier = train.classifier
    timings: dict[str, float] = {"training_s": round(time.perf_counter() - t_start, 3)}
    out, results, first = embed_and_detect(clf, data.x, data.y, config, TABULAR_DETECTORS,
                                           timings)
    t0 = time.perf_counter()
    targets = {"cross_reference": first.flags,
               **{r.name: score_outliers(r.scores, data.y, options.outlier_z) for r in results}}
    mined = options.miner.detect(data, targets, list(range(k)), predict or clf.predict_proba)
    combined = _rule_verdict(data, results, first, mined)
    results = [*results, mined]
    timings["detectors_s"] = round(timings["detectors_s"] + time.perf_counter() - t0, 3)
    rnd = RoundResult(np.arange(len(data)), results, combined, clf, train, timings)
    triggers = [t for f in mined.findings for t in f.evidence["triggers"]]
    timings = {"total_s": round(time.perf_counter() - t_start, 3), "rounds": 1, **timings}
    info = {"modality": "tabular", "label_map": data.label_map, "columns": data.columns,
            "categorical": sorted(data.encodings), "encodings": data.encodings,
            "missing": data.missing, "epochs": train.config.epochs,
            "train_accuracy": train.history[-1]["train_acc"],
            "first_stage_flagged": int(first.flags.sum())}
    return TabularScanResult(data=data, rounds=[rnd], combined=combined,
                             representations=out["representations"], losses=out["losses"],
                             config=config, final_classifier=None, final_train=None,
                             timings=timings, skipped={}, triggers=triggers,
                             tabular_info=info)
