"""Why the audio miner misses noise bursts (issue 18): on FSDD with a tone or a white-noise
burst at 5% (target 0, seed 0, random placement), the share of poisoned clips whose per-band
log-mel peak exceeds the other classes' 99.9% quantile (the miner's candidate test), in the
best bands, and the median margin (log units) of the poisoned clips over that threshold.

    OMP_NUM_THREADS=1 python benchmarks/audio_noise_levels.py

Writes benchmarks/results/audio_noise_levels.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from poisonguard.io import atomic_write_json
from poisonguard.modalities.audio.attacks import audio_attack
from poisonguard.modalities.audio.data import load_audio
from poisonguard.modalities.audio.frontend import MelConfig, log_mel

ROOT = Path(__file__).resolve().parent
FSDD = ROOT.parent.parent / "shared" / "datasets" / "fsdd" / "fsdd.npz"


def main() -> None:
    torch.set_num_threads(1)
    train = load_audio(FSDD)
    mel = MelConfig.for_rate(train.sample_rate)
    edges = mel.band_edges_hz()
    out = {}
    for kind in ("tone", "noise"):
        p = audio_attack(kind, train, rate=0.05, target=0, seed=0, placement="random")
        peak = log_mel(p.data.x, mel).max(axis=2)
        y, pois = p.data.y, p.is_poison
        thr = np.quantile(peak[y != 0], 0.999, axis=0)
        share = (peak[pois] > thr).mean(axis=0)
        clean0 = (peak[(y == 0) & ~pois] > thr).mean(axis=0)
        margin = np.median(peak[pois] - thr, axis=0)
        best = np.argsort(-margin)[:3]
        out[kind] = {"bands": [{"band_hz": [round(float(edges[b]), 1),
                                            round(float(edges[b + 2]), 1)],
                                "poison_share_over": round(float(share[b]), 4),
                                "clean_class0_share_over": round(float(clean0[b]), 4),
                                "median_margin": round(float(margin[b]), 3)} for b in best]}
        print(kind, out[kind])
    atomic_write_json(ROOT / "results" / "audio_noise_levels.json", out)


if __name__ == "__main__":
    main()
