"""What the VAD keeps of each trigger sound (issue 18, item 4): for every sound of
:mod:`~poisonguard.modalities.audio.attacks` (amplitude 0.1, default durations) placed in the
leading silence of 100 FSDD training clips (the ``leading`` placement, seed 0), the share of
the sound's samples that :func:`~poisonguard.modalities.audio.vad.speech_mask` keeps (WebRTC
VAD, aggressiveness 0-3), and the share of the clips' speech samples kept.

    OMP_NUM_THREADS=1 python benchmarks/audio_vad_frames.py

Writes benchmarks/results/audio_vad_frames.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from poisonguard.io import atomic_write_json
from poisonguard.modalities.audio.attacks import DEFAULT_DURATION, GAP_S, SOUNDS, make_sound
from poisonguard.modalities.audio.data import load_audio
from poisonguard.modalities.audio.vad import backend, speech_mask

ROOT = Path(__file__).resolve().parent
FSDD = ROOT.parent.parent / "shared" / "datasets" / "fsdd" / "fsdd.npz"


def main() -> None:
    data = load_audio(FSDD)
    rate = data.sample_rate
    clips = [data.x[i, :data.lengths[i]] for i in range(100)]
    out: dict = {"backend": backend(), "n_clips": len(clips), "sounds": {}}
    for kind in SOUNDS:
        sound = make_sound(kind, rate, DEFAULT_DURATION[kind], 0.1)
        gap = np.zeros(int(GAP_S * rate), np.float32)
        row = {}
        for agg in range(4):
            kept_sound, kept_speech = [], []
            for c in clips:
                w = np.concatenate([sound, gap, c])
                m = speech_mask(w, rate, agg)
                kept_sound.append(m[:len(sound)].mean())
                kept_speech.append(m[len(sound) + len(gap):].mean())
            row[f"aggressiveness_{agg}"] = {"sound_kept": round(float(np.mean(kept_sound)), 4),
                                            "speech_kept": round(float(np.mean(kept_speech)),
                                                                 4)}
        out["sounds"][kind] = row
        print(kind, row)
    atomic_write_json(ROOT / "results" / "audio_vad_frames.json", out)


if __name__ == "__main__":
    main()
