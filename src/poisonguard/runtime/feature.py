"""A runtime filter in the model's feature space: the Mahalanobis distance of an input's
representation to the clean inputs of its predicted class (after Lee et al., NeurIPS 2018, "A
Simple Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks").

A backdoor reaches its target through features the clean target-class inputs do not carry, so a
triggered input predicted as the target sits far from that class's clean representations,
whatever the trigger's shape: no superimposition, no amplification. Calibration takes clean
held-out inputs without labels (the model's own predictions group them): a seeded half fits the
per-class means and one shared covariance (shrunk towards a scaled identity by ``shrinkage``),
the other half sets the split-conformal ``1 - target_frr`` threshold on the distance. A
predicted class with fewer than 2 fitting inputs is measured from the mean of all of them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard import __version__
from poisonguard.errors import ConfigError, DataError, ModelError
from poisonguard.io import atomic_save_npz, atomic_write_json
from poisonguard.models.adapter import TorchClassifier
from poisonguard.runtime.strip import StripResult, _summary, conformal_threshold, validate_inputs

FEATURE_JSON = "feature.json"
FEATURE_NPZ = "feature_stats.npz"
FORMAT = "poisonguard-feature-calibration"


@dataclass(frozen=True)
class FeatureConfig:
    target_frr: float = 0.01
    shrinkage: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_frr < 1.0:
            raise ConfigError(f"target_frr must be in [0, 1), got {self.target_frr}")
        if not 0.0 <= self.shrinkage < 1.0:
            raise ConfigError(f"shrinkage must be in [0, 1), got {self.shrinkage}")


@dataclass
class FeatureCalibration:
    threshold: float
    achieved_frr: float
    n_fit: int
    n_calibration: int
    config: FeatureConfig
    layer: str
    sample_shape: tuple[int, ...]
    input_dtype: str
    model: dict[str, Any] = field(default_factory=dict)
    clean_stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": 1, "poisonguard_version": __version__,
                "method": "feature", "thresholds": {"high": self.threshold},
                "target_frr": self.config.target_frr, "achieved_frr": self.achieved_frr,
                "n_fit": self.n_fit, "n_calibration": self.n_calibration,
                "config": asdict(self.config), "layer": self.layer,
                "sample_shape": list(self.sample_shape), "input_dtype": self.input_dtype,
                "model": self.model, "clean_stats": self.clean_stats}


def _fit(z: np.ndarray, pred: np.ndarray, k: int, shrinkage: float
         ) -> tuple[np.ndarray, np.ndarray]:
    """(K + 1, D) class means (the last: all inputs) and the shrunk shared precision."""
    overall = z.mean(0)
    means = np.stack([z[pred == c].mean(0) if (pred == c).sum() >= 2 else overall
                      for c in range(k)] + [overall])
    resid = z - means[np.where(np.bincount(pred, minlength=k)[pred] >= 2, pred, k)]
    cov = resid.T @ resid / max(len(z) - 1, 1)
    scale = float(np.trace(cov)) / max(cov.shape[0], 1)
    cov = (1.0 - shrinkage) * cov + shrinkage * max(scale, 1e-12) * np.eye(cov.shape[0])
    return means.astype(np.float64), np.linalg.pinv(cov).astype(np.float64)


class FeatureFilter:
    """Flags inputs whose representation is far from their predicted class's clean ones."""

    name = "feature"

    def __init__(self, classifier: TorchClassifier, config: FeatureConfig,
                 means: np.ndarray, precision: np.ndarray, layer: str,
                 sample_shape: tuple[int, ...], input_dtype: str,
                 calibration: FeatureCalibration | None = None) -> None:
        self.classifier = classifier
        self.config = config
        self.means = np.asarray(means, dtype=np.float64)
        self.precision = np.asarray(precision, dtype=np.float64)
        self.layer = layer
        self.sample_shape = tuple(sample_shape)
        self.input_dtype = np.dtype(input_dtype)
        self.calibration = calibration

    @property
    def threshold(self) -> dict[str, float] | None:
        return None if self.calibration is None else {"high": self.calibration.threshold}

    @staticmethod
    def _layer(classifier: TorchClassifier) -> str:
        if classifier.layer is None:
            raise ModelError("the feature filter needs the model's representation layer "
                             "(model.json 'layer'); this model names none (use --method "
                             "strip or scale-up)")
        return str(classifier.layer)

    @classmethod
    def calibrate(cls, classifier: TorchClassifier, clean_x: np.ndarray,
                  config: FeatureConfig | None = None) -> FeatureFilter:
        config = config or FeatureConfig()
        layer = cls._layer(classifier)
        clean_x = validate_inputs(np.asarray(clean_x), tuple(np.shape(clean_x)[1:]),
                                  "clean calibration data")
        n_min = 2 * max(20, int(np.ceil(1.0 / max(config.target_frr, 1e-9))))
        if len(clean_x) < n_min:
            raise DataError(f"the feature filter needs at least {n_min} clean inputs (half to "
                            f"fit the class statistics, half to set a {config.target_frr:.2%} "
                            f"false-rejection threshold); got {len(clean_x)}")
        out = classifier.forward_all(clean_x, layer=layer)
        z, pred = out["representations"].astype(np.float64), out["probs"].argmax(1)
        k = out["probs"].shape[1]
        order = np.random.default_rng(config.seed).permutation(len(z))
        fit, hold = order[: len(z) // 2], order[len(z) // 2:]
        means, prec = _fit(z[fit], pred[fit], k, config.shrinkage)
        filt = cls(classifier, config, means, prec, layer, tuple(clean_x.shape[1:]),
                   str(clean_x.dtype))
        d = filt._distance(z[hold], pred[hold])
        thr = conformal_threshold(d, config.target_frr)
        filt.calibration = FeatureCalibration(
            threshold=thr, achieved_frr=float((d > thr).mean()), n_fit=int(len(fit)),
            n_calibration=int(len(hold)), config=config, layer=layer,
            sample_shape=filt.sample_shape, input_dtype=str(clean_x.dtype),
            model={"n_classes": int(k)}, clean_stats=_summary(d))
        return filt

    def _distance(self, z: np.ndarray, pred: np.ndarray) -> np.ndarray:
        diff = z - self.means[np.minimum(pred, len(self.means) - 1)]
        return np.einsum("nd,de,ne->n", diff, self.precision, diff)

    def screen(self, x: np.ndarray) -> StripResult:
        x = self.coerce(validate_inputs(x, self.sample_shape))
        out = self.classifier.forward_all(x, layer=self.layer)
        pred = out["probs"].argmax(1)
        d = self._distance(out["representations"].astype(np.float64), pred)
        thr = self.threshold
        score = d - thr["high"] if thr else d
        sus = score > 0 if thr else np.zeros(len(d), dtype=bool)
        return StripResult(prediction=pred, entropy=np.zeros(len(d)), suspicious=sus,
                           threshold=thr, score=score, stats={"feature": d})

    def coerce(self, x: np.ndarray) -> np.ndarray:
        """Inputs in the calibration's integer dtype (range checked), others as they are."""
        from poisonguard.runtime.strip import coerce_inputs

        return coerce_inputs(x, self.input_dtype)

    def describe(self) -> dict[str, Any]:
        if self.calibration is not None:
            return self.calibration.to_dict()
        return {"format": FORMAT, "method": "feature", "threshold": None}

    def save(self, out_dir: str | Path) -> Path:
        if self.calibration is None:
            raise ConfigError("the filter is not calibrated")
        out = Path(out_dir)
        atomic_save_npz(out / FEATURE_NPZ, means=self.means, precision=self.precision)
        return atomic_write_json(out / FEATURE_JSON, self.calibration.to_dict())

    @classmethod
    def load(cls, path: str | Path, classifier: TorchClassifier) -> FeatureFilter:
        path = Path(path)
        meta_path = path / FEATURE_JSON if path.is_dir() else path
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError("not a poisonguard feature calibration")
            with np.load(meta_path.parent / FEATURE_NPZ, allow_pickle=False) as arc:
                means, prec = arc["means"], arc["precision"]
            config = FeatureConfig(**meta["config"])
            cal = FeatureCalibration(
                threshold=float(meta["thresholds"]["high"]),
                achieved_frr=float(meta["achieved_frr"]), n_fit=int(meta["n_fit"]),
                n_calibration=int(meta["n_calibration"]), config=config,
                layer=str(meta["layer"]),
                sample_shape=tuple(int(v) for v in meta["sample_shape"]),
                input_dtype=str(meta["input_dtype"]), model=meta.get("model") or {},
                clean_stats=meta.get("clean_stats") or {})
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                ValueError) as exc:
            raise ConfigError(f"{meta_path}: unreadable feature calibration ({exc})") from None
        n = cal.model.get("n_classes")
        if n and classifier.n_classes and int(n) != classifier.n_classes:
            raise ModelError(f"{meta_path}: calibrated for a {n}-class model, this model has "
                             f"{classifier.n_classes} classes; recalibrate")
        return cls(classifier, config, means, prec, cal.layer, cal.sample_shape,
                   cal.input_dtype, cal)
