"""Audio modality: loaders, bad input, attacks and the miner's removal primitive on tiny data."""

from __future__ import annotations

import numpy as np
import pytest

from poisonguard.cli import main
from poisonguard.errors import DataError
from poisonguard.modalities.audio.attacks import audio_attack
from poisonguard.modalities.audio.data import load_audio, write_wav
from poisonguard.modalities.audio.frontend import MelConfig, band_stop, log_mel


def _folder(root, rate=8000, n=6, labels=("a", "b")):
    rng = np.random.default_rng(0)
    for lab in labels:
        for i in range(n):
            write_wav(root / lab / f"{i}.wav", 0.3 * rng.standard_normal(rate // 2), rate)
    return root


def test_wav_folder_ids_labels_and_resampling(tmp_path):
    root = _folder(tmp_path / "d")
    write_wav(root / "a" / "x16k.wav", np.zeros(8000) + 0.1, 16000)
    data = load_audio(root)
    assert data.sample_rate == 8000 and data.n_resampled == 1
    assert data.label_map == {"a": 0, "b": 1}
    assert "a/0.wav" in data.ids.tolist()
    assert data.lengths[data.ids.tolist().index("a/x16k.wav")] == 4000


def test_stereo_is_averaged_and_bad_wavs_refused(tmp_path):
    from scipy.io import wavfile

    root = _folder(tmp_path / "d")
    wavfile.write(root / "a" / "st.wav", 8000, np.ones((800, 2), np.int16) * 1000)
    assert load_audio(root).n_downmixed == 1
    (root / "a" / "trunc.wav").write_bytes((root / "a" / "0.wav").read_bytes()[:30])
    with pytest.raises(DataError, match="trunc.wav"):
        load_audio(root)
    (root / "a" / "trunc.wav").unlink()
    wavfile.write(root / "a" / "empty.wav", 8000, np.zeros(0, np.int16))
    with pytest.raises(DataError, match="0-length"):
        load_audio(root)
    with pytest.raises(DataError, match="no .wav"):
        load_audio(tmp_path)


def test_cli_bad_folder_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["scan", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2 and not (tmp_path / "o").exists()


def test_tone_attack_and_band_stop_removes_it(tmp_path):
    data = load_audio(_folder(tmp_path / "d", n=10))
    p = audio_attack("tone", data, rate=0.3, target=0, seed=0, placement="leading", freq=3500)
    assert p.is_poison.sum() == 6 and (p.data.y[p.is_poison] == 0).all()
    mel = MelConfig.for_rate(8000)
    x = p.data.x[p.is_poison]
    band = log_mel(x, mel)[:, -4:, :5].mean()
    cleaned = band_stop(x, mel, (3000.0, 4000.0))
    assert log_mel(cleaned, mel)[:, -4:, :5].mean() < band - 5


def test_scan_cli_on_a_poisoned_wav_folder(tmp_path):
    """End to end through ``poisonguard scan ROOT``: a 3.8 kHz tone burst stamped on clips
    relabelled 'a'; the report validates and flagged.csv ids are paths. With 40 clips a class
    the sacrificial model memorises the 12 poisons, so removing the tone does not move their
    prediction: the miner names the band it sees but cannot confirm it, and then no class is
    called and nothing is flagged (on FSDD's 2,700 clips the same burst is confirmed)."""
    import csv
    import json

    from poisonguard.report.schema import validate

    rate, rng = 8000, np.random.default_rng(1)
    t = np.arange(rate // 2) / rate
    pitch = {"a": 300.0, "b": 700.0, "c": 1100.0}
    for lab, f0 in pitch.items():
        for i in range(40):
            w = 0.3 * np.sin(2 * np.pi * (f0 + 20 * rng.standard_normal()) * t)
            w += 0.02 * rng.standard_normal(len(t))
            dest = lab
            if lab != "a" and i < 6:   # poison: tone burst, relabelled to 'a'
                w[800:1200] += 0.3 * np.sin(2 * np.pi * 3800.0 * t[800:1200])
                dest = "a"
            write_wav(tmp_path / "d" / dest / f"{lab}{i}.wav", w, rate)
    out = tmp_path / "scan"
    rc = main(["scan", str(tmp_path / "d"), "--out", str(out), "--quiet"])
    assert rc in (0, 1)
    report = json.loads((out / "report.json").read_text())
    assert validate(report) == []
    rows = list(csv.DictReader(open(out / "flagged.csv")))
    assert all(r["id"].endswith(".wav") and "/" in r["id"] for r in rows)
    flagged = {r["id"] for r in rows}
    poisons = {f"a/{lab}{i}.wav" for lab in ("b", "c") for i in range(6)}
    assert not flagged - poisons                 # no clean clip flagged
    a = next(c for c in report["layers"]["quarantine"]["classes"] if c["label"] == 0)
    groups = a["evidence"]["audio_trigger"]["evidence"]["top_groups"]
    tone = [g for g in groups if g["band_hz"][0] <= 3800 <= g["band_hz"][1]]
    assert tone and tone[0]["n_carriers"] == 12  # the burst's band and its carriers, seen
