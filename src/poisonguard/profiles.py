"""Audit profiles: how much effort each layer gets, sized to what a compromise would cost.

``quick``: one scan round with a short-trained sacrificial model (a fifth of the epochs, at
least one) and the three cheapest detectors, Neural Cleanse's mask search only (no additive
search), no dormant-unit scan, no runtime calibration.
``standard``: the defaults of ``scan``, ``audit-model`` and ``filter``.
``paranoid``: every detector (SPECTRE too), the sacrificial model trained with three seeds
and flags kept where at least two agree, an independent re-check of the flags by a model of
another architecture, both trigger searches with twice the steps, the max-margin search
beside them, the dormant-unit scan and runtime calibration.

A model given without clean data gets the data-free max-margin search (MM-BD) in every
profile, on the input domain its ``model.json`` records (or the scanned data's shape and range).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from poisonguard.errors import ConfigError
from poisonguard.pipeline import DETECTORS, OPTIONAL_DETECTORS, auto_epochs


@dataclass(frozen=True)
class Profile:
    """The settings one profile gives each layer."""

    name: str
    scan_rounds: int
    epoch_share: float          # of :func:`auto_epochs`; at least ``min_epochs``
    min_epochs: int
    detectors: tuple[str, ...]
    loss_seed: bool
    final_model: bool
    seeds: tuple[int, ...]      # sacrificial-model seeds; flags voted when more than one
    recheck: bool               # independent re-check of the flags
    cleanse_steps: int
    cleanse_min_steps: int
    additive_search: bool
    dormant: bool
    runtime: bool
    max_margin: bool = False    # with clean data, add the max-margin search to Neural Cleanse

    def scan_epochs(self, n_samples: int) -> int:
        return max(self.min_epochs, round(auto_epochs(n_samples) * self.epoch_share))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    "quick": Profile("quick", scan_rounds=1, epoch_share=0.2, min_epochs=1,
                     detectors=("activation_clustering", "spectral_signatures",
                                "loss_outliers"),
                     loss_seed=False, final_model=False, seeds=(0,), recheck=False,
                     cleanse_steps=160, cleanse_min_steps=40, additive_search=False,
                     dormant=False, runtime=False),
    "standard": Profile("standard", scan_rounds=3, epoch_share=1.0, min_epochs=2,
                        detectors=DETECTORS, loss_seed=True, final_model=True, seeds=(0,),
                        recheck=False, cleanse_steps=160, cleanse_min_steps=40,
                        additive_search=True, dormant=True, runtime=True),
    "paranoid": Profile("paranoid", scan_rounds=3, epoch_share=1.0, min_epochs=2,
                        detectors=DETECTORS + OPTIONAL_DETECTORS, loss_seed=True,
                        final_model=True, seeds=(0, 1, 2), recheck=True, cleanse_steps=320,
                        cleanse_min_steps=60, additive_search=True, dormant=True,
                        runtime=True, max_margin=True),
}


def get_profile(name: str | Profile) -> Profile:
    """A profile by name (or a custom :class:`Profile`, returned as it is)."""
    if isinstance(name, Profile):
        return name
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name]
