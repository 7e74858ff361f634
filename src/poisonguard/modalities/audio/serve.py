"""``filter`` and ``serve`` for audio models: STRIP on waveforms.

A clip carrying a sound trigger keeps a backdoored model's prediction when it is mixed with
clean speech, where a clean clip's prediction wavers (``mix`` blend: ``alpha x + (1 - alpha)
clean``, or ``add``: the saturating sum; the image-only ``cut`` blend is not used, so the default
``cut+mix`` means ``mix`` here). The filter is :class:`~poisonguard.runtime.strip.StripFilter`
on (N, T) float waveforms at the model's sample rate, T = the model's clip length: inputs are
resampled to that rate and zero-padded or cut to T. With ``--vad``, every input (and clean
clip) is first cut to its speech (:mod:`.vad`), which removes sounds in the leading silence.

Inputs: a wav folder (``ROOT/*.wav`` or ``ROOT/<label>/*.wav``; ids = paths relative to ROOT)
or an audio .npz (see :mod:`.data`). The model is a poisonguard model folder (``audio-cnn``) or
a TorchScript file over waveforms (then ``--sample-rate`` gives its rate; its clip length is
the clean clips').
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.errors import ConfigError, DataError
from poisonguard.modalities.audio.data import (
    is_audio_npz,
    load_audio_npz,
    read_wav,
    resample,
)


def is_audio_inputs(path: str | None) -> bool:
    """An audio .npz, or a folder holding wavs (flat or one level down)."""
    if path is None:
        return False
    p = Path(path)
    if p.is_dir():
        return any(q.suffix.lower() == ".wav" for q in [*p.glob("*"), *p.glob("*/*")])
    return is_audio_npz(p)


def is_audio_model(classifier: Any) -> bool:
    return hasattr(classifier.model, "mel_config")


def model_rate_and_width(classifier: Any, sample_rate: int | None) -> tuple[int | None,
                                                                            int | None]:
    """The model's sample rate (the built-in CNN knows its own) and clip length (from
    ``model.json``'s ``inputs``), each None when the model does not say."""
    rate = sample_rate
    if rate is None and is_audio_model(classifier):
        rate = int(classifier.model.mel_config.sample_rate)
    shape = (getattr(classifier, "expected_inputs", None) or {}).get("sample_shape") or []
    return rate, (int(shape[0]) if len(shape) == 1 else None)


def fit_width(waves: list[np.ndarray], width: int) -> np.ndarray:
    x = np.zeros((len(waves), width), dtype=np.float32)
    for i, w in enumerate(waves):
        x[i, :min(len(w), width)] = w[:width]
    return x


def load_clips(path: str | Path, rate: int | None) -> tuple[list[np.ndarray], np.ndarray, int]:
    """(waveforms at ``rate`` — or the clips' most common rate — ids, rate) of a wav folder
    or an audio .npz; stereo is averaged to mono."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        files = sorted({q for q in [*p.glob("*"), *p.glob("*/*")]
                        if q.suffix.lower() == ".wav" and q.is_file()})
        if not files:
            raise DataError(f"{p}: no .wav files (ROOT/*.wav or ROOT/<label>/*.wav)")
        read = [read_wav(q, str(q.relative_to(p))) for q in files]
        rates = [r for _, r, _ in read]
        target = rate or max(set(rates), key=rates.count)
        waves = [resample(w, r, target) for w, r, _ in read]
        return waves, np.array([str(q.relative_to(p)) for q in files]), int(target)
    if not is_audio_npz(p):
        raise DataError(f"{p}: not an audio .npz (x with sample_rate, or the FSDD layout) "
                        "nor a wav folder")
    data = load_audio_npz(p, split="all", sample_rate=rate, max_seconds=3600.0)
    waves = [data.x[i, :data.lengths[i]] for i in range(len(data))]
    return waves, data.ids.astype(str), int(data.sample_rate)


def prepare(waves: list[np.ndarray], rate: int, width: int, vad: bool) -> np.ndarray:
    """Optionally cut each clip to its speech, then pad/cut to ``width`` samples."""
    if vad:
        from poisonguard.modalities.audio.vad import trim_to_speech

        waves = [trim_to_speech(w, rate) for w in waves]
    return fit_width(waves, width)


def audio_config(args: argparse.Namespace) -> Any:
    from poisonguard.runtime.strip import StripConfig

    tests = [t for t in args.blend.split("+") if t != "cut"]
    if not tests:
        raise ConfigError(f"--blend {args.blend}: audio inputs take 'mix' or 'add' (the 'cut' "
                          "blend is for images)")
    return StripConfig(n_blends=args.n_blends, blend="+".join(tests), alpha=args.alpha,
                       target_frr=args.frr, seed=args.seed, chunk=args.batch_size,
                       statistic=args.statistic)


def build_audio_filter(args: argparse.Namespace, classifier: Any) -> tuple[Any, int, int]:
    """A calibrated STRIP filter for waveforms, the sample rate and clip length."""
    from poisonguard.runtime.strip import StripFilter

    rate, width = model_rate_and_width(classifier, getattr(args, "sample_rate", None))
    shape = (getattr(classifier, "expected_inputs", None) or {}).get("sample_shape") or []
    if not is_audio_model(classifier) and len(shape) > 1:
        raise ConfigError(f"the model takes samples of shape {tuple(shape)}, not (T,) "
                          "waveforms; give an audio model for audio clips")
    if args.calibration:
        filt = StripFilter.load(args.calibration, classifier)
        if rate is None:
            raise ConfigError("give --sample-rate: the model does not say its sample rate")
        return filt, rate, int(filt.sample_shape[0])
    if not args.clean:
        raise ConfigError("give --clean CLEAN (held-out clean clips: a wav folder or audio "
                          ".npz) or --calibration PATH")
    waves, _, rate = load_clips(args.clean, rate)
    width = width or max(len(w) for w in waves)
    clean = prepare(waves, rate, width, getattr(args, "vad", False))
    return StripFilter.calibrate(classifier, clean, audio_config(args)), rate, width


def _evaluation(filt: Any, path: str, rate: int, width: int, vad: bool) -> dict[str, Any]:
    """FAR/FRR on an .npz with ``x_triggered`` and ``x_test`` waveforms at ``rate``."""
    from poisonguard.runtime.strip import evaluate

    try:
        with np.load(path, allow_pickle=False) as arc:
            if "x_triggered" not in arc.files or "x_test" not in arc.files:
                raise DataError(f"{path}: needs 'x_triggered' and 'x_test' waveform arrays")
            xt, xc = arc["x_triggered"], arc["x_test"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    as_list = [list(xc.astype(np.float32)), list(xt.astype(np.float32))]
    clean, trig = (prepare(w, rate, width, vad) for w in as_list)
    return evaluate(filt.screen(clean), filt.screen(trig))


def cmd_filter_audio(args: argparse.Namespace, classifier: Any) -> int:
    """``filter`` on clips: flags.csv (index, id, prediction, score, suspicious), report.json,
    the calibration; exit 0 when nothing is flagged, 1 otherwise."""
    import time

    from poisonguard.io import atomic_write_csv

    t0 = time.perf_counter()
    rate, _ = model_rate_and_width(classifier, getattr(args, "sample_rate", None))
    waves, ids, rate_in = load_clips(args.data, rate)  # read (and checked) before calibrating
    filt, rate, width = build_audio_filter(args, classifier)
    if rate_in != rate:
        waves = [resample(w, rate_in, rate) for w in waves]
    x = prepare(waves, rate, width, args.vad)
    timings = {"calibrate_s": round(time.perf_counter() - t0, 3)}
    t1 = time.perf_counter()
    result = filt.screen(x)
    timings["screen_s"] = round(time.perf_counter() - t1, 3)
    evaluation = _evaluation(filt, args.test, rate, width, args.vad) if args.test else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    filt.save(out)
    atomic_write_csv(out / "flags.csv", ["index", "id", "prediction", "score", "suspicious"],
                     ([i, ids[i], int(p), f"{sc:.6f}", int(s)] for i, (p, sc, s) in
                      enumerate(zip(result.prediction, result.score, result.suspicious))))
    from poisonguard.runtime.cli import write_filter_report

    n_sus = write_filter_report(out, filt, x, result, evaluation, timings, args.quiet, "clips",
                                {"modality": "audio", "sample_rate": rate,
                                 "clip_samples": width, "vad": bool(args.vad)})
    return 1 if n_sus else 0
