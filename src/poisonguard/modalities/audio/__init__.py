"""The audio modality: labelled clips from wav folders or .npz, a log-mel front end written
with ``torch.stft``, a small CNN, sound-trigger attacks, and the time-frequency trigger miner."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError
from poisonguard.modalities.audio.attacks import AUDIO_ATTACKS, audio_attack
from poisonguard.modalities.audio.data import AudioData, is_audio_path, load_audio
from poisonguard.modalities.audio.frontend import MelConfig
from poisonguard.modalities.audio.miner import AudioTriggerMiner
from poisonguard.modalities.audio.model import AudioCNN
from poisonguard.modalities.base import AttackFn, register
from poisonguard.models.adapter import InputSpec
from poisonguard.types import DetectorResult

MAX_EVIDENCE = 50


class AudioModality:
    """Clips as (N, T) float32 waveforms; the model takes waveforms (``raw`` layout)."""

    name = "audio"

    @property
    def attacks(self) -> Mapping[str, AttackFn]:
        return AUDIO_ATTACKS

    def handles(self, path: str | Path) -> bool:
        return is_audio_path(path)

    def load(self, path: str | Path, **options: Any) -> AudioData:
        return load_audio(path, **options)

    def default_model(self, data: LabeledData, n_classes: int,
                      seed: int = 0) -> tuple[nn.Module, InputSpec]:
        from poisonguard.modalities.audio.scan import WAVE_SPEC

        rate = data.sample_rate if isinstance(data, AudioData) else 8000
        return AudioCNN(n_classes, rate), WAVE_SPEC

    def mine_triggers(self, data: LabeledData, flags: np.ndarray, classes: list[int],
                      predict: Callable[[np.ndarray], np.ndarray] | None = None
                      ) -> DetectorResult:
        if predict is None:
            raise ConfigError("the audio trigger miner needs the model's predict function")
        rate = data.sample_rate if isinstance(data, AudioData) else 8000
        return AudioTriggerMiner().detect(data.x, data.y, flags, classes, predict,
                                          MelConfig.for_rate(rate))

    def perturb(self, x: np.ndarray, pool: np.ndarray, rng: np.random.Generator,
                weight: float = 0.5) -> np.ndarray:
        """STRIP for audio: each clip mixed with a random clean clip from ``pool``
        (``(1 - weight) x + weight pool``); a trigger survives the mix, speech content blurs."""
        pick = pool[rng.integers(0, len(pool), len(x))]
        return ((1 - weight) * x + weight * pick).astype(np.float32)

    def render_evidence(self, data: LabeledData, flags: np.ndarray,
                        triggers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Flagged clips (at most 50): id, label, and the trigger band/span of their class."""
        by_class = {int(t["class"]): t for t in triggers}
        rows = []
        for i in np.flatnonzero(flags)[:MAX_EVIDENCE]:
            t = by_class.get(int(data.y[i]))
            rows.append({"index": int(i), "id": str(data.ids[i]), "label": int(data.y[i]),
                         "band_hz": t["band_hz"] if t else None,
                         "time_s": t["time_s"] if t else None})
        return rows


register("audio", AudioModality)

__all__ = ["AudioData", "AudioModality", "AudioTriggerMiner", "audio_attack", "load_audio"]
