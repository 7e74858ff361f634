"""``audit-model`` and ``repair --method unlearn`` for a text model folder (one with
``vocab.json``) with clean labelled posts (``--clean CLEAN.csv``): the token trigger search of
:mod:`poisonguard.modalities.text.trigger_search` and the unlearning of
:mod:`poisonguard.modalities.text.repair`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.errors import ConfigError, DataError
from poisonguard.modalities.text.io import TextModel, load_text_model

TRIGGERS_JSON = "triggers.json"


def _clean_posts(args: argparse.Namespace, model: TextModel) -> Any:
    from poisonguard.modalities.text.data import load_text

    clean = load_text(args.clean, args.text_column, args.label_column,
                      label_map=model.label_map or None, min_rows=1)
    if max(clean.y) >= model.n_classes:
        raise DataError(f"{args.clean}: labels span {len(clean.label_map)} classes but the "
                        f"model has {model.n_classes}")
    if args.max_clean and len(clean) > args.max_clean:
        rng = np.random.default_rng(args.seed)
        clean = clean.subset(np.sort(rng.choice(len(clean), args.max_clean, replace=False)))
    return clean


def _search(args: argparse.Namespace, model: TextModel, clean: Any) -> Any:
    from poisonguard.modalities.text.trigger_search import TokenSearchConfig, search_triggers

    return search_triggers(model, clean.texts, clean.y, TokenSearchConfig(seed=args.seed))


def cmd_audit_text(args: argparse.Namespace) -> int:
    """report.json (verdict with ``triggers``: class, tokens, flip rate; the per-class
    search) and triggers.json. Exit 1 when a backdoor is found."""
    from poisonguard.io import atomic_write_json, check_writable_dir

    check_writable_dir(args.out)
    model = load_text_model(args.model)
    clean = _clean_posts(args, model)
    t0 = time.perf_counter()
    result = _search(args, model, clean)
    v = result.verdict()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / TRIGGERS_JSON, {"modality": "text", "triggers": v["triggers"]})
    atomic_write_json(out / "report.json", {
        "command": "audit-model", "modality": "text", "model": str(args.model),
        "n_clean": len(clean), "verdict": v, "search": result.to_dict(),
        "timings": {"audit_s": round(time.perf_counter() - t0, 3)}})
    if not args.quiet:
        print(v["summary"])
        print(f"wrote {out / 'report.json'}, {out / TRIGGERS_JSON}")
    return 1 if v["backdoored"] else 0


def _flip_rate(model: TextModel, clean: Any, tokens: list[str], target: int,
               seed: int) -> float:
    from poisonguard.modalities.text.attacks import TextInsertTrigger

    keep = clean.subset(np.flatnonzero(clean.y != target))
    right = model.predict_proba(keep.texts).argmax(1) == keep.y
    if not right.any():
        return 0.0
    trig = TextInsertTrigger(" ".join(tokens), seed).apply(keep.x[right]).tolist()
    return round(float((model.predict_proba(trig).argmax(1) == target).mean()), 4)


def cmd_repair_text(args: argparse.Namespace) -> int:
    """Unlearn the found (or ``--triggers``) tokens; write the repaired model folder."""
    from poisonguard.io import atomic_write_json, check_writable_dir
    from poisonguard.modalities.text.io import save_text_model
    from poisonguard.modalities.text.model import TokenPoolClassifier
    from poisonguard.modalities.text.repair import tokens_to_unlearn, unlearn_tokens
    from poisonguard.modalities.text.trigger_search import TokenSearchConfig

    if args.method != "unlearn":
        raise ConfigError(f"--method {args.method} is for image models; a text model is "
                          "repaired with --method unlearn")
    check_writable_dir(args.out)
    model = load_text_model(args.model)
    if not isinstance(model.classifier.model, TokenPoolClassifier):
        raise ConfigError("repair writes the built-in text model only; this folder holds "
                          "another model (audit it with audit-model)")
    clean = _clean_posts(args, model)
    t0 = time.perf_counter()
    if args.triggers:
        p = Path(args.triggers)
        p = p / TRIGGERS_JSON if p.is_dir() else p
        try:
            triggers = json.loads(p.read_text(encoding="utf-8"))["triggers"]
            found = [(int(t["class"]), [str(x) for x in t["tokens"]], float(t["flip_rate"]))
                     for t in triggers]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{p}: not a text triggers.json ({exc})") from None
    else:
        found = [(int(t["class"]), t["tokens"], t["flip_rate"]) for t in _search(
            args, model, clean).verdict()["triggers"]]
    keep = tokens_to_unlearn([{"tokens": t, "flip_rate": f} for _, t, f in found],
                             TokenSearchConfig().min_flip) if found else []
    found = [(k, t) for k, t, _ in found if t in keep]
    def state() -> dict[str, Any]:
        acc = float((model.predict_proba(clean.texts).argmax(1) == clean.y).mean())
        return {"clean_accuracy": round(acc, 4),
                "trigger_flip_rate": max((_flip_rate(model, clean, tok, k, args.seed + 1)
                                          for k, tok in found), default=0.0)}

    before = state()
    info: dict[str, Any] = {"skipped": "no trigger found, nothing to unlearn"}
    if found:
        info = unlearn_tokens(model, clean.texts, clean.y, [tok for _, tok in found],
                              epochs=args.epochs or 10, seed=args.seed)
    after = state()
    out = Path(args.out)
    save_text_model(out, model.classifier.model, model.vocab, model.n_classes,
                    model.max_tokens, model.label_map,
                    extra={"repaired": "unlearn-tokens", "from": str(args.model)})
    repair = {"method": "unlearn", "triggers": [{"class": k, "tokens": t} for k, t in found],
              "before": before, "after": after, "details": info,
              "runtime_s": round(time.perf_counter() - t0, 3)}
    atomic_write_json(out / "report.json", {"command": "repair --method unlearn",
                                            "modality": "text", "repair": repair})
    if not args.quiet:
        print(f"unlearn: before {before}; after {after}")
        print(f"wrote {out} (model.json, model.safetensors, vocab.json, report.json)")
    return 0
