"""Audio datasets: labelled clips as one padded float32 waveform matrix.

Layouts read:

* a folder ``ROOT/<label>/*.wav`` (labels from the folder names, ids = paths relative to ROOT);
  16-bit (or 8/24/32-bit) PCM or 32/64-bit float wavs, read with ``scipy.io.wavfile``;
* ``.npz`` with ``x`` (N, T) waveforms, ``y`` labels, ``sample_rate`` and optionally ``lengths``
  (N,) valid samples per row (default: T);
* ``.npz`` in the Free Spoken Digit Dataset layout (``audio`` concatenated int16, ``offsets``,
  ``lengths``, ``digit``, ``sample_rate``, optional ``is_test``, ``speaker_id``, ``filenames``).

Documented handling: stereo (or more channels) is averaged to mono; clips at another sample rate
are resampled (polyphase, ``scipy.signal.resample_poly``) to the most common rate (or the one
asked for); integer PCM is scaled to [-1, 1); clips longer than ``max_seconds`` are cut (counted
in ``AudioData.n_cut``). Refused with one :class:`~poisonguard.errors.DataError` line: a wav that
is not PCM or float, a truncated or unreadable wav, a 0-length clip, NaN/inf samples, a folder
with no wavs.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import DataError

MAX_SECONDS = 1.0
FSDD_KEYS = ("audio", "offsets", "lengths")


@dataclass(frozen=True)
class AudioData(LabeledData):
    """Waveforms ``x`` (N, T) float32 in [-1, 1], zero-padded after ``lengths[i]`` samples;
    labels ``y``; ``ids`` (str); ``sample_rate`` in Hz; ``groups`` an optional per-clip
    speaker/account name; ``label_map`` original label -> integer."""

    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sample_rate: int = 8000
    label_map: dict[str, int] = field(default_factory=dict)
    groups: np.ndarray | None = None
    n_cut: int = 0
    n_resampled: int = 0
    n_downmixed: int = 0

    def subset(self, index: np.ndarray) -> AudioData:
        index = np.asarray(index)
        return AudioData(x=self.x[index], y=self.y[index], ids=self.ids[index],
                         lengths=self.lengths[index], sample_rate=self.sample_rate,
                         label_map=self.label_map,
                         groups=None if self.groups is None else self.groups[index],
                         n_cut=self.n_cut, n_resampled=self.n_resampled,
                         n_downmixed=self.n_downmixed)

    def with_audio(self, x: np.ndarray, y: np.ndarray | None = None,
                   lengths: np.ndarray | None = None) -> AudioData:
        """A copy with new waveforms (same width) and optionally labels/lengths."""
        return AudioData(x=x.astype(np.float32), y=self.y if y is None else y, ids=self.ids,
                         lengths=self.lengths if lengths is None else lengths,
                         sample_rate=self.sample_rate, label_map=self.label_map,
                         groups=self.groups, n_cut=self.n_cut,
                         n_resampled=self.n_resampled, n_downmixed=self.n_downmixed)

    @property
    def is_image(self) -> bool:
        return False

    @property
    def duration_s(self) -> float:
        return self.x.shape[1] / self.sample_rate

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for arr in (self.x, self.y, self.lengths):
            a = np.ascontiguousarray(arr)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        h.update(str(self.sample_rate).encode())
        return h.hexdigest()


def to_float(samples: np.ndarray, name: str) -> np.ndarray:
    """PCM (u8, i16, i32) or float samples -> float32 in [-1, 1); 2-D (T, C) is averaged to
    mono."""
    a = np.asarray(samples)
    if a.dtype == np.uint8:
        out = (a.astype(np.float32) - 128.0) / 128.0
    elif a.dtype == np.int16:
        out = a.astype(np.float32) / 32768.0
    elif a.dtype == np.int32:
        out = (a.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        out = a.astype(np.float32)
    else:
        raise DataError(f"{name}: samples of type {a.dtype}; expected PCM integers or floats")
    if out.ndim == 2:
        out = out.mean(axis=1)
    if out.ndim != 1:
        raise DataError(f"{name}: samples of shape {a.shape}; expected (T,) or (T, channels)")
    if not np.isfinite(out).all():
        raise DataError(f"{name}: holds NaN or inf samples")
    return out


def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling from ``rate`` to ``target`` Hz."""
    if rate == target:
        return wave
    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


def read_wav(path: Path, name: str) -> tuple[np.ndarray, int, bool]:
    """(float32 mono samples, sample rate, was multi-channel) of one wav file."""
    from scipy.io import wavfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", wavfile.WavFileWarning)
            rate, samples = wavfile.read(path)
    except wavfile.WavFileWarning as exc:
        raise DataError(f"{name}: damaged or truncated wav ({exc})") from None
    except ValueError as exc:
        msg = str(exc)
        if "format" in msg.lower():
            raise DataError(f"{name}: not a PCM or float wav ({msg}); convert it to 16-bit "
                            "PCM") from None
        raise DataError(f"{name}: unreadable wav ({msg})") from None
    except (OSError, EOFError, struct.error) as exc:
        raise DataError(f"{name}: truncated or unreadable wav ({exc})") from None
    if samples.size == 0:
        raise DataError(f"{name}: 0-length clip (no samples); drop it")
    return to_float(samples, name), int(rate), samples.ndim == 2


def read_wavs(files: list[Path], root: Path) -> tuple[list[np.ndarray], list[int], int]:
    """Every file's mono wave and sample rate (errors name the path under ``root``), and how
    many were multi-channel (mixed down)."""
    waves, rates, multi = [], [], 0
    for p in files:
        w, r, m = read_wav(p, str(p.relative_to(root)))
        waves.append(w)
        rates.append(r)
        multi += m
    return waves, rates, multi


def from_waves(waves: list[np.ndarray], rates: list[int], y: np.ndarray, ids: np.ndarray,
               label_map: dict[str, int], groups: np.ndarray | None = None,
               sample_rate: int | None = None, max_seconds: float = MAX_SECONDS,
               n_downmixed: int = 0, name: str = "data") -> AudioData:
    """Resample to one rate, cut to ``max_seconds``, pad into an (N, T) matrix."""
    if not waves:
        raise DataError(f"{name}: no clips")
    target = int(sample_rate or Counter(rates).most_common(1)[0][0])
    if target < 1000:
        raise DataError(f"{name}: sample rate {target} Hz; expected at least 1000 Hz")
    n_res = sum(r != target for r in rates)
    waves = [resample(w, r, target) for w, r in zip(waves, rates)]
    empty = [i for i, w in enumerate(waves) if len(w) == 0]
    if empty:
        raise DataError(f"{name}: {len(empty)} 0-length clip(s) (first: {ids[empty[0]]}); "
                        "drop them")
    cap = int(round(max_seconds * target))
    lengths = np.array([min(len(w), cap) for w in waves], dtype=np.int64)
    width = int(lengths.max())
    x = np.zeros((len(waves), width), dtype=np.float32)
    for i, w in enumerate(waves):
        x[i, :lengths[i]] = w[:lengths[i]]
    n_cut = sum(len(w) > cap for w in waves)
    base = LabeledData.create(x, y, ids, name=name)
    return AudioData(x=base.x, y=base.y, ids=base.ids, lengths=lengths, sample_rate=target,
                     label_map=label_map, groups=groups, n_cut=n_cut, n_resampled=n_res,
                     n_downmixed=n_downmixed)


def wav_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*") if p.suffix.lower() == ".wav" and p.is_file())


def load_wav_folder(root: str | Path, sample_rate: int | None = None,
                    max_seconds: float = MAX_SECONDS,
                    label_map: dict[str, int] | None = None) -> AudioData:
    """``ROOT/<label>/*.wav``; labels sorted by folder name (numeric names keep their order)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    files = wav_files(root)
    if not files:
        raise DataError(f"{root}: no .wav files in ROOT/<label>/; expected one folder per "
                        "label holding wavs")
    names = [p.parent.name for p in files]
    mapping = label_map or _label_map(sorted(set(names)))
    unknown = sorted(set(names) - set(mapping))
    if unknown:
        raise DataError(f"{root}: labels {unknown[:5]} are not in the training labels")
    waves, rates, stereo = read_wavs(files, root)
    ids = np.array([str(p.relative_to(root)) for p in files])
    y = np.array([mapping[n] for n in names], dtype=np.int64)
    return from_waves(waves, rates, y, ids, mapping, None, sample_rate, max_seconds, stereo,
                      name=str(root))


def _label_map(values: list[str]) -> dict[str, int]:
    if all(v.lstrip("-").isdigit() for v in values):
        return {v: i for i, v in enumerate(sorted(values, key=int))}
    return {v: i for i, v in enumerate(values)}


def is_audio_npz(path: str | Path) -> bool:
    """An .npz holding waveforms: the FSDD layout or ``x`` with a ``sample_rate``."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False  # not an audio archive; the image loader gives the error
    return set(FSDD_KEYS) <= keys or ("sample_rate" in keys and "x" in keys)


def load_audio_npz(path: str | Path, split: str = "train", sample_rate: int | None = None,
                   max_seconds: float = MAX_SECONDS) -> AudioData:
    """An audio .npz (see the module docstring). ``split`` ("train", "test", "all") selects by
    ``is_test`` where the file has it."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz ({exc})") from None
    with z:
        keys = set(z.files)
        if "sample_rate" not in keys:
            raise DataError(f"{path}: no 'sample_rate' key; audio .npz files need one (Hz)")
        rate = int(np.asarray(z["sample_rate"]).reshape(-1)[0])
        if set(FSDD_KEYS) <= keys:
            audio, offsets, lengths = z["audio"], z["offsets"], z["lengths"]
            label_key = "digit" if "digit" in keys else "y"
            if label_key not in keys:
                raise DataError(f"{path}: no 'digit' or 'y' labels")
            y = np.asarray(z[label_key])
            if len(offsets) != len(lengths) or len(lengths) != len(y):
                raise DataError(f"{path}: offsets, lengths and labels differ in length")
            if (lengths < 0).any() or (offsets + lengths > len(audio)).any():
                raise DataError(f"{path}: offsets/lengths point outside 'audio'")
            waves = [audio[o:o + n] for o, n in zip(offsets, lengths)]
            ids = (np.asarray(z["filenames"]).astype(str) if "filenames" in keys
                   else np.arange(len(y)).astype(str))
            groups = None
            if "speaker_id" in keys:
                sid = np.asarray(z["speaker_id"])
                groups = (np.asarray(z["speaker_names"]).astype(str)[sid]
                          if "speaker_names" in keys else sid.astype(str))
        else:
            x = np.asarray(z["x"])
            if x.ndim != 2:
                raise DataError(f"{path}: x has shape {x.shape}; expected (N, T) waveforms")
            if "y" not in keys:
                raise DataError(f"{path}: no 'y' labels")
            y = np.asarray(z["y"])
            lengths = (np.asarray(z["lengths"], dtype=np.int64) if "lengths" in keys
                       else np.full(len(x), x.shape[1], dtype=np.int64))
            if lengths.shape != (len(x),) or (lengths > x.shape[1]).any():
                raise DataError(f"{path}: lengths must be (N,) with values <= T={x.shape[1]}")
            waves = [x[i, :lengths[i]] for i in range(len(x))]
            ids = (np.asarray(z["ids"]).astype(str) if "ids" in keys
                   else np.arange(len(x)).astype(str))
            groups = np.asarray(z["groups"]).astype(str) if "groups" in keys else None
        select = np.ones(len(y), dtype=bool)
        if "is_test" in keys and split != "all":
            is_test = np.asarray(z["is_test"]).astype(bool)
            select = is_test if split == "test" else ~is_test
    if len(y) != len(waves):
        raise DataError(f"{path}: {len(waves)} clips but {len(y)} labels")
    idx = np.flatnonzero(select)
    y = np.asarray(y)[idx]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: labels must be (N,) integers")
    values = sorted(set(y.tolist()))
    mapping = {str(v): i for i, v in enumerate(values)} if values != list(
        range(len(values))) else {str(v): v for v in values}
    y = np.array([mapping[str(v)] for v in y.tolist()], dtype=np.int64)
    waves_f = [to_float(waves[i], f"{path}[{i}]") for i in idx]
    return from_waves(waves_f, [rate] * len(idx), y, ids[idx], mapping,
                      None if groups is None else groups[idx], sample_rate, max_seconds,
                      name=str(path))


def load_audio(path: str | Path, **options: Any) -> AudioData:
    """A wav folder or an audio .npz (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return load_wav_folder(path, options.get("sample_rate"),
                               options.get("max_seconds", MAX_SECONDS), options.get("label_map"))
    return load_audio_npz(path, options.get("split", "train"), options.get("sample_rate"),
                          options.get("max_seconds", MAX_SECONDS))


def is_audio_path(path: str | Path) -> bool:
    path = Path(path)
    if path.is_dir():
        return bool(wav_files(path)) or (path.is_dir() and any(
            p.suffix.lower() == ".wav" for p in path.glob("*")))
    return is_audio_npz(path)


def write_wav(path: str | Path, wave: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM wav (clipped to [-1, 1])."""
    from scipy.io import wavfile

    pcm = np.clip(np.asarray(wave, dtype=np.float64), -1.0, 32767 / 32768) * 32768.0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    wavfile.write(path, int(sample_rate), pcm.astype(np.int16))
