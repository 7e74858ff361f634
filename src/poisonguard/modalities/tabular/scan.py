"""The quarantine scan for tables: a sacrificial MLP fit on the encoded rows, the
representation detectors on its ``embed`` layer, then the rule miner in every class, whose
confirmed rules make their class poisoned and flag every row of the class they match. One
round, as for text: the miner already flags every carrier."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from poisonguard.data.labeled import check_scannable
from poisonguard.modalities.tabular.data import TabularData
from poisonguard.modalities.tabular.miner import RuleMiner
from poisonguard.modalities.tabular.model import ARCH, TabularMLP
from poisonguard.models.adapter import InputSpec, TorchClassifier
from poisonguard.models.training import TrainConfig, TrainResult, seed_everything, train_classifier
from poisonguard.pipeline import (
    RoundResult,
    ScanConfig,
    ScanResult,
    _join_stage,
    _merge_rounds,
    run_detectors,
)

TABLE_SPEC = InputSpec(layout="flat", scale=1.0, dtype="float32")
TABULAR_DETECTORS = ("activation_clustering", "spectral_signatures", "loss_outliers",
                     "scan_decomposition")


@dataclass(frozen=True)
class TabularOptions:
    """Tabular settings: sacrificial-model epochs (default: about 200k row visits, 3..30),
    learning rate, and the rule miner."""

    lr: float = 3e-3
    visits: int = 200_000
    miner: RuleMiner = field(default_factory=RuleMiner)


@dataclass
class TabularScanResult(ScanResult):
    """A :class:`~poisonguard.pipeline.ScanResult` plus the mined rules and the encoding."""

    triggers: list[dict[str, Any]] = field(default_factory=list)
    tabular_info: dict[str, Any] = field(default_factory=dict)


def build_model(data: TabularData, n_classes: int) -> TabularMLP:
    cards = [len(c.categories) for c in data.columns]
    return TabularMLP(data.categorical.tolist(), cards, n_classes).fit_scaling(data.x)


def train_tabular_model(data: TabularData, config: ScanConfig, options: TabularOptions,
                        n_classes: int, stage: str = "tabular scan: sacrificial model"
                        ) -> TrainResult:
    """The built-in MLP trained on ``data`` (seeded; standardisation fit on ``data``)."""
    epochs = config.epochs or int(min(30, max(3, np.ceil(options.visits / max(len(data), 1)))))
    tc = TrainConfig(epochs=epochs, batch_size=config.batch_size, lr=options.lr,
                     weight_decay=0.0, seed=config.seed)
    seed_everything(config.seed)
    model = build_model(data, n_classes)
    train = train_classifier(data, tc, model=model, input_spec=TABLE_SPEC, arch=ARCH,
                             n_classes=n_classes, progress=config.progress, stage=stage)
    return train


def scan_tabular(data: TabularData, config: ScanConfig | None = None,
                 options: TabularOptions | None = None) -> TabularScanResult:
    """Scan a table for poisons; told nothing about any attack (see the module docstring)."""
    config = config or ScanConfig(detectors=TABULAR_DETECTORS)
    options = options or TabularOptions()
    check_scannable(data)
    t_start = time.perf_counter()
    k = data.n_classes
    train = train_tabular_model(data, config, options, k)
    clf: TorchClassifier = train.classifier
    timings: dict[str, float] = {"training_s": round(time.perf_counter() - t_start, 3)}
    t0 = time.perf_counter()
    out = clf.forward_all(data.x, data.y, layer="embed")
    timings["representations_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    names = tuple(n for n in config.detectors if n in TABULAR_DETECTORS)
    results, combined = run_detectors(out["representations"], data.y, out["losses"], names,
                                      config.seed, config.min_class_votes)
    mined = options.miner.detect(data, combined.flags, list(range(k)), clf.predict_proba,
                                 seed=config.seed)
    confirmed = {f.label for f in mined.findings if f.suspicious}
    results, combined = _join_stage(data, results, combined, mined,
                                    combined.flags | mined.flags, confirmed,
                                    {"second_stage": mined.name})
    timings["detectors_s"] = round(time.perf_counter() - t0, 3)
    rnd = RoundResult(np.arange(len(data)), results, combined, clf, train, timings)
    merged = _merge_rounds([rnd], data.y)
    triggers = [t for f in mined.findings for t in f.evidence["triggers"]]
    timings = {"total_s": round(time.perf_counter() - t_start, 3), "rounds": 1, **timings}
    info = {"modality": "tabular", "label_map": data.label_map, **data.encoding(),
            "train_accuracy": train.history[-1]["train_acc"]}
    return TabularScanResult(data=data, rounds=[rnd], combined=merged,
                             representations=out["representations"], losses=out["losses"],
                             config=config, final_classifier=None, final_train=None,
                             timings=timings, skipped={}, triggers=triggers,
                             tabular_info=info)
