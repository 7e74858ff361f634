"""Runtime filters that need no superimposition: prediction consistency under amplification.

- ``scale-up`` (after SCALE-UP, Guo et al., ICLR 2023): every input's pixel values are multiplied
  by each of ``factors`` (in the model's input space, clipped to the clean inputs' range). A
  backdoor trigger's feature grows with the amplification and keeps the prediction; a clean
  input's prediction drifts.
- ``ibd-psc`` (after IBD-PSC, Hou et al., ICML 2024): the input is kept and the model is
  amplified instead: copies whose deepest ``n`` batch-norm layers (n = 1, 2, ...) have their
  scale and shift multiplied by ``psc_factor``. Backdoor features stay dominant under the
  amplification; clean predictions break down.

The statistic is the mean log-odds of the input's own (unamplified) prediction over the
amplified copies (graded; a probability saturates at 1 on confident models). Both papers flag
a *high* statistic. On the MNIST models of the issue-21 zoo the opposite held: clean digits,
nearly binary, hardly change under amplification, while WaNet-warped inputs lost their target
prediction (median log-odds 7.9 clean, -12.1 triggered). So the test is two-sided by default
(``tails="two-sided"``): an input is flagged when its statistic falls outside the clean
calibration inputs' split-conformal ``target_frr / 2`` quantiles on either side
(:func:`conformal_threshold`), which keeps the expected false-rejection rate at ``target_frr``
whatever the direction; ``tails="high"`` is the papers' one-sided test. ``score`` is the
largest margin past a threshold (higher = more suspicious; flagged when ``score > 0``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from poisonguard import __version__
from poisonguard.errors import ConfigError, DataError, ModelError
from poisonguard.io import atomic_write_json
from poisonguard.models.adapter import TorchClassifier
from poisonguard.runtime.strip import StripResult, _summary, conformal_threshold, validate_inputs

METHODS = ("scale-up", "ibd-psc")
TAILS = ("two-sided", "high")


def calibration_file(method: str) -> str:
    """The calibration file a method writes: ``scale-up.json`` or ``ibd-psc.json``."""
    return f"{method}.json"

FORMAT = "poisonguard-consistency-calibration"


@dataclass(frozen=True)
class ConsistencyConfig:
    """``method`` one of :data:`METHODS`; ``factors`` the pixel amplifications of
    ``scale-up``; ``psc_factor`` the batch-norm amplification and ``psc_layers`` the most
    amplified copies of ``ibd-psc``; ``target_frr`` the clean inputs allowed to be flagged;
    ``chunk`` the most samples per forward pass."""

    method: str = "scale-up"
    factors: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)
    psc_factor: float = 1.5
    psc_layers: int = 5
    target_frr: float = 0.01
    chunk: int = 512
    tails: str = "two-sided"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"consistency method must be one of {METHODS}, got "
                              f"{self.method!r}")
        object.__setattr__(self, "factors", tuple(float(f) for f in self.factors))
        if not self.factors or any(not f > 1.0 for f in self.factors):
            raise ConfigError(f"scale-up factors must be > 1, got {self.factors}")
        if not self.psc_factor > 1.0:
            raise ConfigError(f"psc_factor must be > 1, got {self.psc_factor}")
        if self.psc_layers < 1:
            raise ConfigError(f"psc_layers must be >= 1, got {self.psc_layers}")
        if not 0.0 <= self.target_frr < 1.0:
            raise ConfigError(f"target_frr must be in [0, 1), got {self.target_frr}")
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {self.chunk}")
        if self.tails not in TAILS:
            raise ConfigError(f"tails must be one of {TAILS}, got {self.tails!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["factors"] = list(self.factors)
        return d


def _score(stat: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """The largest margin of ``stat`` past a threshold (> 0 = flagged)."""
    score = stat - thresholds["high"]
    if "low" in thresholds:
        score = np.maximum(score, thresholds["low"] - stat)
    return score


def _amplified_models(module: torch.nn.Module, factor: float, most: int
                      ) -> list[torch.nn.Module]:
    """Copies of ``module`` with the deepest 1, 2, ... batch-norm layers' affine parameters
    multiplied by ``factor``."""
    if isinstance(module, torch.jit.ScriptModule):
        raise ModelError("ibd-psc amplifies batch-norm layers, which a TorchScript module does "
                         "not expose; use --method scale-up or strip")
    names = [n for n, m in module.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine]
    if not names:
        raise ModelError("ibd-psc needs a model with batch-norm layers; this one has none "
                         "(use --method scale-up or strip)")
    out = []
    for n in range(1, min(most, len(names)) + 1):
        clone = copy.deepcopy(module).eval()
        mods = dict(clone.named_modules())
        with torch.no_grad():
            for name in names[-n:]:
                mods[name].weight.mul_(factor)
                mods[name].bias.mul_(factor)
        out.append(clone)
    return out


@dataclass
class ConsistencyCalibration:
    """``thresholds``: ``high`` (flagged above) and, two-sided, ``low`` (flagged below)."""

    thresholds: dict[str, float]
    target_frr: float
    achieved_frr: float
    n_calibration: int
    config: ConsistencyConfig
    value_range: tuple[float, float]
    input_dtype: str
    sample_shape: tuple[int, ...]
    model: dict[str, Any] = field(default_factory=dict)
    clean_stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": 1, "poisonguard_version": __version__,
                "method": self.config.method, "thresholds": self.thresholds,
                "target_frr": self.target_frr, "achieved_frr": self.achieved_frr,
                "n_calibration": self.n_calibration, "config": self.config.to_dict(),
                "value_range": list(self.value_range), "input_dtype": self.input_dtype,
                "sample_shape": list(self.sample_shape), "model": self.model,
                "clean_stats": self.clean_stats}


class ConsistencyFilter:
    """Screens inputs of ``classifier`` by prediction consistency under amplification."""

    def __init__(self, classifier: TorchClassifier, config: ConsistencyConfig,
                 value_range: tuple[float, float], sample_shape: tuple[int, ...],
                 input_dtype: str, calibration: ConsistencyCalibration | None = None) -> None:
        self.classifier = classifier
        self.config = config
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.sample_shape = tuple(sample_shape)
        self.input_dtype = np.dtype(input_dtype)
        self.calibration = calibration
        self._copies = (_amplified_models(classifier.model, config.psc_factor,
                                          config.psc_layers)
                        if config.method == "ibd-psc" else [])

    @property
    def name(self) -> str:
        return self.config.method

    @property
    def threshold(self) -> dict[str, float] | None:
        return None if self.calibration is None else dict(self.calibration.thresholds)

    @classmethod
    def calibrate(cls, classifier: TorchClassifier, clean_x: np.ndarray,
                  config: ConsistencyConfig | None = None) -> ConsistencyFilter:
        """Set the threshold at the conformal ``target_frr`` upper quantile of the statistic on
        ``clean_x``."""
        config = config or ConsistencyConfig()
        clean_x = validate_inputs(np.asarray(clean_x), tuple(np.shape(clean_x)[1:]),
                                  "clean calibration data")
        share = config.target_frr / (2.0 if config.tails == "two-sided" else 1.0)
        n_min = max(20, int(np.ceil(1.0 / max(share, 1e-9))))
        if len(clean_x) < n_min:
            raise DataError(f"calibration needs at least {n_min} clean inputs to set a "
                            f"{config.target_frr:.2%} false-rejection threshold; got "
                            f"{len(clean_x)}")
        prepared = classifier.input_spec.prepare(clean_x[:256]).float()
        vr = (float(prepared.min()), float(prepared.max()))
        filt = cls(classifier, config, vr, tuple(clean_x.shape[1:]), str(clean_x.dtype))
        res = filt.screen(clean_x)
        stat = res.stats[filt.name]
        if config.tails == "high":
            thr = {"high": conformal_threshold(stat, config.target_frr)}
        else:
            half = config.target_frr / 2.0
            thr = {"high": conformal_threshold(stat, half),
                   "low": -conformal_threshold(-stat, half)}
        filt.calibration = ConsistencyCalibration(
            thresholds=thr, target_frr=config.target_frr,
            achieved_frr=float((_score(stat, thr) > 0).mean()), n_calibration=int(len(stat)),
            config=config, value_range=vr, input_dtype=str(clean_x.dtype),
            sample_shape=tuple(clean_x.shape[1:]),
            model={"n_classes": classifier.n_classes}, clean_stats=_summary(stat))
        return filt

    def _logp(self, xb: torch.Tensor, module: torch.nn.Module | None = None) -> torch.Tensor:
        out = (module or self.classifier.model)(xb)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.float()
        if self.classifier.outputs == "probs":
            return out.clamp_min(1e-30).log()
        return F.log_softmax(out, dim=1)

    @torch.inference_mode()
    def statistic(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, mean log-odds of it over the amplified copies) of a prepared batch."""
        pred = self._logp(xb).argmax(1)
        if self.config.method == "scale-up":
            lo, hi = self.value_range
            big = torch.cat([(xb * f).clamp(lo, hi) for f in self.config.factors])
            lp = self._logp(big).reshape(len(self.config.factors), len(xb), -1)
        else:
            lp = torch.stack([self._logp(xb, m) for m in self._copies])
        idx = pred[None, :, None].expand(len(lp), -1, 1)
        own = lp.gather(2, idx)[..., 0]
        rest = lp.scatter(2, idx, float("-inf")).logsumexp(2)
        return pred, (own - rest).mean(0)

    def screen(self, x: np.ndarray) -> StripResult:
        x = self.coerce(validate_inputs(x, self.sample_shape))
        preds, stats = [], []
        for start in range(0, len(x), self.config.chunk):
            xb = self.classifier.input_spec.prepare(x[start:start + self.config.chunk]).float()
            pred, st = self.statistic(xb)
            preds.append(pred)
            stats.append(st)
        pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
        stat = torch.cat(stats).double().numpy() if stats else np.zeros(0)
        thr = self.threshold
        if thr is None:
            score, sus = stat, np.zeros(len(stat), dtype=bool)
        else:
            score = _score(stat, thr)
            sus = score > 0
        return StripResult(prediction=pred, entropy=np.zeros(len(stat)), suspicious=sus,
                           threshold=None if thr is None else dict(thr), score=score,
                           stats={self.name: stat})

    def coerce(self, x: np.ndarray) -> np.ndarray:
        """Inputs in the calibration's integer dtype (range checked), others as they are."""
        from poisonguard.runtime.strip import coerce_inputs

        return coerce_inputs(x, self.input_dtype)

    def describe(self) -> dict[str, Any]:
        if self.calibration is not None:
            return self.calibration.to_dict()
        return {"format": FORMAT, "method": self.name, "config": self.config.to_dict(),
                "threshold": None}

    def save(self, out_dir: str | Path) -> Path:
        if self.calibration is None:
            raise ConfigError("the filter is not calibrated")
        return atomic_write_json(Path(out_dir) / calibration_file(self.name),
                                 self.calibration.to_dict())

    @classmethod
    def load(cls, path: str | Path, classifier: TorchClassifier) -> ConsistencyFilter:
        """Restore a calibration written by :meth:`save` (its JSON file, or a folder holding
        exactly one)."""
        path = Path(path)
        meta_path = path
        if path.is_dir():
            found = [path / calibration_file(m) for m in METHODS
                     if (path / calibration_file(m)).exists()]
            if len(found) != 1:
                raise ConfigError(f"{path}: expected one of "
                                  f"{[calibration_file(m) for m in METHODS]}, found "
                                  f"{[f.name for f in found]}")
            meta_path = found[0]
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError("not a poisonguard consistency calibration")
            c = dict(meta["config"])
            config = ConsistencyConfig(**{**c, "factors": tuple(c["factors"])})
            cal = ConsistencyCalibration(
                thresholds={str(k): float(v) for k, v in dict(meta["thresholds"]).items()},
                target_frr=float(meta["target_frr"]),
                achieved_frr=float(meta["achieved_frr"]),
                n_calibration=int(meta["n_calibration"]), config=config,
                value_range=tuple(meta["value_range"]), input_dtype=str(meta["input_dtype"]),
                sample_shape=tuple(int(v) for v in meta["sample_shape"]),
                model=meta.get("model") or {}, clean_stats=meta.get("clean_stats") or {})
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                ValueError, AttributeError) as exc:
            raise ConfigError(f"{meta_path}: unreadable consistency calibration ({exc})"
                              ) from None
        n = cal.model.get("n_classes")
        if n and classifier.n_classes and int(n) != classifier.n_classes:
            raise ModelError(f"{meta_path}: calibrated for a {n}-class model, this model has "
                             f"{classifier.n_classes} classes; recalibrate")
        return cls(classifier, config, cal.value_range, cal.sample_shape, cal.input_dtype,
                   cal)
