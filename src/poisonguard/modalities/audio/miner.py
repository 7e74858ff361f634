"""The audio trigger miner: a time-frequency pattern that some clips of a class share and the
other classes lack, confirmed by removing it.

Each clip's log-mel spectrogram (the model's own front end) gives, per mel band, the clip's peak
level over time. A band's threshold is the ``other_quantile`` of that peak over the clips of the
*other* classes (an all-to-one trigger was stamped on clips of other classes and relabelled, so
the other classes hold no trigger). In class c, a band is a candidate when at least
``max(min_count, min_share x N)`` clips exceed it and their share is at least ``min_ratio`` times
the other classes' (a floor on a backdoor's size, not a poison rate). Candidate bands whose
carriers overlap (Jaccard >= ``group_jaccard``) form one group, a contiguous band range; a clip
carries the group when it exceeds the threshold in at least half the group's bands, and the
group's time span in a clip is the frames where it does.

A group is confirmed as a trigger when removing it (zeroing the group's STFT bins over the
clip's active frames, resynthesised with ``torch.istft``) moves the sacrificial model's
prediction off the class for a share of its carriers whose Wilson lower bound (``z`` = 3) is at
least ``min_flip``: without an all-to-one trigger the rest of the clip is speech of another
class; a sound typical of the class (the fricative of "six") leaves a clip that still reads as
the class. Every carrier of a confirmed group is flagged. The reported trigger is
``{"class", "modality": "audio", "band_hz": [lo, hi], "time_s": [start, end], ...}`` with the
carriers' median span and the spread of their onsets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.modalities.audio.frontend import MelConfig, band_stop, log_mel
from poisonguard.modalities.text.miner import wilson_lower
from poisonguard.types import ClassFinding, DetectorResult

Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class AudioTriggerMiner:
    other_quantile: float = 0.999
    min_count: int = 5
    min_share: float = 0.0005
    min_ratio: float = 10.0
    group_jaccard: float = 0.5
    min_flip: float = 0.5
    z: float = 3.0
    dilate_frames: int = 2
    max_groups: int = 8
    name: str = "audio_trigger"

    def detect(self, x: np.ndarray, labels: np.ndarray, flags: np.ndarray, classes: list[int],
               predict: Predict, mel: MelConfig, spec: np.ndarray | None = None
               ) -> DetectorResult:
        """``x`` (N, T) waveforms; ``flags`` the first stage's; ``predict`` maps waveforms to
        class probabilities; ``spec`` the clips' log-mel (computed when not given)."""
        t0 = time.perf_counter()
        s = log_mel(x, mel) if spec is None else spec
        peak = s.max(axis=2)                                   # (N, bands)
        n, n_bands = peak.shape
        edges = mel.band_edges_hz()
        scores = np.zeros(n)
        out = np.zeros(n, dtype=bool)
        findings = []
        floor = max(self.min_count, int(np.ceil(self.min_share * n)))
        for c in classes:
            in_c = labels == c
            if not in_c.any() or in_c.all():
                continue
            tau = np.quantile(peak[~in_c], self.other_quantile, axis=0)   # (bands,)
            above = peak > tau                                            # (N, bands)
            n_c = above[in_c].sum(0)
            rate_c = n_c / in_c.sum()
            rate_o = above[~in_c].mean(0)
            cand = np.flatnonzero((n_c >= floor) & (rate_c >= self.min_ratio *
                                                    np.maximum(rate_o, 1.0 / (~in_c).sum())))
            cand = cand[np.argsort(-n_c[cand], kind="stable")]
            taken = np.zeros(n_bands, dtype=bool)
            covered = np.zeros(n, dtype=bool)
            tested: list[dict[str, Any]] = []
            confirmed: list[dict[str, Any]] = []
            for b in cand:
                if taken[b] or len(tested) >= self.max_groups:
                    continue
                seed_car = above[:, b] & in_c
                inter = (above[in_c] & seed_car[in_c][:, None]).sum(0)
                jac = inter / np.maximum(n_c + seed_car.sum() - inter, 1)
                group = np.flatnonzero(np.isin(np.arange(n_bands), cand) & (jac >=
                                                                            self.group_jaccard))
                lo, hi = int(min(group.min(), b)), int(max(group.max(), b))
                bands = np.arange(lo, hi + 1)
                taken[bands] = True
                need = max(1, int(np.ceil(0.5 * len(bands))))
                carriers = np.flatnonzero(in_c & (above[:, bands].sum(1) >= need))
                if len(carriers) < floor:
                    continue
                if covered[carriers].mean() >= 0.5:
                    continue
                active = ((s[carriers][:, bands, :] > tau[bands][None, :, None]).sum(1)
                          >= need)                                       # (carriers, frames)
                if self.dilate_frames:
                    k = self.dilate_frames
                    pad = np.pad(active, ((0, 0), (k, k)))
                    active = np.stack([pad[:, j:j + active.shape[1]]
                                       for j in range(2 * k + 1)]).any(0)
                hz = (float(edges[lo]), float(edges[hi + 2]))
                removed = band_stop(x[carriers], mel, hz, active)
                moved = predict(removed).argmax(1) != c
                flip = float(moved.mean())
                bound = wilson_lower(int(moved.sum()), len(moved), self.z)
                times = mel.frame_times(active.shape[1])
                first = np.array([times[np.argmax(a)] for a in active])
                last = np.array([times[len(a) - 1 - np.argmax(a[::-1])] for a in active])
                entry = {"band_hz": [round(hz[0], 1), round(hz[1], 1)],
                         "mel_bands": [lo, hi],
                         "time_s": [round(float(np.median(first)), 3),
                                    round(float(np.median(last)) + mel.n_fft / mel.sample_rate
                                          / 2, 3)],
                         "onset_spread_s": round(float(np.subtract(
                             *np.percentile(first, [75, 25]))), 3),
                         "n_carriers": int(len(carriers)),
                         "n_other_classes": int(above[~in_c][:, bands].sum(1).__ge__(need).sum()),
                         "flip": round(flip, 4), "flip_lower_bound": round(bound, 4),
                         "flagged_share": round(float(flags[carriers].mean()), 4),
                         "_carriers": carriers}
                tested.append(entry)
                if bound >= self.min_flip:
                    confirmed.append(entry)
                    covered[carriers] = True
            hits = np.zeros(n, dtype=bool)
            for e in confirmed:
                hits[e["_carriers"]] = True
                scores[e["_carriers"]] = np.maximum(scores[e["_carriers"]],
                                                    e["flip_lower_bound"])
            out |= hits
            top = sorted(tested, key=lambda e: -e["flip_lower_bound"])[:5]
            evidence: dict[str, Any] = {
                "n_candidate_bands": int(len(cand)), "n_groups_tested": len(tested),
                "top_groups": [_public(e) for e in top],
                "triggers": [{"class": int(c), "modality": "audio", **_public(e)}
                             for e in confirmed]}
            if confirmed:
                evidence["reason"] = "; ".join(
                    f"removing {e['band_hz'][0]:.0f}-{e['band_hz'][1]:.0f} Hz over "
                    f"{e['time_s'][0]:.2f}-{e['time_s'][1]:.2f} s moves the model's prediction "
                    f"off the class for {e['flip']:.0%} of the {e['n_carriers']} clips "
                    "carrying it" for e in confirmed)
            findings.append(ClassFinding(int(c), bool(confirmed), int(in_c.sum()),
                                         int(hits.sum()), evidence))
        rule = {"rule": "per mel band, the clip's peak level above the other classes' "
                        "other_quantile; bands with >= max(min_count, min_share x N) carriers "
                        "in the class at >= min_ratio x the other classes' share, grouped by "
                        "shared carriers (Jaccard >= group_jaccard) into a band range; a group "
                        "is a trigger when band-stopping it over its active frames moves its "
                        "carriers' predictions off the class for a share whose Wilson lower "
                        "bound (z) is >= min_flip",
                "other_quantile": self.other_quantile, "min_count": self.min_count,
                "min_share": self.min_share, "min_ratio": self.min_ratio,
                "group_jaccard": self.group_jaccard, "min_flip": self.min_flip, "z": self.z}
        return DetectorResult(self.name, scores, out, self.min_flip, rule, tuple(findings),
                              time.perf_counter() - t0)


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if not k.startswith("_")}
