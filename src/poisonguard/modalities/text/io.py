"""Text model folders: ``model.json`` + ``model.safetensors`` (the built-in classifier, or a
TorchScript ``model.pt`` over token ids) and ``vocab.json`` (the tokenizer's vocabulary, the
token budget per post and the label map). Nothing is unpickled: weights load through
:func:`poisonguard.models.io.load_model`, the vocabulary is plain JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from poisonguard.errors import ModelError
from poisonguard.models.adapter import TorchClassifier

VOCAB_JSON = "vocab.json"


@dataclass
class TextModel:
    """A classifier over token ids plus the vocabulary that turns posts into them."""

    classifier: TorchClassifier
    vocab: Any  # Vocabulary (imported lazily: the tokenizer imports nothing from here)
    max_tokens: int = 128
    label_map: dict[str, int] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        """The model's class count (a TorchScript model's from one forward pass)."""
        if self.classifier.n_classes is None:
            self.classifier.n_classes = int(self.classifier.predict_proba(
                self.encode(["a"])).shape[1])
        return int(self.classifier.n_classes)

    def encode(self, texts: list[str] | np.ndarray) -> np.ndarray:
        return self.vocab.encode([str(t) for t in texts], self.max_tokens)[0]

    def predict_proba(self, texts: list[str] | np.ndarray) -> np.ndarray:
        """(N, K) class probabilities of the posts ``texts``."""
        return self.classifier.predict_proba(self.encode(texts))

    def label_name(self, k: int) -> str:
        inverse = {v: key for key, v in self.label_map.items()}
        return str(inverse.get(int(k), k))


def save_text_model(out_dir: str | Path, model: nn.Module, vocab: Any, n_classes: int,
                    max_tokens: int = 128, label_map: dict[str, int] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write the built-in text classifier (``text-pool``) and its vocabulary to ``out_dir``."""
    from poisonguard.modalities.text.model import ARCH
    from poisonguard.modalities.text.scan import TOKEN_SPEC
    from poisonguard.models.io import save_model

    out = save_model(out_dir, model, ARCH, {"vocab_size": len(vocab), "n_classes": n_classes},
                     TOKEN_SPEC, n_classes, "embed", extra={"modality": "text", **(extra or {})})
    write_vocab(out, vocab, max_tokens, label_map)
    return out


def write_vocab(out_dir: str | Path, vocab: Any, max_tokens: int = 128,
                label_map: dict[str, int] | None = None) -> Path:
    """``vocab.json`` beside a model (also for a user's TorchScript model over token ids:
    ids 0 and 1 are padding and unknown, the rest index ``tokens``)."""
    from poisonguard.io import atomic_write_json

    return atomic_write_json(Path(out_dir) / VOCAB_JSON, {
        "format": "poisonguard-vocab", "tokens": list(vocab.tokens),
        "max_tokens": int(max_tokens), "label_map": dict(label_map or {})})


def model_folder(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_dir() else p.parent


def is_text_model(path: str | Path | None) -> bool:
    """A model folder (or a file in one) holding ``vocab.json``."""
    return path is not None and (model_folder(path) / VOCAB_JSON).is_file()


def load_text_model(path: str | Path, batch_size: int = 512) -> TextModel:
    """The model at ``path`` (see :func:`poisonguard.models.io.load_model`) and the
    ``vocab.json`` in its folder; every problem is one :class:`ModelError` line."""
    from poisonguard.modalities.text.tokenizer import Vocabulary
    from poisonguard.models.io import load_model

    vpath = model_folder(path) / VOCAB_JSON
    try:
        doc = json.loads(vpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{vpath}: unreadable vocabulary ({exc})") from None
    tokens = doc.get("tokens") if isinstance(doc, dict) else None
    if (not isinstance(tokens, list) or len(tokens) < 2
            or not all(isinstance(t, str) for t in tokens)):
        raise ModelError(f"{vpath}: 'tokens' must be a list of strings (<pad>, <unk>, ...)")
    max_tokens = doc.get("max_tokens", 128)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ModelError(f"{vpath}: 'max_tokens' must be a positive integer")
    clf = load_model(path, batch_size=batch_size)
    if clf.input_spec.layout == "raw":  # a TorchScript model: fed the (N, L) int64 ids
        from poisonguard.modalities.text.scan import TOKEN_SPEC

        clf.input_spec = TOKEN_SPEC
    if clf.input_spec.layout != "tokens":
        raise ModelError(f"{path}: a text model takes token ids; its input layout is "
                         f"{clf.input_spec.layout!r}")
    label_map = {str(k): int(v) for k, v in (doc.get("label_map") or {}).items()}
    return TextModel(clf, Vocabulary(list(tokens)), max_tokens, label_map)
