"""STRIP (Gao et al. 2019): an input-agnostic trigger keeps a backdoored model confident when the
input is superimposed with other images, where a clean input's prediction wavers.

Each input is blended with the same ``n_blends`` held-out clean images (the *blend pool*, drawn
once with a fixed seed at calibration) in the model's input space (after :class:`InputSpec`
preparation): ``alpha * x + (1 - alpha) * clean``. The mean Shannon entropy (bits) of the
predicted class distributions over the blends is the input's entropy; inputs whose entropy falls
BELOW the threshold are flagged. The threshold is the ``target_frr`` quantile of the entropies of
clean held-out inputs (disjoint from the pool), never of poisons. ``score = -entropy`` follows the
project's convention (higher = more suspicious).

The calibration (threshold, FRR, N, alpha, seed, clean-entropy summary) is saved as JSON and the
blend pool as ``.npz`` (``allow_pickle=False``); :meth:`StripFilter.load` restores both.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from poisonguard import __version__
from poisonguard.errors import ConfigError, DataError, ModelError
from poisonguard.io import atomic_save_npz, atomic_write_json
from poisonguard.models.adapter import TorchClassifier

CALIBRATION_JSON = "strip.json"
POOL_NPZ = "strip_pool.npz"
FORMAT = "poisonguard-strip-calibration"
HIST_BINS = 40
BLENDS = ("add", "mix")


@dataclass(frozen=True)
class StripConfig:
    """``n_blends`` clean images superimposed on every input; ``alpha`` the input's weight in a
    blend; ``target_frr`` the share of clean inputs allowed to be flagged; ``chunk`` the most
    blended samples per forward pass (bounds memory; small chunks keep the activations in cache:
    256 screened about 3x faster than 4096 on the MNIST CNN)."""

    n_blends: int = 20
    blend: str = "add"
    alpha: float = 0.5
    target_frr: float = 0.01
    seed: int = 0
    chunk: int = 256

    def __post_init__(self) -> None:
        if self.n_blends < 1:
            raise ConfigError(f"n_blends must be >= 1, got {self.n_blends}")
        if self.blend not in BLENDS:
            raise ConfigError(f"blend must be one of {BLENDS}, got {self.blend!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 <= self.target_frr < 1.0:
            raise ConfigError(f"target_frr must be in [0, 1), got {self.target_frr}")
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {self.chunk}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StripResult:
    """Per input: the plain prediction, the mean blend entropy (bits) and the flag."""

    prediction: np.ndarray
    entropy: np.ndarray
    suspicious: np.ndarray
    threshold: float

    @property
    def score(self) -> np.ndarray:
        """Higher = more suspicious."""
        return -self.entropy

    def __len__(self) -> int:
        return len(self.entropy)


@dataclass
class Calibration:
    threshold: float
    target_frr: float
    achieved_frr: float
    n_calibration: int
    config: StripConfig
    clean_entropy: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": 1, "poisonguard_version": __version__,
                "threshold": self.threshold, "target_frr": self.target_frr,
                "achieved_frr": self.achieved_frr, "n_calibration": self.n_calibration,
                "n_blends": self.config.n_blends, "blend": self.config.blend,
                "alpha": self.config.alpha,
                "seed": self.config.seed, "chunk": self.config.chunk,
                "clean_entropy": self.clean_entropy, "model": self.model}


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (bits) of each row of a probability matrix."""
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1)


def histogram(values: np.ndarray, edges: np.ndarray) -> list[int]:
    """Counts of ``values`` in ``edges`` (values outside are clipped into the end bins)."""
    v = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    return np.histogram(v, bins=edges)[0].astype(int).tolist()


def _summary(entropy: np.ndarray) -> dict[str, Any]:
    qs = (0.001, 0.01, 0.05, 0.5, 0.95)
    edges = np.linspace(0.0, max(float(entropy.max(initial=0.0)), 1e-6), HIST_BINS + 1)
    return {"n": int(len(entropy)), "mean": float(entropy.mean()) if len(entropy) else None,
            "quantiles": {str(q): float(np.quantile(entropy, q)) for q in qs} if len(entropy)
            else {}, "histogram": {"edges": np.round(edges, 5).tolist(),
                                   "counts": histogram(entropy, edges)}}


class StripFilter:
    """Screens inputs of ``classifier`` against the ``pool`` of clean images (raw samples, as the
    data holds them). ``threshold=None`` means not calibrated yet (see :meth:`calibrate`)."""

    def __init__(self, classifier: TorchClassifier, pool: np.ndarray,
                 config: StripConfig | None = None,
                 calibration: Calibration | None = None, accelerate: bool = True) -> None:
        self.classifier = classifier
        self.config = config or StripConfig()
        pool = np.asarray(pool)
        if len(pool) != self.config.n_blends:
            raise ConfigError(f"blend pool holds {len(pool)} images but n_blends is "
                              f"{self.config.n_blends}")
        self.pool = pool
        self.sample_shape = tuple(pool.shape[1:])
        self._pool_t = classifier.input_spec.prepare(pool)
        self._pool_f = self._pool_t.float()
        # the value range of model inputs, which a saturating 'add' blend stays within
        self._lo, self._hi = float(self._pool_f.min()), float(self._pool_f.max())
        self.calibration = calibration
        self._probs_given: bool | None = None
        self._fast = _accelerate(classifier.model, self._pool_t) if accelerate else None

    # ------------------------------------------------------------------------ construction
    @classmethod
    def calibrate(cls, classifier: TorchClassifier, clean_x: np.ndarray,
                  config: StripConfig | None = None) -> StripFilter:
        """Draw the blend pool from ``clean_x`` (seeded) and set the threshold at the
        ``target_frr`` quantile of the entropies of the remaining clean inputs."""
        config = config or StripConfig()
        clean_x = np.asarray(clean_x)
        n_min = config.n_blends + max(20, math.ceil(1.0 / max(config.target_frr, 1e-9)))
        if config.target_frr == 0:
            n_min = config.n_blends + 20
        if len(clean_x) < n_min:
            raise DataError(f"calibration needs at least {n_min} clean inputs ({config.n_blends} "
                            f"for the blend pool, at least {n_min - config.n_blends} to set a "
                            f"{config.target_frr:.2%} false-rejection threshold); got "
                            f"{len(clean_x)}")
        validate_inputs(clean_x, tuple(clean_x.shape[1:]), "clean calibration data")
        rng = np.random.default_rng(config.seed)
        order = rng.permutation(len(clean_x))
        pool_idx, cal_idx = order[:config.n_blends], np.sort(order[config.n_blends:])
        filt = cls(classifier, clean_x[np.sort(pool_idx)], config)
        ent = filt.entropies(clean_x[cal_idx])
        # the 'lower' quantile is an observed entropy; flags are strictly below it, so at most
        # floor(frr * (n - 1)) calibration inputs are rejected
        threshold = float(np.quantile(ent, config.target_frr, method="lower")) \
            if config.target_frr > 0 else float(ent.min()) - 1e-9
        model_info = {"sample_shape": list(filt.sample_shape), "dtype": str(clean_x.dtype),
                      "n_classes": classifier.n_classes,
                      "input_spec": classifier.input_spec.to_dict(),
                      "outputs": "probabilities" if filt._probs_given else "logits"}
        filt.calibration = Calibration(
            threshold=threshold, target_frr=config.target_frr,
            achieved_frr=float((ent < threshold).mean()), n_calibration=int(len(ent)),
            config=config, clean_entropy=_summary(ent), model=model_info)
        return filt

    def save(self, out_dir: str | Path) -> Path:
        """Write ``strip.json`` and ``strip_pool.npz`` into ``out_dir``; return the JSON path."""
        if self.calibration is None:
            raise ConfigError("the filter is not calibrated; call StripFilter.calibrate first")
        out = Path(out_dir)
        atomic_save_npz(out / POOL_NPZ, pool=self.pool)
        return atomic_write_json(out / CALIBRATION_JSON, self.calibration.to_dict())

    @classmethod
    def load(cls, path: str | Path, classifier: TorchClassifier) -> StripFilter:
        """Restore a calibration saved by :meth:`save` (folder or its ``strip.json``)."""
        path = Path(path)
        meta_path = path / CALIBRATION_JSON if path.is_dir() else path
        if not meta_path.exists():
            raise ConfigError(f"{meta_path}: no STRIP calibration here (expected "
                              f"{CALIBRATION_JSON} written by 'poisonguard filter')")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{meta_path}: unreadable calibration ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ConfigError(f"{meta_path}: not a poisonguard STRIP calibration")
        pool_path = meta_path.parent / POOL_NPZ
        try:
            with np.load(pool_path, allow_pickle=False) as arc:
                pool = arc["pool"]
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"{pool_path}: unreadable blend pool ({exc})") from None
        try:
            config = StripConfig(n_blends=int(meta["n_blends"]), alpha=float(meta["alpha"]),
                                 target_frr=float(meta["target_frr"]), seed=int(meta["seed"]),
                                 blend=str(meta.get("blend", "add")),
                                 chunk=int(meta.get("chunk", 256)))
            cal = Calibration(threshold=float(meta["threshold"]),
                              target_frr=float(meta["target_frr"]),
                              achieved_frr=float(meta["achieved_frr"]),
                              n_calibration=int(meta["n_calibration"]), config=config,
                              clean_entropy=meta.get("clean_entropy") or {},
                              model=meta.get("model") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{meta_path}: incomplete calibration ({exc})") from None
        n_classes = cal.model.get("n_classes")
        if n_classes and classifier.n_classes and int(n_classes) != classifier.n_classes:
            raise ModelError(f"{meta_path}: calibrated for a {n_classes}-class model, this model "
                             f"has {classifier.n_classes} classes; recalibrate")
        filt = cls(classifier, pool, config, cal)
        # a cheap consistency check: the pool must still pass through this model
        filt._probs(filt._pool_t[:1])
        return filt

    # ------------------------------------------------------------------------ screening
    @property
    def threshold(self) -> float | None:
        return None if self.calibration is None else self.calibration.threshold

    def _probs(self, xb: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a prepared batch; models that already output probabilities
        (rows non-negative, summing to 1) are used as they are, logits go through softmax."""
        if self._fast is not None:
            out = self._fast(xb.contiguous(memory_format=torch.channels_last)).float()
            if self.classifier.outputs == "probs":
                return out.clamp_min(0.0)
        else:
            out = self.classifier._logits(xb).float()
            if self.classifier.outputs == "probs":
                return out.exp()
        if self._probs_given is None:
            self._probs_given = bool((out >= 0).all() and torch.allclose(
                out.sum(1), torch.ones(len(out)), atol=1e-3))
        if self._probs_given:
            return out.clamp_min(0.0)
        return F.softmax(out, dim=1)

    def _blend(self, xb: torch.Tensor) -> torch.Tensor:
        """(B, ...) prepared inputs -> (B * N, ...) blends, input-major."""
        if self.config.blend == "add":
            mixed = (xb.float()[:, None] + self._pool_f[None]).clamp(self._lo, self._hi)
        else:
            a = self.config.alpha
            mixed = a * xb.float()[:, None] + (1.0 - a) * self._pool_f[None]
        mixed = mixed.reshape(-1, *xb.shape[1:])
        if xb.dtype == torch.uint8:
            mixed = mixed.round().clamp(0, 255).to(torch.uint8)
        return mixed

    @torch.inference_mode()
    def screen(self, x: np.ndarray) -> StripResult:
        """Prediction, entropy and flag for every input of ``x`` (validated first)."""
        x = self.coerce(validate_inputs(x, self.sample_shape))
        n_blends = self.config.n_blends
        per_chunk = max(1, self.config.chunk // (n_blends + 1))
        preds, ents = [], []
        for start in range(0, len(x), per_chunk):
            xb = self.classifier.input_spec.prepare(x[start:start + per_chunk])
            both = torch.cat([xb, self._blend(xb)])
            p = self._probs(both)
            preds.append(p[:len(xb)].argmax(1))
            ents.append(entropy_bits(p[len(xb):]).reshape(len(xb), n_blends).mean(1))
        pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
        ent = torch.cat(ents).double().numpy() if ents else np.zeros(0)
        thr = self.threshold
        sus = ent < thr if thr is not None else np.zeros(len(ent), dtype=bool)
        return StripResult(prediction=pred, entropy=ent, suspicious=sus,
                           threshold=float("nan") if thr is None else thr)

    def coerce(self, x: np.ndarray) -> np.ndarray:
        """Inputs in the pool's integer dtype (e.g. JSON numbers for a uint8 model), range
        checked; other inputs are returned as they are."""
        if self.pool.dtype.kind not in "iu" or x.dtype == self.pool.dtype:
            return x
        info = np.iinfo(self.pool.dtype)
        lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
        if lo < info.min or hi > info.max:
            raise DataError(f"inputs: values span [{lo:g}, {hi:g}]; the model takes "
                            f"{self.pool.dtype} values in [{info.min}, {info.max}]")
        return np.rint(x).astype(self.pool.dtype) if x.dtype.kind == "f" else \
            x.astype(self.pool.dtype)

    def entropies(self, x: np.ndarray) -> np.ndarray:
        return self.screen(x).entropy

    def describe(self) -> dict[str, Any]:
        if self.calibration is not None:
            return self.calibration.to_dict()
        return {"format": FORMAT, **self.config.to_dict(), "threshold": None}


def _accelerate(model: torch.nn.Module, sample: torch.Tensor) -> Any:
    """A frozen TorchScript copy of an image model in channels-last layout (batch-norm folded
    into the convolutions: about twice as fast on CPU), or None where that does not apply or
    does not reproduce the model's outputs."""
    if sample.ndim != 4 or sample.dtype != torch.float32 or len(sample) == 0:
        return None
    x = sample[:4].contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            ref = model(sample[:4])
            if not isinstance(ref, torch.Tensor):
                return None
            if isinstance(model, torch.jit.ScriptModule):
                scripted = model
            else:
                import copy
                import warnings

                clone = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scripted = torch.jit.trace(clone, x)
            frozen = torch.jit.freeze(scripted.eval())
            out = frozen(x)
        if out.shape != ref.shape or not torch.allclose(out, ref, rtol=1e-3, atol=1e-4):
            return None
        return frozen
    except Exception:  # noqa: BLE001 - any failure means: run the model as it is
        return None


def validate_inputs(x: Any, sample_shape: tuple[int, ...], what: str = "inputs") -> np.ndarray:
    """A numeric array of samples shaped ``sample_shape`` (one sample is taken as a batch of
    one); raises :class:`DataError` naming the problem otherwise."""
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{what}: dtype {x.dtype} is not numeric; send numbers")
    if x.dtype.kind == "b":
        raise DataError(f"{what}: dtype bool is not accepted; send pixel values")
    if tuple(x.shape) == tuple(sample_shape):
        x = x[None]
    if x.ndim != len(sample_shape) + 1 or tuple(x.shape[1:]) != tuple(sample_shape):
        dims = ", ".join(map(str, sample_shape))
        raise DataError(f"{what}: shape {tuple(x.shape)}; expected one sample of shape "
                        f"{tuple(sample_shape)} or a batch (n, {dims})")
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x)
        if bad.any():
            rows = np.flatnonzero(bad.reshape(len(x), -1).any(1))
            raise DataError(f"{what}: {int(bad.sum())} NaN/inf value(s) in input(s) "
                            f"{rows[:10].tolist()}{' …' if len(rows) > 10 else ''}")
    return x


def evaluate(result_clean: StripResult, result_triggered: StripResult) -> dict[str, Any]:
    """FAR (triggered inputs not flagged) and FRR (clean inputs flagged) with entropy histograms
    of both on shared bins, for the report."""
    ec, et = result_clean.entropy, result_triggered.entropy
    top = max(float(ec.max(initial=0.0)), float(et.max(initial=0.0)), 1e-6)
    edges = np.linspace(0.0, top, HIST_BINS + 1)
    return {
        "n_clean": int(len(ec)), "n_triggered": int(len(et)),
        "frr": float(result_clean.suspicious.mean()) if len(ec) else None,
        "far": float((~result_triggered.suspicious).mean()) if len(et) else None,
        "threshold": result_clean.threshold,
        "histogram": {"edges": np.round(edges, 5).tolist(), "clean": histogram(ec, edges),
                      "triggered": histogram(et, edges)},
    }
