"""The tabular modality: tables from .csv, .parquet or .npz, an MLP with categorical
embeddings, the feature-conjunction attack, and the rule miner that reports a trigger in the
data's own column names and values."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError
from poisonguard.modalities.base import AttackFn, register
from poisonguard.modalities.tabular.attacks import TABULAR_ATTACKS, parse_rule, tabular_attack
from poisonguard.modalities.tabular.data import TabularData, load_tabular, tabular_suffix
from poisonguard.modalities.tabular.estimator import UserModel, attack_success_rate
from poisonguard.modalities.tabular.miner import RuleMiner
from poisonguard.modalities.tabular.model import TabularMLP
from poisonguard.models.adapter import InputSpec
from poisonguard.types import DetectorResult

MAX_EVIDENCE = 50


class TabularModality:
    """Rows as (N, F) float32 (categoricals as codes); the model takes them as they are."""

    name = "tabular"

    def __init__(self, label_column: str = "label", id_column: str | None = None) -> None:
        self.label_column = label_column
        self.id_column = id_column

    @property
    def attacks(self) -> Mapping[str, AttackFn]:
        return TABULAR_ATTACKS

    def handles(self, path: str | Path) -> bool:
        """A .npz with ``feature_names`` (.csv/.parquet tables are told apart from text posts
        by the CLI, which knows the columns asked for)."""
        from poisonguard.modalities.tabular.data import header_of

        return tabular_suffix(path) == ".npz" and header_of(path) is not None

    def load(self, path: str | Path, **options: Any) -> TabularData:
        return load_tabular(path, options.get("label_column", self.label_column),
                            options.get("id_column", self.id_column))

    def default_model(self, data: LabeledData, n_classes: int,
                      seed: int = 0) -> tuple[nn.Module, InputSpec]:
        from poisonguard.modalities.tabular.scan import ROW_SPEC, cardinalities

        if not isinstance(data, TabularData):
            raise ConfigError("the tabular model needs TabularData (load it with load_tabular)")
        model = TabularMLP(cardinalities(data), n_classes)
        model.fit_normalization(data.x)
        return model, ROW_SPEC

    def mine_triggers(self, data: LabeledData, flags: np.ndarray, classes: list[int],
                      predict: Callable[[np.ndarray], np.ndarray] | None = None
                      ) -> DetectorResult:
        if predict is None:
            raise ConfigError("the rule miner needs the model's predict function")
        if not isinstance(data, TabularData):
            raise ConfigError("the rule miner needs TabularData (load it with load_tabular)")
        return RuleMiner().detect(data, flags, classes, predict)

    def perturb(self, x: np.ndarray, pool: np.ndarray, rng: np.random.Generator,
                share: float = 0.5) -> np.ndarray:
        """STRIP for rows: each value replaced, with probability ``share``, by the same
        column's value in a random clean row of ``pool``; a conjunction trigger survives
        in some copies only when all its columns are kept, clean content is scrambled."""
        pick = pool[rng.integers(0, len(pool), len(x))]
        swap = rng.random(x.shape) < share
        return np.where(swap, pick, x).astype(np.float32)

    def render_evidence(self, data: LabeledData, flags: np.ndarray,
                        triggers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Flagged rows (at most 50) in the file's values, with the rule of their class."""
        by_class = {int(t["class"]): t["rule"] for t in triggers}
        rows = []
        for i in np.flatnonzero(flags)[:MAX_EVIDENCE]:
            values = ({c: data.decode(j, v) for j, (c, v) in
                       enumerate(zip(data.columns, data.x[i]))}
                      if isinstance(data, TabularData) else {})
            rows.append({"index": int(i), "id": data.ids[i].item(), "label": int(data.y[i]),
                         "rule": by_class.get(int(data.y[i])), "values": values})
        return rows


register("tabular", TabularModality)

__all__ = ["RuleMiner", "TabularData", "TabularModality", "UserModel", "attack_success_rate",
           "load_tabular", "parse_rule", "tabular_attack"]
