"""The API a federated server calls once per round: :class:`FederatedServer`.

    server = FederatedServer(defense="cluster")
    result = server.aggregate({"alice": delta_a, "bob": delta_b, ...}, weights=n_samples)
    global_state = {k: global_state[k] + result.update[k] for k in global_state}
    result.named        # the clients the defence named this round
    result.verdict      # a DetectorResult: one score per client (higher = more suspicious)

Updates are model deltas (``local - global``) as state dicts or flat vectors; the first round
fixes their layout and later rounds must match it (see :mod:`poisonguard.federated.updates`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.errors import ConfigError
from poisonguard.federated import aggregators as agg
from poisonguard.federated.updates import Update, UpdateLayout, check_weights, stack_updates
from poisonguard.types import DetectorResult, jsonable

DEFENSES = ("fedavg", "clip", "median", "trimmed", "krum", "cluster")
NAMING = ("krum", "cluster")  # the defences that exclude (name) clients


@dataclass(frozen=True)
class RoundResult:
    """One round's outcome: the aggregated ``update`` (in the clients' layout), the per-client
    ``verdict`` (scores and flags in ``client_ids`` order) and the round number."""

    round: int
    client_ids: list[str]
    update: dict[str, np.ndarray] | np.ndarray
    verdict: DetectorResult

    @property
    def named(self) -> list[str]:
        return [c for c, f in zip(self.client_ids, self.verdict.flags) if f]

    @property
    def scores(self) -> dict[str, float]:
        return {c: float(s) for c, s in zip(self.client_ids, self.verdict.scores)}

    def summary(self) -> dict[str, Any]:
        """JSON-ready form (without the update)."""
        v = self.verdict
        return {"round": self.round, "defense": v.params.get("defense"), "named": self.named,
                "scores": {c: round(s, 4) for c, s in self.scores.items()},
                "threshold": v.threshold, "threshold_rule": jsonable(v.threshold_rule),
                "runtime_s": round(v.runtime_s, 4)}


class FederatedServer:
    """Aggregates client updates with one of :data:`DEFENSES` and judges every client.

    ``clip_norm`` (clip: the bound; default the round's median norm), ``noise`` (clip, cluster:
    Gaussian noise std as a multiple of the clipping bound), ``trim_fraction`` (trimmed),
    ``krum_f`` / ``krum_m`` (krum), ``z`` (default: calibrated for the round's client count
    at false-alarm rate ``alpha``) and ``clip_accepted`` (cluster), ``seed`` (noise).
    The constructor only checks and stores them; nothing is learnt across rounds except the
    update layout.
    """

    def __init__(self, defense: str = "cluster", *, clip_norm: float | None = None,
                 noise: float = 0.0, trim_fraction: float = 0.1, krum_f: int | None = None,
                 krum_m: int | None = None, z: float | None = None, alpha: float = 0.002,
                 clip_accepted: bool = True, seed: int = 0) -> None:
        if defense not in DEFENSES:
            raise ConfigError(f"unknown defense {defense!r}; expected one of {list(DEFENSES)}")
        if clip_norm is not None and not clip_norm > 0:
            raise ConfigError(f"clip_norm must be > 0, got {clip_norm}")
        if not noise >= 0:
            raise ConfigError(f"noise must be >= 0, got {noise}")
        if not 0.0 < trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be in (0, 0.5), got {trim_fraction}")
        if krum_f is not None and krum_f < 0:
            raise ConfigError(f"krum_f must be >= 0, got {krum_f}")
        if z is not None and not z > 0:
            raise ConfigError(f"z must be > 0, got {z}")
        if not 0.0 < alpha < 0.5:
            raise ConfigError(f"alpha must be in (0, 0.5), got {alpha}")
        self.defense = defense
        self.params: dict[str, Any] = {"clip_norm": clip_norm, "noise": noise,
                                       "trim_fraction": trim_fraction, "krum_f": krum_f,
                                       "krum_m": krum_m, "z": z, "alpha": alpha,
                                       "clip_accepted": clip_accepted,
                                       "seed": seed}
        self.layout: UpdateLayout | None = None
        self.rounds = 0
        self._rng = np.random.default_rng(seed)

    def _run(self, u: np.ndarray, w: np.ndarray) -> agg.Aggregate:
        p = self.params
        if self.defense == "fedavg":
            return agg.fedavg(u, w)
        if self.defense == "clip":
            return agg.clip(u, w, p["clip_norm"], p["noise"], self._rng)
        if self.defense == "median":
            return agg.median(u)
        if self.defense == "trimmed":
            return agg.trimmed_mean(u, p["trim_fraction"])
        if self.defense == "krum":
            return agg.krum(u, p["krum_f"], p["krum_m"])
        return agg.cluster(u, w, p["z"], p["clip_accepted"], p["noise"], self._rng,
                           alpha=p["alpha"])

    def aggregate(self, updates: Mapping[Any, Update],
                  weights: Mapping[Any, float] | None = None) -> RoundResult:
        """Validate this round's ``updates`` (client id -> delta), aggregate them and judge
        each client. ``weights`` (client id -> e.g. sample count) weight fedavg, clip and
        cluster; median, trimmed and krum ignore them. Raises DataError on bad updates."""
        t0 = time.perf_counter()
        ids, u, layout = stack_updates(updates, self.layout)
        w = check_weights(ids, weights)
        out = self._run(u, w)
        self.layout = layout
        self.rounds += 1
        verdict = DetectorResult(
            name=f"federated-{self.defense}", scores=np.asarray(out.scores, dtype=np.float64),
            flags=np.asarray(out.flags, dtype=bool), threshold=out.threshold,
            threshold_rule=out.rule, findings=(), runtime_s=time.perf_counter() - t0,
            params={"defense": self.defense, **self.params},
            extras={"client_ids": ids, "names_clients": self.defense in NAMING,
                    **out.extras})
        return RoundResult(round=self.rounds, client_ids=ids, update=layout.unflatten(out.update),
                           verdict=verdict)
