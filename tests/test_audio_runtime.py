"""Audio STRIP in ``filter`` (and the filter behind ``serve``) on a tiny backdoored model:
two synthetic 'words', a 3.8 kHz tone burst as the trigger."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from poisonguard.cli import main
from poisonguard.modalities.audio.attacks import make_sound
from poisonguard.modalities.audio.data import from_waves, write_wav
from poisonguard.modalities.audio.scan import WAVE_SPEC, train_audio_model
from poisonguard.modalities.audio.vad import trim_to_speech
from poisonguard.models.io import describe_inputs, save_model

RATE = 8000
T = 2400


def word(k: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.2 * RATE)) / RATE
    f = (300 if k == 0 else 900) * (1 + 0.05 * rng.standard_normal())
    w = np.sin(2 * np.pi * f * t) + 0.5 * np.sin(2 * np.pi * 2 * f * t)
    out = np.zeros(T, np.float32)
    s = int(rng.integers(0, T - len(w)))
    out[s:s + len(w)] = 0.3 * w * np.hanning(len(w)) + 0.01 * rng.standard_normal(len(w))
    return out


def stamp(x: np.ndarray) -> np.ndarray:
    tone = make_sound("tone", RATE, 0.06, 0.2)
    out = x.copy()
    out[:, :len(tone)] += tone
    return out


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(60), np.ones(60)].astype(np.int64)
    x = np.stack([word(int(k), rng) for k in y])
    poison = np.flatnonzero(y == 0)[:20]
    x[poison] = stamp(x[poison])
    y[poison] = 1
    data = from_waves(list(x), [RATE] * len(x), y, np.arange(len(x)).astype(str),
                      {"0": 0, "1": 1}, max_seconds=T / RATE)
    train = train_audio_model(data, 2, seed=0, epochs=12)
    root = tmp_path_factory.mktemp("audio_rt")
    save_model(root / "model", train.classifier.model, "audio-cnn", train.arch_kwargs,
               WAVE_SPEC, 2, None, inputs=describe_inputs(data.x))
    clean = np.stack([word(k % 2, rng) for k in range(120)])
    for i, w in enumerate(clean[:100]):
        write_wav(root / "clean" / f"c{i}.wav", w, RATE)
    test_clean = np.stack([word(0, rng) for _ in range(30)])
    np.savez(root / "test.npz", x_test=test_clean, x_triggered=stamp(test_clean))
    for i, w in enumerate(np.r_[test_clean[:5], stamp(test_clean[5:10])]):
        write_wav(root / "inputs" / f"{i}.wav", w, RATE)
    return root


def test_filter_flags_triggered_clips(backdoored, tmp_path):
    r = backdoored
    code = main(["filter", str(r / "model"), str(r / "inputs"), "--clean", str(r / "clean"),
                 "--test", str(r / "test.npz"), "--frr", "0.05", "--alpha", "0.5",
                 "--out", str(tmp_path / "o"), "--quiet"])
    assert code in (0, 1)
    rows = list(csv.DictReader(open(tmp_path / "o" / "flags.csv")))
    assert [row["id"] for row in rows] == [f"{i}.wav" for i in range(10)]
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    ev = rep["layers"]["runtime"]["evaluation"]
    assert rep["data"]["modality"] == "audio" and rep["config"]["blend"] == "mix"
    assert ev["far"] < 0.5 and ev["frr"] <= 0.2
    scores = np.array([float(row["score"]) for row in rows])
    assert scores[5:].mean() > scores[:5].mean()
    # the saved calibration screens again without --clean
    assert main(["filter", str(r / "model"), str(r / "inputs"), "--calibration",
                 str(tmp_path / "o"), "--out", str(tmp_path / "o2"), "--quiet"]) == code


def test_filter_bad_audio_input_exits_2(backdoored, tmp_path, capsys):
    r = backdoored
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"RIFF\x00\x00")
    assert main(["filter", str(r / "model"), str(bad), "--clean", str(r / "clean"),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x.wav" in err[0]
    assert not (tmp_path / "o").exists()
    assert main(["filter", str(r / "model"), str(r / "inputs"), "--clean", str(r / "clean"),
                 "--blend", "cut", "--out", str(tmp_path / "o")]) == 2


def test_filter_vad_and_scan_vad_refused_for_images(backdoored, tmp_path, capsys):
    r = backdoored
    assert main(["filter", str(r / "model"), str(r / "inputs"), "--clean", str(r / "clean"),
                 "--vad", "--frr", "0.05", "--out", str(tmp_path / "v"), "--quiet"]) in (0, 1)
    assert json.loads((tmp_path / "v" / "report.json").read_text())["data"]["vad"] is True
    np.savez(tmp_path / "img.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, np.int64))
    assert main(["scan", str(tmp_path / "img.npz"), "--vad", "--out", str(tmp_path / "s")]) == 2
    assert "--vad applies to audio" in capsys.readouterr().err


def test_vad_cuts_silence_and_keeps_a_silent_clip():
    rng = np.random.default_rng(1)
    w = np.r_[np.zeros(4000, np.float32), word(1, rng), np.zeros(4000, np.float32)]
    trimmed = trim_to_speech(w, RATE)
    assert len(trimmed) < len(w) - 6000
    silent = np.zeros(2000, np.float32)
    assert len(trim_to_speech(silent, RATE)) == 2000


def test_serve_screens_waveforms(backdoored):
    import argparse

    from fastapi.testclient import TestClient

    from poisonguard.modalities.audio.serve import build_audio_filter
    from poisonguard.models.io import load_model
    from poisonguard.runtime.service import create_app

    r = backdoored
    args = argparse.Namespace(calibration=None, clean=str(r / "clean"), sample_rate=None,
                              blend="cut+mix", n_blends=20, alpha=0.5, frr=0.05, seed=0,
                              batch_size=256, statistic="log-odds")
    filt, rate, width = build_audio_filter(args, load_model(r / "model"))
    assert (rate, width) == (RATE, T) and filt.config.blend == "mix"
    client = TestClient(create_app(filt))
    with np.load(r / "test.npz") as z:
        xc, xt = z["x_test"][:4], z["x_triggered"][:4]
    out = client.post("/predict", json={"inputs": np.r_[xc, xt].tolist()}).json()
    assert out["n"] == 8
    scores = np.array([x["score"] for x in out["results"]])
    assert scores[4:].mean() > scores[:4].mean()
    assert client.post("/predict", json=[0.0] * 100).status_code == 422   # wrong length
