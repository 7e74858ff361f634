"""``poisonguard train POSTS.csv --defense none|trim|abl --out DIR`` for text: the built-in
text classifier (vocabulary fit on the posts) trained under guarded training
(:func:`poisonguard.train.train_guarded` with the token layout), written as a text model
folder (model.json, model.safetensors, vocab.json) with report.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from poisonguard.errors import ConfigError


def train_text(data: Any, defense: str = "none", epochs: int | None = None, seed: int = 0,
               trim_fraction: float | None = None, max_tokens: int = 128,
               progress: bool = False) -> tuple[Any, Any, Any]:
    """(guarded result, vocabulary, token ids) of the built-in text model on ``data``."""
    from poisonguard.data.labeled import LabeledData
    from poisonguard.modalities.text.model import ARCH, TokenPoolClassifier
    from poisonguard.modalities.text.scan import TOKEN_SPEC, TextOptions
    from poisonguard.modalities.text.tokenizer import Vocabulary
    from poisonguard.models.training import TrainConfig, seed_everything
    from poisonguard.pipeline import auto_epochs
    from poisonguard.train import GuardConfig, train_guarded

    options = TextOptions(max_tokens=max_tokens)
    vocab = Vocabulary.fit(data.texts, min_count=options.min_count)
    tokens = vocab.encode(data.texts, max_tokens)[0]
    encoded = LabeledData(x=tokens, y=data.y, ids=data.ids)
    config = TrainConfig(epochs=epochs or auto_epochs(len(data)), lr=options.lr,
                         weight_decay=0.0, seed=seed)
    seed_everything(seed)
    model = TokenPoolClassifier(len(vocab), data.n_classes)
    result = train_guarded(encoded, GuardConfig(defense=defense, trim_fraction=trim_fraction),
                           config, n_classes=data.n_classes, progress=progress, model=model,
                           input_spec=TOKEN_SPEC, arch=ARCH)
    return result, vocab, tokens


def cmd_train_text(args: argparse.Namespace) -> int:
    from poisonguard.io import atomic_write_json, check_writable_dir
    from poisonguard.metrics import detection_metrics
    from poisonguard.modalities.text.data import load_text, read_poison_column
    from poisonguard.modalities.text.io import save_text_model

    if args.defense == "noise" or args.noise_sigma is not None:
        raise ConfigError("--defense noise adds Gaussian noise to pixels or features; for text "
                          "choose none, trim or abl")
    if args.defense == "adv" or any(v is not None for v in (args.adv_epsilon, args.adv_steps,
                                                             args.adv_warmup)):
        raise ConfigError("--defense adv perturbs pixels or features; for text choose none, "
                          "trim or abl")
    if args.monitor_gradients:
        raise ConfigError("--monitor-gradients applies to image and vector data")
    check_writable_dir(args.out)
    data = load_text(args.data, args.text_column, args.label_column)
    test = (load_text(args.test, args.text_column, args.label_column,
                      label_map=data.label_map, min_rows=1) if args.test else None)
    truth = read_poison_column(args.data)
    result, vocab, _ = train_text(data, args.defense, args.epochs, args.seed,
                                  args.trim_fraction, progress=not args.quiet)
    from poisonguard.modalities.text.io import TextModel

    model = TextModel(result.classifier, vocab, 128, data.label_map)
    evaluation: dict[str, Any] = {}
    if test is not None:
        evaluation["clean_accuracy"] = round(float(
            (model.predict_proba(test.texts).argmax(1) == test.y).mean()), 4)
    suspects = result.suspects()
    metrics = (detection_metrics(suspects, truth, None)
               if truth is not None and suspects is not None else None)
    out = Path(args.out)
    save_text_model(out, result.classifier.model, vocab, data.n_classes, 128, data.label_map,
                    extra={"defense": args.defense,
                           "train_config": result.train.config.to_dict()})
    report = {"command": "train", "modality": "text", "defense": args.defense,
              "n_train": len(data), "vocab_size": len(vocab),
              "n_isolated": None if result.isolated is None else int(result.isolated.sum()),
              "trim_fraction": result.trim_fraction, "info": result.info,
              "evaluation": evaluation or None, "detection": metrics,
              "history": result.train.history, "wall_s": round(result.wall_s, 2)}
    from poisonguard.types import jsonable

    atomic_write_json(out / "report.json", jsonable(report))
    if not args.quiet:
        acc = f"; clean accuracy {evaluation['clean_accuracy']:.4f}" if evaluation else ""
        print(f"trained the text model with --defense {args.defense} on {len(data)} posts "
              f"in {result.wall_s:.1f} s{acc}")
        print(f"wrote {out}/model.json, model.safetensors, vocab.json, report.json")
    return 0
