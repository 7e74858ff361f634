"""Audio runtime defences (issue 18, items 4 and 5) on FSDD digits, tone trigger (3.8 kHz,
100 ms, amplitude 0.1) at 5%, target 0, seed 0, for each placement (leading silence, over the
speech, random offset):

* VAD: ASR and clean accuracy of the built-in audio CNN trained on the poisoned clips (plain),
  the same model with every test clip cut to its speech first (``filter --vad``: runtime VAD),
  and a model trained on VAD-trimmed clips and tested on trimmed clips (data-side VAD); plus
  clean models trained with and without trimming (the accuracy cost).
* STRIP: :class:`~poisonguard.runtime.strip.StripFilter` on waveforms (what ``filter`` and
  ``serve`` run for audio models), calibrated at 2% FRR on half of the clean test clips (a
  seeded split); FRR measured on the other half and FAR on the triggered versions of its
  non-target clips; blends ``mix`` (alpha 0.5 and 0.8) and ``add``.

    OMP_NUM_THREADS=1 python benchmarks/audio_runtime.py

Writes benchmarks/results/audio_runtime.{json,md}.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonguard.io import atomic_write_json, atomic_write_text
from poisonguard.modalities.audio.attacks import PLACEMENTS, audio_attack
from poisonguard.modalities.audio.data import AudioData, load_audio
from poisonguard.modalities.audio.scan import train_audio_model
from poisonguard.modalities.audio.vad import backend, trim_dataset
from poisonguard.runtime.strip import StripConfig, StripFilter

ROOT = Path(__file__).resolve().parent
FSDD = ROOT.parent.parent / "shared" / "datasets" / "fsdd" / "fsdd.npz"
RESULTS = ROOT / "results"
TARGET, SEED, RATE, FRR = 0, 0, 0.05, 0.02
BLENDS = (("mix", 0.5), ("mix", 0.8), ("add", 0.8))


def acc_asr(clf: Any, test: AudioData, triggered: AudioData) -> dict[str, float]:
    return {"clean_acc": round(float((clf.predict(test.x) == test.y).mean()), 4),
            "asr": round(float((clf.predict(triggered.x) == TARGET).mean()), 4)}


def strip_rows(clf: Any, test: AudioData, triggered: AudioData) -> list[dict[str, Any]]:
    """Calibrate on a seeded half of the clean test clips; FRR on the rest, FAR on the rest's
    non-target clips with the trigger."""
    order = np.random.default_rng(SEED).permutation(len(test))
    cal, ev = np.sort(order[:len(test) // 2]), np.sort(order[len(test) // 2:])
    non_target = np.flatnonzero(test.y != TARGET)        # triggered[j] is test[non_target[j]]
    trig_rows = np.flatnonzero(np.isin(non_target, ev))
    rows = []
    for blend, alpha in BLENDS:
        cfg = StripConfig(n_blends=20, blend=blend, alpha=alpha, target_frr=FRR, seed=SEED)
        t0 = time.perf_counter()
        filt = StripFilter.calibrate(clf, test.x[cal], cfg)
        frr = float(filt.screen(test.x[ev]).suspicious.mean())
        far = float(1 - filt.screen(triggered.x[trig_rows]).suspicious.mean())
        rows.append({"blend": blend, "alpha": alpha if blend == "mix" else None,
                     "n_calibration": len(cal), "n_clean_eval": len(ev),
                     "n_triggered_eval": len(trig_rows), "frr": round(frr, 4),
                     "far": round(far, 4), "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    train, test = load_audio(FSDD), load_audio(FSDD, split="test")
    t0 = time.perf_counter()
    out: dict[str, Any] = {"vad_backend": backend(), "seed": SEED, "rate": RATE,
                           "target": TARGET, "target_frr": FRR}
    test_trim = trim_dataset(test)
    out["vad_trim_s"] = round(time.perf_counter() - t0, 1)
    clean = train_audio_model(train, train.n_classes, SEED).classifier
    clean_trim = train_audio_model(trim_dataset(train), train.n_classes, SEED).classifier
    out["clean"] = {"plain_acc": round(float((clean.predict(test.x) == test.y).mean()), 4),
                    "runtime_vad_acc": round(float((clean.predict(test_trim.x) == test.y
                                                    ).mean()), 4),
                    "data_vad_acc": round(float((clean_trim.predict(test_trim.x) == test.y
                                                 ).mean()), 4)}
    print(out["clean"], flush=True)
    out["placements"] = {}
    for placement in PLACEMENTS:
        p = audio_attack("tone", train, rate=RATE, target=TARGET, seed=SEED, test=test,
                         placement=placement)
        trig, trig_trim = p.test_triggered, trim_dataset(p.test_triggered)
        plain = train_audio_model(p.data, train.n_classes, SEED).classifier
        rec = {"plain": acc_asr(plain, test, trig),
               "runtime_vad": acc_asr(plain, test_trim, trig_trim)}
        data_vad = train_audio_model(trim_dataset(p.data), train.n_classes, SEED).classifier
        rec["data_vad"] = acc_asr(data_vad, test_trim, trig_trim)
        print(placement, rec, flush=True)
        rec["strip"] = strip_rows(plain, test, trig)
        out["placements"][placement] = rec
        RESULTS.mkdir(exist_ok=True)
        atomic_write_json(RESULTS / "audio_runtime.json", out)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(RESULTS / "audio_runtime.json", out)
    atomic_write_text(RESULTS / "audio_runtime.md", summarise(out))
    print(summarise(out))


def summarise(out: dict[str, Any]) -> str:
    c = out["clean"]
    lines = ["# Audio runtime defences: VAD and STRIP (FSDD, tone trigger)", "",
             "Written by `benchmarks/audio_runtime.py` (method in its docstring). Tone "
             f"3.8 kHz / 100 ms / amplitude 0.1 at {out['rate']:.0%}, target {out['target']}, "
             f"seed {out['seed']}; VAD backend: {out['vad_backend']}.", "",
             "## VAD", "",
             f"Clean models: accuracy {c['plain_acc']:.4f} plain, {c['runtime_vad_acc']:.4f} "
             f"with runtime VAD (test clips trimmed), {c['data_vad_acc']:.4f} trained and "
             "tested on trimmed clips.", "",
             "| placement | ASR plain | ASR runtime VAD | ASR data-side VAD | acc plain | acc "
             "runtime VAD | acc data-side VAD |", "|---|---|---|---|---|---|---|"]
    for pl, r in out["placements"].items():
        lines.append(f"| {pl} | {r['plain']['asr']:.4f} | {r['runtime_vad']['asr']:.4f} | "
                     f"{r['data_vad']['asr']:.4f} | {r['plain']['clean_acc']:.4f} | "
                     f"{r['runtime_vad']['clean_acc']:.4f} | {r['data_vad']['clean_acc']:.4f} |")
    lines += ["", "## STRIP on waveforms", "",
              f"Calibrated at {out['target_frr']:.0%} FRR; FAR = triggered clips not flagged.",
              "", "| placement | blend | alpha | FRR | FAR | n clean / triggered | s |",
              "|---|---|---|---|---|---|---|"]
    for pl, r in out["placements"].items():
        for s in r["strip"]:
            lines.append(f"| {pl} | {s['blend']} | {s['alpha'] or '-'} | {s['frr']:.4f} | "
                         f"{s['far']:.4f} | {s['n_clean_eval']} / {s['n_triggered_eval']} | "
                         f"{s['seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
