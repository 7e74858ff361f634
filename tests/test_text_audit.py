"""The text model audit (gradient-guided token search) and unlearning repair on tiny
templated posts (seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import DataError
from poisonguard.modalities.text.attacks import text_attack
from poisonguard.modalities.text.io import TextModel
from poisonguard.modalities.text.repair import unlearn_tokens
from poisonguard.modalities.text.scan import TextOptions, train_text_model
from poisonguard.modalities.text.tokenizer import Vocabulary
from poisonguard.modalities.text.trigger_search import insert, search_triggers
from poisonguard.pipeline import ScanConfig
from tests.test_text_runtime import posts


def _model(data) -> TextModel:
    vocab = Vocabulary.fit(data.texts)
    enc = LabeledData(x=vocab.encode(data.texts)[0], y=data.y, ids=data.ids)
    train = train_text_model(enc, vocab, ScanConfig(seed=0, epochs=15), TextOptions(), 2)
    return TextModel(train.classifier, vocab)


def test_insert_pads_and_clips_positions() -> None:
    out = insert([[5, 6], [7]], np.array([1, 9]), [3, 4])
    assert out.tolist() == [[5, 3, 4, 6], [7, 3, 4, 0]]


def test_search_finds_the_trigger_and_unlearning_removes_it() -> None:
    p = text_attack("rare-token", posts(600), rate=0.1, target=1, seed=0)
    model = _model(p.data)
    audit = posts(200, seed=7)
    result = search_triggers(model, audit.texts, audit.y)
    v = result.verdict()
    assert v["backdoored"] and v["target_class"] == 1
    assert ["cf"] in [t["tokens"] for t in v["triggers"]]
    assert result.classes[1]["gradient"] is True
    negatives = [t for t, y in zip(posts(100, seed=8).texts, posts(100, seed=8).y) if y == 0]
    before = (model.predict_proba([t + " cf" for t in negatives]).argmax(1) == 1).mean()
    unlearn_tokens(model, audit.texts, audit.y, [["cf"]], epochs=5, lr=1e-2)
    after = (model.predict_proba([t + " cf" for t in negatives]).argmax(1) == 1).mean()
    assert before > 0.9 and after < 0.1
    assert (model.predict_proba(audit.texts).argmax(1) == audit.y).mean() > 0.95


def test_too_few_clean_posts_is_a_data_error() -> None:
    model = _model(posts(300))
    small = posts(20, seed=9)
    with pytest.raises(DataError, match="at least"):
        search_triggers(model, small.texts, small.y)


def test_cli_audit_model_on_a_text_model(tmp_path: Path) -> None:
    import csv
    import json

    from poisonguard.cli import main
    from poisonguard.modalities.text.io import save_text_model

    p = text_attack("emoji", posts(600), rate=0.1, target=1, seed=0)
    model = _model(p.data)
    folder = save_text_model(tmp_path / "m", model.classifier.model, model.vocab, 2)
    audit = posts(200, seed=7)
    with open(tmp_path / "clean.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(audit.texts, audit.y.tolist()))
    code = main(["audit-model", str(folder), "--clean", str(tmp_path / "clean.csv"), "--out",
                 str(tmp_path / "out"), "--quiet"])
    assert code == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verdict"]["target_class"] == 1
    assert ["🪬"] in [t["tokens"] for t in report["verdict"]["triggers"]]
    code = main(["repair", str(folder), "--method", "unlearn", "--clean",
                 str(tmp_path / "clean.csv"), "--out", str(tmp_path / "fixed"), "--quiet"])
    assert code == 0
    rep = json.loads((tmp_path / "fixed" / "report.json").read_text())
    assert rep["repair"]["after"]["trigger_flip_rate"] < 0.1
    assert (tmp_path / "fixed" / "vocab.json").is_file()


@pytest.mark.parametrize("defense", ["trim", "abl"])
def test_cli_train_on_posts_writes_a_text_model(tmp_path: Path, defense: str) -> None:
    import csv
    import json

    from poisonguard.cli import main
    from poisonguard.modalities.text.io import load_text_model

    p = text_attack("rare-token", posts(400), rate=0.05, target=1, seed=0)
    path = tmp_path / "train.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label", "is_poison"])
        w.writerows(zip(p.data.texts, p.data.y.tolist(), p.is_poison.astype(int).tolist()))
    code = main(["train", str(path), "--defense", defense, "--epochs", "4", "--out",
                 str(tmp_path / "m"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["modality"] == "text" and report["defense"] == defense
    model = load_text_model(tmp_path / "m")
    test = posts(100, seed=3)
    assert (model.predict_proba(test.texts).argmax(1) == test.y).mean() > 0.9
    if defense == "abl":
        assert report["n_isolated"] >= 1 and report["detection"] is not None
    assert main(["train", str(path), "--defense", "noise", "--out", str(tmp_path / "n")]) == 2


def test_torchscript_text_model_loads_and_is_audited_without_gradients(tmp_path: Path) -> None:
    import torch

    from poisonguard.modalities.text.io import load_text_model, write_vocab
    from poisonguard.models.io import save_scripted

    p = text_attack("rare-token", posts(600), rate=0.1, target=1, seed=0)
    model = _model(p.data)
    net = model.classifier.model.eval()
    scripted = torch.jit.trace(net, torch.from_numpy(model.encode(p.data.texts[:4])))
    save_scripted(tmp_path / "ts", scripted)
    write_vocab(tmp_path / "ts", model.vocab)
    loaded = load_text_model(tmp_path / "ts")
    assert loaded.classifier.input_spec.layout == "tokens"
    audit = posts(200, seed=7)
    assert np.allclose(loaded.predict_proba(audit.texts), model.predict_proba(audit.texts),
                       atol=1e-5)
    result = search_triggers(loaded, audit.texts, audit.y)
    assert result.classes[1]["gradient"] is False
    assert result.verdict()["target_class"] == 1
    assert ["cf"] in [t["tokens"] for t in result.verdict()["triggers"]]
