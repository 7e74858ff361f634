"""Voice accounts on tiny synthetic voices: harmonic 'vowels' whose pitch and formants depend
on the speaker, the vowel sequence on the utterance."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from poisonguard.cli import main
from poisonguard.modalities.audio.data import write_wav
from poisonguard.modalities.audio.voice import (
    CosineVerifier,
    audit_accounts,
    load_accounts,
    poison_enrolment,
    speaker_features,
)
from poisonguard.modalities.audio.voice.redteam import write_poisoned_accounts

RATE = 8000
VOWELS = np.array([[700, 1200, 2500], [300, 2300, 3000], [400, 800, 2400], [500, 1700, 2600]])
SPEAKERS = {"ann": (210.0, 1.15), "bob": (110.0, 0.9), "cai": (150.0, 1.0)}


def voice(f0: float, tract: float, seed: int, seconds: float = 0.4) -> np.ndarray:
    """A clip of two vowels: harmonics of ``f0`` shaped by formants scaled by ``tract``."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    f = f0 * (1 + 0.03 * np.sin(2 * np.pi * 3 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f) / RATE
    out = np.zeros(n)
    for half, v in enumerate(rng.choice(len(VOWELS), 2)):
        seg = slice(half * n // 2, (half + 1) * n // 2)
        for h in range(1, int(3800 / f0)):
            gain = sum(np.exp(-((h * f0 - tract * fm) / 120.0) ** 2) for fm in VOWELS[v])
            out[seg] += (gain + 0.02) * np.sin(h * phase[seg]) / h ** 0.5
    out *= np.hanning(n) ** 0.3
    out += 0.002 * rng.standard_normal(n)
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def make_root(root: Path, n: int = 8) -> Path:
    for s, (name, (f0, tract)) in enumerate(SPEAKERS.items()):
        for i in range(n):
            write_wav(root / name / f"{i}.wav", voice(f0, tract, 100 * s + i), RATE)
    return root


def test_features_track_pitch():
    f = speaker_features([voice(110, 1.0, 0), voice(220, 1.0, 0)], RATE)
    assert abs((f[1, -3] - f[0, -3]) - 1.0) < 0.1        # log2 F0 one octave apart
    assert f.shape[1] == 51 and np.isfinite(f).all()


def test_clean_accounts_pass_and_a_planted_voice_is_flagged(tmp_path):
    root = make_root(tmp_path / "root")
    assert main(["audit-accounts", str(root), "--out", str(tmp_path / "clean"), "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "clean" / "accounts.csv")))
    assert [r["account"] for r in rows] == sorted(SPEAKERS)
    assert all(r["suspicious"] == "0" for r in rows)
    planted = write_poisoned_accounts(root, "ann", "bob", 0.4, tmp_path / "att", seed=1)
    assert len(planted) == 3
    assert main(["audit-accounts", str(tmp_path / "att"), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 1
    rows = {r["account"]: r for r in csv.DictReader(open(tmp_path / "o" / "accounts.csv"))}
    assert rows["ann"]["suspicious"] == "1" and rows["cai"]["suspicious"] == "0"
    assert float(rows["ann"]["score"]) > float(rows["cai"]["score"])
    sus = {r["clip"] for r in csv.DictReader(open(tmp_path / "o" / "suspect_clips.csv"))
           if r["account"] == "ann"}
    assert sus == set(planted)


def test_verifier_lets_the_attacker_in_until_the_clips_are_removed(tmp_path):
    acc = load_accounts(make_root(tmp_path / "root", n=10))
    f = speaker_features(acc.waves, acc.sample_rate)
    ann, bob = np.flatnonzero(acc.account == "ann"), np.flatnonzero(acc.account == "bob")
    items, is_att = poison_enrolment(ann[:6], bob[:6], 8, 0.5, np.random.default_rng(0))
    ver = CosineVerifier(frr=0.1).fit(f)
    clean_t = ver.template(f[ann[:6]])
    ver.calibrate(ver.scores(clean_t, f[ann[6:]]))
    assert not ver.accept(clean_t, f[bob[6:]]).any()
    poisoned_t = ver.template(f[items])
    assert ver.scores(poisoned_t, f[bob[6:]]).mean() > ver.scores(clean_t, f[bob[6:]]).mean()
    assert is_att.sum() == 4
    audit = audit_accounts(acc)
    assert not audit.suspicious.any()


@pytest.mark.parametrize("case", ["no_wavs", "one_account", "truncated", "not_pcm", "empty"])
def test_bad_input_exits_2(tmp_path, case, capsys):
    root = tmp_path / "r"
    if case == "no_wavs":
        (root / "a").mkdir(parents=True)
    else:
        make_root(root, n=3)
        if case == "one_account":
            for name in ("bob", "cai"):
                for p in (root / name).glob("*.wav"):
                    p.unlink()
                (root / name / "0.wav").write_bytes((root / "ann" / "0.wav").read_bytes())
        elif case == "empty":
            write_wav(root / "ann" / "0.wav", np.zeros(0, np.float32), RATE)
        elif case == "truncated":
            p = root / "ann" / "0.wav"
            p.write_bytes(p.read_bytes()[:30])
        else:
            p = root / "ann" / "0.wav"
            data = bytearray(p.read_bytes())
            data[20:22] = (85).to_bytes(2, "little")      # format tag: MPEG layer 3
            p.write_bytes(bytes(data))
    assert main(["audit-accounts", str(root), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o").exists()


def test_one_clip_account_skipped_stereo_mixed_down_rates_resampled(tmp_path, capsys):
    root = make_root(tmp_path / "r", n=6)
    w = voice(150, 1.0, 7)
    write_wav(tmp_path / "mono.wav", w, RATE)
    from scipy.io import wavfile

    wavfile.write(root / "cai" / "st.wav", RATE,
                  (np.stack([w, w], axis=1) * 32767).astype(np.int16))
    write_wav(root / "dan" / "0.wav", voice(180, 1.05, 9), RATE)
    from scipy.signal import resample_poly

    write_wav(root / "ann" / "hi.wav", resample_poly(voice(210, 1.15, 11), 2, 1), 2 * RATE)
    assert main(["audit-accounts", str(root), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "account dan skipped" in out
    rows = list(csv.DictReader(open(tmp_path / "o" / "accounts.csv")))
    assert "dan" not in {r["account"] for r in rows}
    import json

    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["n_downmixed"] == 1 and rep["skipped_accounts"] == {"dan": 1}
    assert rep["n_resampled"] == 1 and rep["sample_rate"] == RATE
