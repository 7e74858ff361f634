"""Several runtime filters as one: each is calibrated at an equal share of the false-rejection
budget and an input is flagged when any fires (a Bonferroni union: expected FRR <= budget).

``--method`` names: ``strip``, ``scale-up``, ``ibd-psc``, ``feature``, several joined with
``+``, or ``both`` (= ``strip+feature``: on the issue-21 MNIST zoo the feature filter caught
WaNet and adaptive blend, scale-up and ibd-psc did not). The calibration folder holds each
filter's own files and ``filters.json`` listing them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.errors import ConfigError
from poisonguard.io import atomic_write_json
from poisonguard.runtime.strip import StripResult, validate_inputs

METHOD_NAMES = ("strip", "scale-up", "ibd-psc", "feature")
FILTERS_JSON = "filters.json"


def parse_methods(text: str) -> tuple[str, ...]:
    """``both`` or distinct names of :data:`METHOD_NAMES` joined with ``+``."""
    if text == "both":
        return ("strip", "feature")
    parts = tuple(text.split("+"))
    if any(p not in METHOD_NAMES for p in parts) or len(set(parts)) != len(parts):
        raise ConfigError(f"--method must be one of {METHOD_NAMES}, 'both', or distinct ones "
                          f"joined with '+' (e.g. strip+scale-up); got {text!r}")
    return parts


def filter_name(filt: Any) -> str:
    return getattr(filt, "name", "strip")


class UnionFilter:
    """Flags an input when any of ``filters`` does; ``score`` is the largest of theirs."""

    def __init__(self, filters: list[Any]) -> None:
        if len(filters) < 2:
            raise ConfigError("a union needs at least two filters")
        self.filters = filters
        self.sample_shape = tuple(filters[0].sample_shape)
        first = filters[0]
        self.input_dtype = np.dtype(getattr(first, "input_dtype", None)
                                    or first.pool.dtype)
        self.target_frr = float(sum(f.describe().get("target_frr") or 0.0 for f in filters))

    @property
    def name(self) -> str:
        return "+".join(filter_name(f) for f in self.filters)

    @property
    def threshold(self) -> dict[str, float] | None:
        out: dict[str, float] = {}
        for f in self.filters:
            if f.threshold is None:
                return None
            out.update({f"{filter_name(f)}:{k}": v for k, v in f.threshold.items()})
        return out

    def coerce(self, x: np.ndarray) -> np.ndarray:
        return self.filters[0].coerce(x)

    def screen(self, x: np.ndarray) -> StripResult:
        x = self.coerce(validate_inputs(x, self.sample_shape))
        results = [f.screen(x) for f in self.filters]
        strip = [r for f, r in zip(self.filters, results) if filter_name(f) == "strip"]
        stats = {f"{filter_name(f)}:{k}": v for f, r in zip(self.filters, results)
                 for k, v in r.stats.items()}
        return StripResult(prediction=results[0].prediction,
                           entropy=strip[0].entropy if strip else np.zeros(len(x)),
                           suspicious=np.any([r.suspicious for r in results], axis=0),
                           threshold=self.threshold,
                           score=np.max([r.score for r in results], axis=0), stats=stats)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "target_frr": self.target_frr,
                "filters": {filter_name(f): f.describe() for f in self.filters}}

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        for f in self.filters:
            f.save(out)
        return atomic_write_json(out / FILTERS_JSON, {"format": "poisonguard-filters",
                                                      "methods": [filter_name(f) for f in
                                                                  self.filters]})


def load_filter(path: str | Path, classifier: Any) -> Any:
    """A saved calibration: a union (``filters.json``), a consistency filter
    (``scale-up.json`` / ``ibd-psc.json``) or STRIP (``strip.json``); ``path`` is the folder
    or one of those files."""
    from poisonguard.runtime.consistency import METHODS, ConsistencyFilter, calibration_file
    from poisonguard.runtime.feature import FEATURE_JSON, FeatureFilter
    from poisonguard.runtime.strip import CALIBRATION_JSON, StripFilter

    def one(m: str) -> Any:
        if m == "strip":
            return StripFilter.load(path / CALIBRATION_JSON, classifier)
        if m == "feature":
            return FeatureFilter.load(path / FEATURE_JSON, classifier)
        return ConsistencyFilter.load(path / calibration_file(m), classifier)

    path = Path(path)
    if path.is_dir() and (path / FILTERS_JSON).exists():
        try:
            methods = parse_methods("+".join(json.loads((path / FILTERS_JSON).read_text())
                                             ["methods"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path / FILTERS_JSON}: unreadable ({exc})") from None
        return UnionFilter([one(m) for m in methods])
    if path.name == FEATURE_JSON or (path.is_dir() and (path / FEATURE_JSON).exists()
                                     and not (path / CALIBRATION_JSON).exists()):
        return FeatureFilter.load(path, classifier)
    files = {calibration_file(m) for m in METHODS}
    if path.name in files or (path.is_dir() and not (path / CALIBRATION_JSON).exists()
                              and any((path / f).exists() for f in files)):
        return ConsistencyFilter.load(path, classifier)
    return StripFilter.load(path, classifier)
