"""The quarantine scan for text: tokenizer and sacrificial model fit on the posts, the
representation detectors on the model's ``embed`` layer, then the token-trigger miner in every
class, whose confirmed triggers make their class poisoned and flag every carrier. One round:
the miner already flags every carrier, so no retraining round is needed to find leftovers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from poisonguard.data.labeled import LabeledData, check_scannable
from poisonguard.modalities.text.data import TextData
from poisonguard.modalities.text.miner import TokenTriggerMiner
from poisonguard.modalities.text.model import ARCH, TokenPoolClassifier
from poisonguard.modalities.text.tokenizer import Vocabulary
from poisonguard.models.adapter import InputSpec, TorchClassifier
from poisonguard.models.training import TrainConfig, TrainResult, train_classifier
from poisonguard.pipeline import (
    RoundResult,
    ScanConfig,
    ScanResult,
    _join_stage,
    _merge_rounds,
    auto_epochs,
    embed_and_detect,
)

TOKEN_SPEC = InputSpec(layout="tokens", scale=1.0, dtype="int64")
# detectors that need a trusted set or ~1,000 samples per class are not run on text yet
TEXT_DETECTORS = ("activation_clustering", "spectral_signatures", "loss_outliers",
                  "scan_decomposition")


@dataclass(frozen=True)
class TextOptions:
    """Text-specific settings: ``max_tokens`` per post (longer posts are truncated, and the
    report counts them), vocabulary ``min_count``, learning rate of the sacrificial model."""

    max_tokens: int = 128
    min_count: int = 2
    lr: float = 1e-2
    miner: TokenTriggerMiner = field(default_factory=TokenTriggerMiner)


@dataclass
class TextScanResult(ScanResult):
    """A :class:`~poisonguard.pipeline.ScanResult` plus what the text modality adds."""

    vocab: Vocabulary | None = None
    tokens: np.ndarray | None = None
    triggers: list[dict[str, Any]] = field(default_factory=list)
    text_info: dict[str, Any] = field(default_factory=dict)


def train_text_model(encoded: LabeledData, vocab: Vocabulary, config: ScanConfig,
                     options: TextOptions, n_classes: int,
                     stage: str = "text scan: sacrificial model") -> TrainResult:
    """The built-in text classifier trained on ``encoded`` token ids (seeded)."""
    tc = TrainConfig(epochs=config.epochs or auto_epochs(len(encoded)),
                     batch_size=config.batch_size, lr=options.lr, weight_decay=0.0,
                     seed=config.seed)
    from poisonguard.models.training import seed_everything

    seed_everything(config.seed)
    model = TokenPoolClassifier(len(vocab), n_classes)
    train = train_classifier(encoded, tc, model=model, input_spec=TOKEN_SPEC, arch=ARCH,
                             n_classes=n_classes, progress=config.progress, stage=stage)
    train.arch_kwargs = {"vocab_size": len(vocab), "n_classes": n_classes}
    return train


def scan_text(data: TextData, config: ScanConfig | None = None,
              options: TextOptions | None = None) -> TextScanResult:
    """Scan posts for poisons; told nothing about any attack (see the module docstring)."""
    config = config or ScanConfig(detectors=TEXT_DETECTORS)
    options = options or TextOptions()
    t_start = time.perf_counter()
    vocab = Vocabulary.fit(data.texts, min_count=options.min_count)
    tokens, n_truncated = vocab.encode(data.texts, options.max_tokens)
    encoded = LabeledData(x=tokens, y=data.y, ids=data.ids)
    check_scannable(encoded)
    k = data.n_classes
    timings: dict[str, float] = {"tokenize_s": round(time.perf_counter() - t_start, 3)}
    t0 = time.perf_counter()
    train = train_text_model(encoded, vocab, config, options, k)
    clf: TorchClassifier = train.classifier
    timings["training_s"] = round(time.perf_counter() - t0, 3)
    out, results, combined = embed_and_detect(clf, tokens, data.y, config, TEXT_DETECTORS,
                                              timings)
    t0 = time.perf_counter()
    mined = options.miner.detect(tokens, data.y, combined.flags, list(range(k)),
                                 clf.predict_proba, vocab)
    confirmed = {f.label for f in mined.findings if f.suspicious}
    results, combined = _join_stage(encoded, results, combined, mined,
                                    combined.flags | mined.flags, confirmed,
                                    {"second_stage": mined.name})
    timings["detectors_s"] = round(timings["detectors_s"] + time.perf_counter() - t0, 3)
    rnd = RoundResult(np.arange(len(data)), results, combined, clf, train, timings)
    merged = _merge_rounds([rnd], data.y)
    triggers = [t for f in mined.findings for t in f.evidence["triggers"]]
    timings = {"total_s": round(time.perf_counter() - t_start, 3), "rounds": 1, **timings}
    info = {"modality": "text", "label_map": data.label_map, "vocab_size": len(vocab),
            "max_tokens": options.max_tokens, "n_truncated": int(n_truncated),
            "n_cut_chars": int(data.n_cut), "train_accuracy": train.history[-1]["train_acc"]}
    return TextScanResult(data=data, rounds=[rnd], combined=merged,
                          representations=out["representations"], losses=out["losses"],
                          config=config, final_classifier=None, final_train=None,
                          timings=timings, skipped={}, vocab=vocab, tokens=tokens,
                          triggers=triggers, text_info=info)
