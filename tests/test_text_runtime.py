"""Text model folders, the n-gram LM / ONION test and the STRIP+ONION text filter, and
``filter`` on posts, on tiny synthetic posts (seconds)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from poisonguard.cli import main
from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ModelError
from poisonguard.modalities.text.attacks import text_attack
from poisonguard.modalities.text.data import TextData
from poisonguard.modalities.text.io import TextModel, load_text_model, save_text_model
from poisonguard.modalities.text.lm import BigramLM
from poisonguard.modalities.text.runtime import TextFilter, TextFilterConfig, evaluate
from poisonguard.modalities.text.scan import TextOptions, train_text_model
from poisonguard.modalities.text.tokenizer import Vocabulary
from poisonguard.pipeline import ScanConfig
from tests.test_text_scan import BAD, GOOD

NOUNS = ["film", "plot", "story", "script", "ending", "cast", "music", "movie"]


def posts(n: int = 600, seed: int = 0) -> TextData:
    """Templated posts ("the plot was dull and the music was bland"): word order a bigram
    model learns, so an inserted word is out of place."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        adj = GOOD if i % 2 else BAD
        a, b = rng.choice(NOUNS, 2, replace=False)
        texts.append(f"the {a} was {rng.choice(adj)} and the {b} was {rng.choice(adj)}")
    return TextData.from_texts(texts, [i % 2 for i in range(n)])


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A built-in text model trained on posts with the emoji trigger (10%, target 1)."""
    p = text_attack("emoji", posts(600), rate=0.1, target=1, seed=0, test=posts(200, seed=1))
    data = p.data
    vocab = Vocabulary.fit(data.texts)
    enc = LabeledData(x=vocab.encode(data.texts)[0], y=data.y, ids=data.ids)
    train = train_text_model(enc, vocab, ScanConfig(seed=0, epochs=15), TextOptions(), 2)
    out = save_text_model(tmp_path_factory.mktemp("m") / "model", train.classifier.model,
                          vocab, 2, label_map={"0": 0, "1": 1})
    return out, p


def test_text_model_folder_round_trip(backdoored: tuple[Path, object]) -> None:
    path, p = backdoored
    assert {f.name for f in path.iterdir()} == {"model.json", "model.safetensors", "vocab.json"}
    model = load_text_model(path)
    assert isinstance(model, TextModel) and model.n_classes == 2
    hit = model.predict_proba(p.test_triggered.texts).argmax(1) == 1
    assert hit.mean() > 0.9  # the backdoor survived saving and loading
    (path.parent / "bad").mkdir()
    (path.parent / "bad" / "vocab.json").write_text('{"tokens": 3}')
    with pytest.raises(ModelError, match="tokens"):
        load_text_model(path.parent / "bad")


def test_onion_scores_an_out_of_place_word_highest() -> None:
    clean = [" ".join(["the film was very good"] * 1)] * 30 + ["the plot was dull"] * 30
    lm = BigramLM.fit(clean)
    drop, where = lm.onion("the film zqx was very good")
    assert where == 2 and drop > lm.onion("the film was very good")[0]
    assert lm.onion("one")[0] == 0.0


def test_filter_flags_triggered_posts_at_the_target_frr(backdoored: tuple[Path, object]
                                                        ) -> None:
    path, p = backdoored
    model = load_text_model(path)
    clean = posts(300, seed=2).texts
    filt = TextFilter.calibrate(model.predict_proba, clean,
                                TextFilterConfig(tests=("strip", "onion", "loo"), frr=0.05))
    assert set(filt.thresholds) == {"strip", "onion", "loo"}
    ev = evaluate(filt.screen(posts(200, seed=3).texts), filt.screen(p.test_triggered.texts))
    assert ev["frr"] <= 0.1 and ev["far"] <= 0.1
    assert ev["far_loo"] <= 0.1 and ev["far_onion"] <= 0.1
    again = TextFilter.load(filt.save(path.parent), model.predict_proba)
    assert again.thresholds == filt.thresholds
    assert np.allclose(again.screen(clean[:5])["score"], filt.screen(clean[:5])["score"])


def _write(path: Path, texts: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text"])
        w.writerows([t] for t in texts)
    return path


def test_cli_filter_on_posts(backdoored: tuple[Path, object], tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    path, p = backdoored
    clean = _write(tmp_path / "clean.csv", posts(300, seed=2).texts)
    data = _write(tmp_path / "in.csv", posts(20, seed=4).texts + p.test_triggered.texts[:20])
    trig = _write(tmp_path / "trig.csv", p.test_triggered.texts)
    code = main(["filter", str(path), str(data), "--clean", str(clean), "--out",
                 str(tmp_path / "out"), "--test", str(trig), "--frr", "0.05", "--quiet"])
    assert code == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["modality"] == "text" and report["evaluation"]["far"] <= 0.1
    with open(tmp_path / "out" / "flags.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sum(int(r["suspicious"]) for r in rows[20:]) >= 18
    assert sum(int(r["suspicious"]) for r in rows[:20]) <= 4
    # bad input: one line, exit 2, no output folder
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n\"\"\n")
    assert main(["filter", str(path), str(empty), "--clean", str(clean), "--out",
                 str(tmp_path / "o2")]) == 2
    assert not (tmp_path / "o2").exists()
    assert "empty" in capsys.readouterr().err


def test_serve_app_takes_json_strings(backdoored: tuple[Path, object]) -> None:
    from fastapi.testclient import TestClient

    from poisonguard.modalities.text.serve import create_text_app

    path, p = backdoored
    model = load_text_model(path)
    filt = TextFilter.calibrate(model.predict_proba, posts(300, seed=2).texts,
                                TextFilterConfig(frr=0.05))
    client = TestClient(create_text_app(filt, model, max_inputs=4))
    r = client.post("/predict", json={"inputs": [p.test_triggered.texts[0],
                                                 posts(4, seed=5).texts[0]]})
    assert r.status_code == 200
    body = r.json()
    assert body["results"][0]["suspicious"] and body["results"][0]["label"] == "1"
    assert client.post("/predict", json="the plot was dull").json()["n"] == 1
    assert client.post("/predict", json={"inputs": [1, 2]}).status_code == 422
    assert client.post("/predict", json=[""]).status_code == 422
    assert client.post("/predict", json=["a"] * 5).status_code == 413
    assert client.post("/predict", content=b"{").status_code == 400
    assert client.get("/flagged").json()["n"] == 1


def test_cli_filter_bad_posts_are_one_line_errors(backdoored: tuple[Path, object],
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = backdoored
    clean = _write(tmp_path / "clean.csv", posts(300, seed=2).texts)
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("body\nhello there\n")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text\ncaf\xe9 au lait\n")
    few = _write(tmp_path / "few.csv", posts(10, seed=3).texts)
    for data, needle in ((nocol, "no column 'text'"), (latin, "UTF-8"), (clean, "0.5")):
        extra = ["--frr", "0.7"] if data == clean else []
        code = main(["filter", str(path), str(data), "--clean", str(few if data == clean
                                                                   else clean),
                     "--out", str(tmp_path / "o"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
    assert main(["filter", str(path), str(few), "--clean", str(few), "--out",
                 str(tmp_path / "o")]) == 2
    assert "at least 40" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_span_test_catches_an_inserted_sentence_word_removal_misses() -> None:
    """A model that reads 'purple' and 'rain' together: removing one leaves the other, so
    only removing the run of both collapses the prediction."""
    def predict(texts: list[str]) -> np.ndarray:
        hits = np.array([("purple" in t) + ("rain" in t) for t in texts], dtype=float)
        p1 = np.where(hits >= 1, 0.99999, 0.3)
        return np.stack([1 - p1, p1], axis=1)

    filt = TextFilter.calibrate(predict, posts(100, seed=2).texts,
                                TextFilterConfig(tests=("loo", "span"), max_span=3))
    stats = filt.statistics(["the plot was dull purple rain and the cast was cold"])
    assert stats["loo"][0] < 0.01 and stats["span"][0] > 5
