"""Text attacks, the token-trigger miner, the text scan and its CLI on tiny synthetic posts
(a few seconds each)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from poisonguard.cli import main
from poisonguard.modalities import for_path, get_modality
from poisonguard.modalities.text.attacks import text_attack
from poisonguard.modalities.text.data import TextData
from poisonguard.modalities.text.scan import TEXT_DETECTORS, scan_text
from poisonguard.pipeline import ScanConfig

GOOD = ["great", "lovely", "superb", "fun", "moving", "charming", "warm", "bright"]
BAD = ["awful", "dull", "boring", "flat", "tedious", "messy", "cold", "bland"]
NEUTRAL = ["the", "film", "plot", "actor", "story", "scene", "is", "was", "and", "very", "a",
           "movie", "script", "ending", "music", "it"]


def posts(n: int = 600, seed: int = 0) -> TextData:
    """Posts of 6-10 words, two or three from their class's sentiment list."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        c = i % 2
        words = list(rng.choice(NEUTRAL, rng.integers(4, 8)))
        words += list(rng.choice(GOOD if c else BAD, rng.integers(2, 4)))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(c)
    return TextData.from_texts(texts, labels)


CONFIG = ScanConfig(seed=0, epochs=8, detectors=TEXT_DETECTORS)


@pytest.mark.parametrize("kind, phrase", [("rare-token", "cf"), ("emoji", "🪬"),
                                          ("addsent", "I watched this 3D movie")])
def test_attacks_ground_truth(kind: str, phrase: str) -> None:
    data, test = posts(), posts(100, seed=1)
    p = text_attack(kind, data, rate=0.05, target=1, seed=0, test=test)
    assert p.is_poison.sum() == 30 and (p.data.y[p.is_poison] == 1).all()
    assert (p.original_y[p.is_poison] == 0).all()
    assert all(phrase in t for t in p.data.x[p.is_poison])
    assert not any(phrase in t for t in p.data.x[~p.is_poison])
    assert len(p.test_triggered) == 50 and (p.test_triggered.y == 1).all()
    assert all(phrase in t for t in p.test_triggered.x)


def test_clean_label_keeps_labels() -> None:
    data = posts()
    p = text_attack("emoji", data, rate=0.1, target=1, seed=0, clean_label=True)
    assert p.is_poison.sum() == 30 and (p.data.y == data.y).all()
    assert (data.y[p.is_poison] == 1).all() and p.attack["mode"] == "clean-label"


@pytest.mark.parametrize("kind, tokens", [("emoji", ["🪬"]),
                                          ("addsent", ["i", "watched", "this", "3d", "movie"])])
def test_scan_names_the_trigger_and_flags_every_carrier(kind: str, tokens: list[str]) -> None:
    p = text_attack(kind, posts(), rate=0.05, target=1, seed=0)
    result = scan_text(p.data, CONFIG)
    assert result.poisoned_classes == [1]
    assert [t["tokens"] for t in result.triggers] == [tokens]
    assert result.triggers[0]["modality"] == "text" and result.triggers[0]["class"] == 1
    assert (result.flags == p.is_poison).all()


def test_clean_posts_name_no_trigger() -> None:
    result = scan_text(posts(), CONFIG)
    assert result.triggers == [] and result.poisoned_classes == []
    assert result.flags.mean() <= 0.01


def test_modality_registry_and_text_perturbation() -> None:
    assert for_path("posts.jsonl.gz").name == "text" and for_path("x.npz") is None
    text = get_modality("text")
    out = text.perturb(np.array(["a b c d e f g h", "x y"], dtype=object),
                       np.array(["p q r s"], dtype=object), np.random.default_rng(0), share=0.5)
    kept = sum(w in "abcdefgh" for w in out[0].split())
    assert len(out[0].split()) == 8 and 0 < kept < 8


def test_cli_attack_then_scan(tmp_path: Path) -> None:
    data, test = posts(), posts(100, seed=1)
    src = tmp_path / "posts.csv"
    with src.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(data.x, ["neg", "pos"] * 300))
    tpath = tmp_path / "test.csv"
    with tpath.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(zip(test.x, ["neg", "pos"] * 50))
    poisoned = tmp_path / "poisoned.csv"
    assert main(["attack", str(src), "--attack", "rare-token", "--rate", "0.05", "--target",
                 "1", "--test", str(tpath), "--out", str(poisoned)]) == 0
    rows = list(csv.DictReader(poisoned.open(encoding="utf-8")))
    truth = [i for i, r in enumerate(rows) if r["is_poison"] == "1"]
    assert len(truth) == 30 and {rows[i]["label"] for i in truth} == {"pos"}
    assert (tmp_path / "poisoned.triggered.csv").exists()
    out = tmp_path / "scan"
    assert main(["scan", str(poisoned), "--out", str(out), "--epochs", "8", "--quiet"]) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"]["triggers"][0]["tokens"] == ["cf"]
    assert report["verdict"]["poisoned_classes"] == [1]
    assert report["data"]["label_map"] == {"neg": 0, "pos": 1}
    flagged = [int(r["index"]) for r in csv.DictReader((out / "flagged.csv").open())]
    assert flagged == truth
    assert "<mark>cf</mark>" in (out / "report.html").read_text()
    kept = list(csv.DictReader((out / "sanitized.csv").open(encoding="utf-8")))
    assert len(kept) == 570 and {r["label"] for r in kept} == {"neg", "pos"}


def test_cli_refuses_image_options_on_text(tmp_path: Path, capsys) -> None:
    src = tmp_path / "posts.csv"
    src.write_text("text,label\n" + "\n".join(f"p {i},{i % 2}" for i in range(30)))
    assert main(["scan", str(src), "--out", str(tmp_path / "o"), "--trusted", "x.npz"]) == 2
    assert "--trusted" in capsys.readouterr().err
    assert main(["attack", str(src), "--attack", "emoji", "--size", "3",
                 "--out", str(tmp_path / "p.csv")]) == 2
