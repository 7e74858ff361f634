"""Images and plain vectors behind the modality protocol: thin wrappers over today's code
(loaders, the built-in CNN/MLP, the pixel trigger template, BadNets & co., STRIP's blend,
thumbnails). The image scan in :mod:`poisonguard.pipeline` still calls these pieces directly;
nothing here changes what it computes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from poisonguard.data.labeled import LabeledData
from poisonguard.modalities.base import AttackFn, register
from poisonguard.models.adapter import InputSpec
from poisonguard.types import DetectorResult

IMAGE_SUFFIXES = {".npz", ".png", ".jpg", ".jpeg"}


class ImageModality:
    """Pixel arrays (N, H, W[, C]); ``vector`` is the same with (N, D) arrays."""

    name = "image"

    @property
    def attacks(self) -> Mapping[str, AttackFn]:
        from poisonguard.attacks import ATTACKS

        return ATTACKS

    def handles(self, path: str | Path) -> bool:
        p = Path(path)
        return p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES

    def load(self, path: str | Path, **options: Any) -> LabeledData:
        from poisonguard.data.loaders import load_dataset

        return load_dataset(path, split=options.get("split", "train"))

    def default_model(self, data: LabeledData, n_classes: int,
                      seed: int = 0) -> tuple[nn.Module, InputSpec]:
        from poisonguard.models.architectures import (
            build_model,
            choose_architecture,
            fit_normalization,
        )

        spec = InputSpec.for_data(data.x)
        arch, kwargs = choose_architecture(spec.sample_shape(data.x), n_classes)
        model = build_model(arch, **kwargs)
        sample = np.random.default_rng(seed).choice(len(data), min(len(data), 5000),
                                                    replace=False)
        fit_normalization(model, spec.prepare(data.x[np.sort(sample)]))
        return model, spec

    def mine_triggers(self, data: LabeledData, flags: np.ndarray, classes: list[int],
                      predict: Callable[[np.ndarray], np.ndarray] | None = None
                      ) -> DetectorResult:
        from poisonguard.detect.trigger_template import TriggerTemplate

        return TriggerTemplate().detect(data.x, data.y, flags, classes)

    def perturb(self, x: np.ndarray, pool: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
        """STRIP's superimposition: the average of each input and a random clean sample."""
        pick = pool[rng.integers(0, len(pool), len(x))].astype(np.float32)
        mixed = 0.5 * x.astype(np.float32) + 0.5 * pick
        return mixed.round().astype(x.dtype) if np.issubdtype(x.dtype, np.integer) else mixed

    def render_evidence(self, data: LabeledData, flags: np.ndarray,
                        triggers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Flagged samples as raw pixels (the report's thumbnails), at most 48."""
        out = []
        for i in np.flatnonzero(flags)[:48]:
            img = data.x[i]
            if img.dtype != np.uint8:
                img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
            out.append({"index": int(i), "label": int(data.y[i]), "shape": list(img.shape),
                        "pixels": img.reshape(-1).tolist()})
        return out


class VectorModality(ImageModality):
    """Plain feature vectors (N, D), including precomputed embeddings."""

    name = "vector"

    def render_evidence(self, data: LabeledData, flags: np.ndarray,
                        triggers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"index": int(i), "label": int(data.y[i])} for i in np.flatnonzero(flags)[:48]]


register("image", ImageModality)
register("vector", VectorModality)
