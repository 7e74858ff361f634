"""The modality protocol: what every layer needs to know about one kind of data.

A modality is one small object; layers call it instead of assuming pixels. What a new modality
(audio, tabular, ...) must provide:

``name``
    ``"image"``, ``"vector"``, ``"text"``, ...; the ``modality`` field of every trigger it reports.
``handles(path)``
    True when it reads this file (by suffix); the CLI picks the first modality that does.
``load(path, **options)``
    Read and validate the file; return the data (a :class:`~poisonguard.data.LabeledData` whose
    ``x`` the built-in model takes) or raise :class:`~poisonguard.errors.DataError` with one line.
``default_model(data, n_classes, seed)``
    The sacrificial model for this data (an ``nn.Module`` with an ``embed`` layer whose output
    is the representation the detectors read) and the
    :class:`~poisonguard.models.adapter.InputSpec` that turns raw samples into its tensors.
``mine_triggers(data, flags, classes, predict=None)``
    The input-space second stage: in the given classes, the trigger the flagged samples share
    (``predict`` maps model inputs to class probabilities, for miners that test a candidate by
    removing it),
    as a :class:`~poisonguard.types.DetectorResult` whose flags mark every carrier and whose
    findings carry ``evidence["trigger"]`` (a JSON-ready dict ``{"class", "modality", ...}``:
    pixels and a mask, tokens, a band and a time span, a rule in column names).
``perturb(x, pool, rng)``
    The runtime filter's perturbation (STRIP): mix each input with clean samples from ``pool``
    so that a trigger survives and clean content does not.
``attacks``
    Name -> generator ``f(data, rate=..., target=..., seed=..., test=...) -> PoisonedData``.
``render_evidence(data, flags, triggers)``
    The report's view of the flagged samples (thumbnails for images, highlighted posts for
    text), a JSON-ready list.

Detectors never see raw inputs: they read numeric representations, so they need no
modality. ``image`` and ``vector`` wrap today's code paths unchanged (the image pipeline in
:mod:`poisonguard.pipeline` still calls its pixel stages directly); ``text`` is the first
modality written against this protocol from the start.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from torch import nn

from poisonguard.attacks.base import PoisonedData
from poisonguard.data.labeled import LabeledData
from poisonguard.models.adapter import InputSpec
from poisonguard.types import DetectorResult

AttackFn = Callable[..., PoisonedData]


@runtime_checkable
class Modality(Protocol):
    """One kind of data, as every layer sees it (see the module docstring)."""

    name: str
    attacks: Mapping[str, AttackFn]

    def handles(self, path: str | Path) -> bool: ...

    def load(self, path: str | Path, **options: Any) -> LabeledData: ...

    def default_model(self, data: LabeledData, n_classes: int,
                      seed: int = 0) -> tuple[nn.Module, InputSpec]: ...

    def mine_triggers(self, data: LabeledData, flags: np.ndarray, classes: list[int],
                      predict: Callable[[np.ndarray], np.ndarray] | None = None
                      ) -> DetectorResult: ...

    def perturb(self, x: np.ndarray, pool: np.ndarray,
                rng: np.random.Generator) -> np.ndarray: ...

    def render_evidence(self, data: LabeledData, flags: np.ndarray,
                        triggers: list[dict[str, Any]]) -> list[dict[str, Any]]: ...


_REGISTRY: dict[str, Callable[[], Modality]] = {}


def register(name: str, factory: Callable[[], Modality]) -> None:
    """Make a modality available by name (``get_modality``) and to ``for_path``."""
    _REGISTRY[name] = factory


def get_modality(name: str) -> Modality:
    from poisonguard.errors import ConfigError

    if name not in _REGISTRY:
        raise ConfigError(f"unknown modality {name!r}; choose from {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def for_path(path: str | Path) -> Modality | None:
    """The registered modality (other than the default image/vector one) that reads ``path``,
    or None (the existing loaders handle it)."""
    for name, factory in _REGISTRY.items():
        if name in ("image", "vector"):
            continue
        modality = factory()
        if modality.handles(path):
            return modality
    return None


def names() -> list[str]:
    return sorted(_REGISTRY)
