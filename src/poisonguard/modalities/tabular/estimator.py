"""Users' tabular models: any scikit-learn-compatible estimator with ``predict_proba`` (a
fitted ``Pipeline``, ``HistGradientBoostingClassifier``, XGBoost's or LightGBM's sklearn
wrappers), or a torch module, over the encoded rows (:class:`TabularData.x`: numeric columns
as numbers, categoricals as the codes in ``TabularData.encodings``).

They come in through the Python API only. poisonguard never unpickles a model file (a pickle,
joblib or sklearn ``.pkl`` file runs code when loaded): load your own trusted estimator in your
own process (for example with skops and an explicit trusted-types list, or an ONNX runtime
session wrapped in an object with ``predict_proba``) and pass the object.

    from poisonguard.modalities.tabular import UserModel, attack_success_rate, scan_tabular
    model = UserModel(fitted_pipeline)           # checks predict_proba and the class count
    asr = attack_success_rate(model, poisoned.test_triggered)
    result = scan_tabular(data, predict=model.predict_proba)   # the miner's flip test on it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from poisonguard.data.labeled import LabeledData
from poisonguard.errors import ConfigError, DataError


@dataclass
class UserModel:
    """A user's fitted classifier as poisonguard calls it: ``predict_proba(x) -> (N, K)``
    float probabilities over the encoded rows, and ``predict``. ``n_classes``, when given, is
    checked against the estimator's output."""

    estimator: Any
    n_classes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.estimator, (str, bytes)) or hasattr(self.estimator, "read"):
            raise ConfigError("pass a fitted estimator object, not a file: poisonguard never "
                              "unpickles model files (load it yourself, e.g. with skops and "
                              "an explicit trusted-types list)")
        if not callable(getattr(self.estimator, "predict_proba", None)) and not callable(
                self.estimator):
            raise ConfigError(f"{type(self.estimator).__name__} has no predict_proba; pass a "
                              "fitted scikit-learn-compatible classifier or a torch module")

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if hasattr(self.estimator, "predict_proba"):
            try:
                p = np.asarray(self.estimator.predict_proba(x), dtype=np.float64)
            except Exception as exc:  # the estimator's own error, one line
                raise DataError(f"the model's predict_proba failed: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                                ) from None
        else:
            import torch

            with torch.no_grad():
                logits = self.estimator(torch.from_numpy(np.ascontiguousarray(x)))
                p = torch.softmax(logits, dim=1).numpy().astype(np.float64)
        if p.ndim != 2 or len(p) != len(x):
            raise DataError(f"the model's predict_proba gave shape {p.shape} for {len(x)} rows")
        if self.n_classes is not None and p.shape[1] != self.n_classes:
            raise DataError(f"the model predicts {p.shape[1]} classes, the data has "
                            f"{self.n_classes}")
        return p

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_proba(x).argmax(1)


def attack_success_rate(model: Any, triggered: LabeledData) -> float:
    """Share of the triggered test rows (labelled with the attacker's target) the model gives
    the target: the ASR."""
    m = model if isinstance(model, UserModel) else UserModel(model)
    if len(triggered) == 0:
        raise DataError("no triggered test rows")
    return float((m.predict(triggered.x) == triggered.y).mean())
