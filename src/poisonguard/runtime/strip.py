"""STRIP (Gao et al. 2019): an input-agnostic trigger keeps a backdoored model confident when the
input is perturbed with other images, where a clean input's prediction wavers.

Each input is blended with the same held-out clean images (the *blend pool*, drawn once with a
fixed seed at calibration) in the model's input space (after :class:`InputSpec` preparation):
``n_blends`` of them per test, ``cut_blends`` (default ``2 * n_blends``) for a ``cut`` test, whose
per-blend outcome varies most (it depends on whether the rectangle hides the trigger). Blends
(``StripConfig.blend``):

- ``add``: saturating sum ``clip(x + clean)`` (STRIP's superimposition);
- ``mix``: ``alpha * x + (1 - alpha) * clean``;
- ``cut``: a random rectangle covering ``cut_area`` of the input is replaced by the clean image
  (one fixed rectangle per pool image, drawn with the seed). A small patch trigger survives
  wherever the rectangle misses it; the clean content that is left rarely carries the
  prediction;
- ``A+B`` (default ``cut+mix``): both tests, each calibrated at half the FRR budget; an input is
  flagged when either fires (a Bonferroni union: FRR <= budget).

Per test, the statistic (``StripConfig.statistic``) is the mean over the blends of the log-odds
of the input's own (unblended) prediction (``log-odds``, default: graded, a trigger keeps it
high), the mean probability of that prediction (``probability``: a soft vote, each blend counts
at most 1), or the mean Shannon entropy in bits (``entropy``, STRIP's original: a trigger keeps it
low); ``auto`` takes ``probability`` for ``cut`` and ``log-odds`` for the others. (``auto`` halved
the missed CIFAR-10 BadNets triggers on the seed-0 model, but the bounded vote saturates: on a
blended MNIST model its cut test caught 0.3% of triggered inputs, log-odds 100%.) Its
threshold is the split-conformal ``1 - target_frr / n_tests`` quantile of clean held-out inputs
(disjoint from the pool; never poisons), so the expected FRR of each test on new clean inputs is
at most its share and the union's at most ``target_frr`` (:func:`conformal_threshold`).
``StripResult.score`` is the largest margin of a test statistic over its
threshold, oriented so that higher = more suspicious and ``score > 0`` = flagged.

The calibration (thresholds, FRR, N, blend, seed, clean summaries) is saved as JSON and the blend
pool (and cut rectangles) as ``.npz`` (``allow_pickle=False``); :meth:`StripFilter.load` restores
both. Calibrations written before ``statistic`` existed load as single-test entropy filters;
those written before ``cut_blends`` existed (format 2) load with ``cut_blends = n_blends``.
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
BLENDS = ("add", "mix", "cut")
STATISTICS = ("auto", "probability", "log-odds", "entropy")
FORMAT_VERSION = 3


def blend_tests(blend: str) -> tuple[str, ...]:
    """The elementary blends of a (possibly ``+``-joined) blend name."""
    return tuple(blend.split("+"))


@dataclass(frozen=True)
class StripConfig:
    """``n_blends`` clean images blended with every input per test (``cut_blends`` for a ``cut``
    test; None: ``2 * n_blends``); ``blend`` one of
    :data:`BLENDS` or two joined with ``+`` (union of both tests); ``alpha`` the input's weight in
    a ``mix`` blend; ``cut_area`` the share of the input a ``cut`` blend replaces; ``statistic``
    one of :data:`STATISTICS`; ``target_frr`` the share of clean inputs allowed to be flagged
    (split evenly between the tests); ``chunk`` the most blended samples per forward pass (bounds
    memory; small chunks keep the activations in cache: 256 screened about 3x faster than 4096
    on the MNIST CNN)."""

    n_blends: int = 20
    blend: str = "cut+mix"
    alpha: float = 0.8
    target_frr: float = 0.01
    seed: int = 0
    chunk: int = 256
    statistic: str = "log-odds"
    cut_area: float = 0.75
    cut_blends: int | None = None

    def __post_init__(self) -> None:
        if self.n_blends < 1:
            raise ConfigError(f"n_blends must be >= 1, got {self.n_blends}")
        tests = blend_tests(self.blend)
        if any(t not in BLENDS for t in tests) or len(set(tests)) != len(tests):
            raise ConfigError(f"blend must be one of {BLENDS} or distinct ones joined with '+' "
                              f"(e.g. 'cut+mix'), got {self.blend!r}")
        if self.statistic not in STATISTICS:
            raise ConfigError(f"statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0.0 < self.cut_area < 1.0:
            raise ConfigError(f"cut_area must be in (0, 1), got {self.cut_area}")
        if not 0.0 <= self.target_frr < 1.0:
            raise ConfigError(f"target_frr must be in [0, 1), got {self.target_frr}")
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {self.chunk}")
        if self.cut_blends is None:  # resolved here, so equal settings compare equal
            object.__setattr__(self, "cut_blends", 2 * self.n_blends)
        if self.cut_blends < 1:
            raise ConfigError(f"cut_blends must be >= 1 (or None for 2 x n_blends), got "
                              f"{self.cut_blends}")

    @property
    def tests(self) -> tuple[str, ...]:
        return blend_tests(self.blend)

    def statistic_for(self, test: str) -> str:
        """The statistic a test uses (``auto`` resolved)."""
        if self.statistic != "auto":
            return self.statistic
        return "probability" if test == "cut" else "log-odds"

    def blends_for(self, test: str) -> int:
        """Blends (pool images) a test uses: the first ones of the pool."""
        if test != "cut":
            return self.n_blends
        return int(self.cut_blends)

    @property
    def pool_size(self) -> int:
        """Clean images the blend pool holds: the most any test uses."""
        return max(self.blends_for(t) for t in self.tests)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StripResult:
    """Per input: the plain prediction, the mean entropy (bits) over all blends, each test's
    statistic (``stats``, oriented: higher = more suspicious), ``score`` (the largest margin of a
    statistic over its threshold; > 0 = flagged; the largest statistic when uncalibrated) and
    the flag."""

    prediction: np.ndarray
    entropy: np.ndarray
    suspicious: np.ndarray
    threshold: dict[str, float] | None
    score: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stats: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entropy)


@dataclass
class Calibration:
    """``thresholds``: per test, on its oriented statistic (higher = more suspicious; for
    ``entropy`` that is minus the bits)."""

    thresholds: dict[str, float]
    target_frr: float
    achieved_frr: float
    n_calibration: int
    config: StripConfig
    clean_entropy: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    clean_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def threshold(self) -> dict[str, float]:
        return self.thresholds

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION,
                "poisonguard_version": __version__,
                "thresholds": self.thresholds, "statistic": self.config.statistic,
                "statistics": {t: self.config.statistic_for(t) for t in self.config.tests},
                "target_frr": self.target_frr,
                "achieved_frr": self.achieved_frr, "n_calibration": self.n_calibration,
                "n_blends": self.config.n_blends, "blend": self.config.blend,
                "cut_blends": self.config.blends_for("cut"),
                "alpha": self.config.alpha, "cut_area": self.config.cut_area,
                "seed": self.config.seed, "chunk": self.config.chunk,
                "clean_entropy": self.clean_entropy, "clean_stats": self.clean_stats,
                "model": self.model}


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (bits) of each row of a probability matrix."""
    return -(p * torch.log2(p.clamp_min(1e-12))).sum(dim=1)


def histogram(values: np.ndarray, edges: np.ndarray) -> list[int]:
    """Counts of ``values`` in ``edges`` (values outside are clipped into the end bins)."""
    v = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    return np.histogram(v, bins=edges)[0].astype(int).tolist()


def _summary(values: np.ndarray) -> dict[str, Any]:
    qs = (0.001, 0.01, 0.05, 0.5, 0.95, 0.99, 0.999)
    lo = min(float(values.min(initial=0.0)), 0.0)
    edges = np.linspace(lo, max(float(values.max(initial=0.0)), lo + 1e-6), HIST_BINS + 1)
    return {"n": int(len(values)), "mean": float(values.mean()) if len(values) else None,
            "quantiles": {str(q): float(np.quantile(values, q)) for q in qs} if len(values)
            else {}, "histogram": {"edges": np.round(edges, 5).tolist(),
                                   "counts": histogram(values, edges)}}


def cut_masks(sample_shape: tuple[int, ...], n: int, area: float, seed: int) -> np.ndarray:
    """``n`` masks shaped like one raw sample, each 1 on a random axis-aligned rectangle covering
    about ``area`` of the image (a random segment for vectors): the part a ``cut`` blend takes
    from the clean image. Images are (H, W), (H, W, C) or, when the first axis holds at most 4
    values and the last more, (C, H, W)."""
    rng = np.random.default_rng([seed, 7])
    shape = tuple(sample_shape)
    if len(shape) == 1:
        spatial, axes = (1, shape[0]), None
    elif len(shape) == 2:
        spatial, axes = shape, None
    elif len(shape) == 3 and shape[0] <= 4 < shape[2]:
        spatial, axes = shape[1:], "chw"
    else:
        spatial, axes = shape[:2], "hwc"
    h_all, w_all = spatial
    out = np.zeros((n, h_all, w_all), dtype=np.float32)
    for j in range(n):
        if h_all == 1:
            h = 1
        else:
            h = min(h_all, max(1, int(round(rng.uniform(area, 1.0) * h_all))))
        w = min(w_all, max(1, int(round(area * h_all * w_all / h))))
        r = int(rng.integers(0, h_all - h + 1))
        c = int(rng.integers(0, w_all - w + 1))
        out[j, r:r + h, c:c + w] = 1.0
    if len(shape) == 1:
        return out[:, 0, :]
    if axes == "chw":
        return np.broadcast_to(out[:, None], (n, *shape)).copy()
    if axes == "hwc":
        return np.broadcast_to(out.reshape(n, h_all, w_all, *([1] * (len(shape) - 2))),
                               (n, *shape)).copy()
    return out


def coerce_inputs(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` in an integer ``dtype`` (rounded, range checked: values outside it are a
    :class:`DataError`); unchanged when ``dtype`` is not an integer type or already matches."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu" or x.dtype == dtype:
        return x
    info = np.iinfo(dtype)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < info.min or hi > info.max:
        raise DataError(f"inputs: values span [{lo:g}, {hi:g}]; the model takes {dtype} "
                        f"values in [{info.min}, {info.max}]")
    return np.rint(x).astype(dtype) if x.dtype.kind == "f" else x.astype(dtype)


class StripFilter:
    """Screens inputs of ``classifier`` against the ``pool`` of clean images (raw samples, as the
    data holds them). ``threshold=None`` means not calibrated yet (see :meth:`calibrate`).
    ``masks`` (for ``cut`` blends) default to :func:`cut_masks` of the config's seed."""

    def __init__(self, classifier: TorchClassifier, pool: np.ndarray,
                 config: StripConfig | None = None,
                 calibration: Calibration | None = None, accelerate: bool = True,
                 masks: np.ndarray | None = None) -> None:
        self.classifier = classifier
        self.config = config or StripConfig()
        pool = np.asarray(pool)
        if len(pool) != self.config.pool_size:
            raise ConfigError(f"blend pool holds {len(pool)} images; blend "
                              f"{self.config.blend!r} with n_blends {self.config.n_blends} needs "
                              f"{self.config.pool_size}")
        self.pool = pool
        self.sample_shape = tuple(pool.shape[1:])
        self._pool_t = classifier.input_spec.prepare(pool)
        self._pool_f = self._pool_t.float()
        # the value range of model inputs, which a saturating 'add' blend stays within
        self._lo, self._hi = float(self._pool_f.min()), float(self._pool_f.max())
        self.masks: np.ndarray | None = None
        self._mask_t: torch.Tensor | None = None
        if "cut" in self.config.tests:
            n_cut = self.config.blends_for("cut")
            m = cut_masks(self.sample_shape, n_cut, self.config.cut_area, self.config.seed) \
                if masks is None else np.asarray(masks, dtype=np.float32)
            if m.shape != (n_cut, *self.sample_shape):
                raise ConfigError(f"cut masks of shape {m.shape} do not match {n_cut} cut "
                                  f"blends of samples shaped {self.sample_shape}")
            self.masks = (m > 0).astype(np.uint8)
            self._mask_t = (classifier.input_spec.prepare(self.masks.astype(np.float32)) > 0
                            ).float()
        self.calibration = calibration
        self._probs_given: bool | None = None
        self._fast = _accelerate(classifier.model, self._pool_t) if accelerate else None

    # ------------------------------------------------------------------------ construction
    @classmethod
    def calibrate(cls, classifier: TorchClassifier, clean_x: np.ndarray,
                  config: StripConfig | None = None) -> StripFilter:
        """Draw the blend pool from ``clean_x`` (seeded) and set each test's threshold at the
        conformal ``target_frr / n_tests`` upper quantile of its statistic on the remaining clean
        inputs."""
        config = config or StripConfig()
        clean_x = np.asarray(clean_x)
        n_tests = len(config.tests)
        per_test = config.target_frr / n_tests
        n_pool = config.pool_size
        n_min = n_pool + max(20, math.ceil(1.0 / max(per_test, 1e-9)))
        if config.target_frr == 0:
            n_min = n_pool + 20
        if len(clean_x) < n_min:
            raise DataError(f"calibration needs at least {n_min} clean inputs ({n_pool} "
                            f"for the blend pool, at least {n_min - n_pool} to set a "
                            f"{config.target_frr:.2%} false-rejection threshold over "
                            f"{n_tests} test(s)); got {len(clean_x)}")
        validate_inputs(clean_x, tuple(clean_x.shape[1:]), "clean calibration data")
        rng = np.random.default_rng(config.seed)
        order = rng.permutation(len(clean_x))
        pool_idx, cal_idx = order[:n_pool], np.sort(order[n_pool:])
        filt = cls(classifier, clean_x[np.sort(pool_idx)], config)
        res = filt.screen(clean_x[cal_idx])
        thresholds = {}
        for test, v in res.stats.items():
            thresholds[test] = conformal_threshold(v, per_test)
        flagged = np.zeros(len(res), dtype=bool)
        for test, v in res.stats.items():
            flagged |= v > thresholds[test]
        model_info = {"sample_shape": list(filt.sample_shape), "dtype": str(clean_x.dtype),
                      "n_classes": classifier.n_classes,
                      "input_spec": classifier.input_spec.to_dict(),
                      "outputs": "probabilities" if filt._probs_given else "logits"}
        filt.calibration = Calibration(
            thresholds=thresholds, target_frr=config.target_frr,
            achieved_frr=float(flagged.mean()), n_calibration=int(len(res)),
            config=config, clean_entropy=_summary(res.entropy), model=model_info,
            clean_stats={t: _summary(v) for t, v in res.stats.items()})
        return filt

    def save(self, out_dir: str | Path) -> Path:
        """Write ``strip.json`` and ``strip_pool.npz`` into ``out_dir``; return the JSON path."""
        if self.calibration is None:
            raise ConfigError("the filter is not calibrated; call StripFilter.calibrate first")
        out = Path(out_dir)
        arrays = {"pool": self.pool}
        if self.masks is not None:
            arrays["masks"] = self.masks
        atomic_save_npz(out / POOL_NPZ, **arrays)
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
        version = meta.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigError(f"{meta_path}: calibration format {version!r} is newer than this "
                              f"poisonguard reads ({FORMAT_VERSION}); upgrade poisonguard or "
                              "recalibrate")
        pool_path = meta_path.parent / POOL_NPZ
        try:
            with np.load(pool_path, allow_pickle=False) as arc:
                pool = arc["pool"]
                masks = arc["masks"] if "masks" in arc.files else None
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"{pool_path}: unreadable blend pool ({exc})") from None
        try:
            legacy = "thresholds" not in meta
            config = StripConfig(n_blends=int(meta["n_blends"]), alpha=float(meta["alpha"]),
                                 target_frr=float(meta["target_frr"]), seed=int(meta["seed"]),
                                 blend=str(meta.get("blend", "add")),
                                 chunk=int(meta.get("chunk", 256)),
                                 statistic=str(meta.get("statistic", "entropy")),
                                 cut_area=float(meta.get("cut_area", 0.75)),
                                 cut_blends=int(meta.get("cut_blends", meta["n_blends"])))
            # format 1 stored one entropy threshold in bits (flagged below it)
            thresholds = ({config.blend: -float(meta["threshold"])} if legacy else
                          {str(k): float(v) for k, v in dict(meta["thresholds"]).items()})
            if set(thresholds) != set(config.tests):
                raise ValueError(f"thresholds for {sorted(thresholds)}, blend {config.blend!r}")
            cal = Calibration(thresholds=thresholds,
                              target_frr=float(meta["target_frr"]),
                              achieved_frr=float(meta["achieved_frr"]),
                              n_calibration=int(meta["n_calibration"]), config=config,
                              clean_entropy=meta.get("clean_entropy") or {},
                              model=meta.get("model") or {},
                              clean_stats=meta.get("clean_stats") or {})
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ConfigError(f"{meta_path}: incomplete calibration ({exc})") from None
        n_classes = cal.model.get("n_classes")
        if n_classes and classifier.n_classes and int(n_classes) != classifier.n_classes:
            raise ModelError(f"{meta_path}: calibrated for a {n_classes}-class model, this model "
                             f"has {classifier.n_classes} classes; recalibrate")
        if "cut" in config.tests and masks is None:
            raise ConfigError(f"{pool_path}: no cut masks for blend {config.blend!r}")
        filt = cls(classifier, pool, config, cal, masks=masks)
        # a cheap consistency check: the pool must still pass through this model
        filt._logp(filt._pool_t[:1])
        return filt

    # ------------------------------------------------------------------------ screening
    @property
    def threshold(self) -> dict[str, float] | None:
        """Per test, the threshold on its oriented statistic; None when not calibrated."""
        return None if self.calibration is None else self.calibration.thresholds

    def _logp(self, xb: torch.Tensor) -> torch.Tensor:
        """Log class probabilities of a prepared batch; models that already output probabilities
        (rows non-negative, summing to 1) are used as they are, logits go through log-softmax."""
        if self._fast is not None:
            out = self._fast(xb.contiguous(memory_format=torch.channels_last)).float()
            if self.classifier.outputs == "probs":
                return out.clamp_min(1e-30).log()
        else:
            out = self.classifier._logits(xb).float()
            if self.classifier.outputs == "probs":
                return out
        if self._probs_given is None:
            self._probs_given = bool((out >= 0).all() and torch.allclose(
                out.sum(1), torch.ones(len(out)), atol=1e-3))
        if self._probs_given:
            return out.clamp_min(1e-30).log()
        return F.log_softmax(out, dim=1)

    def _blend(self, xb: torch.Tensor, test: str) -> torch.Tensor:
        """(B, ...) prepared inputs -> (B * N, ...) blends, input-major."""
        n = self.config.blends_for(test)
        x, pool = xb.float()[:, None], self._pool_f[None, :n]
        if test == "add":
            mixed = (x + pool).clamp(self._lo, self._hi)
        elif test == "mix":
            a = self.config.alpha
            mixed = a * x + (1.0 - a) * pool
        else:
            m = self._mask_t[None]
            mixed = m * pool + (1.0 - m) * x
        mixed = mixed.reshape(-1, *xb.shape[1:])
        if xb.dtype == torch.uint8:
            mixed = mixed.round().clamp(0, 255).to(torch.uint8)
        return mixed

    def _statistic(self, logp: torch.Tensor, pred: torch.Tensor, test: str) -> torch.Tensor:
        """(B, N, C) log-probabilities of ``test``'s blends -> (B,) oriented statistic."""
        statistic = self.config.statistic_for(test)
        if statistic == "entropy":
            return -entropy_bits(logp.exp().flatten(0, 1)).reshape(logp.shape[:2]).mean(1)
        idx = pred[:, None, None].expand(-1, logp.shape[1], 1)
        own = logp.gather(2, idx)[..., 0]
        if statistic == "probability":
            return own.exp().mean(1)
        rest = logp.scatter(2, idx, float("-inf")).logsumexp(2)
        return (own - rest).mean(1)

    @torch.inference_mode()
    def screen(self, x: np.ndarray) -> StripResult:
        """Prediction, statistics, score and flag for every input of ``x`` (validated
        first)."""
        x = self.coerce(validate_inputs(x, self.sample_shape))
        tests = self.config.tests
        counts = [self.config.blends_for(t) for t in tests]
        per_chunk = max(1, self.config.chunk // (sum(counts) + 1))
        preds, ents = [], []
        stats: dict[str, list[torch.Tensor]] = {t: [] for t in tests}
        for start in range(0, len(x), per_chunk):
            xb = self.classifier.input_spec.prepare(x[start:start + per_chunk])
            b = len(xb)
            lp = self._logp(torch.cat([xb, *(self._blend(xb, t) for t in tests)]))
            pred = lp[:b].argmax(1)
            preds.append(pred)
            parts = lp[b:].split([b * n for n in counts])
            ent = torch.zeros(b)
            for t, n, part in zip(tests, counts, parts):
                blends = part.reshape(b, n, -1)
                ent += entropy_bits(part.exp()).reshape(b, n).sum(1)
                stats[t].append(self._statistic(blends, pred, t))
            ents.append(ent / sum(counts))
        pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
        ent = torch.cat(ents).double().numpy() if ents else np.zeros(0)
        st = {t: torch.cat(v).double().numpy() if v else np.zeros(0) for t, v in stats.items()}
        thr = self.threshold
        if thr is None:
            score = np.max(np.stack(list(st.values())), axis=0) if len(ent) else np.zeros(0)
            sus = np.zeros(len(ent), dtype=bool)
        else:
            score = np.max(np.stack([st[t] - thr[t] for t in tests]), axis=0) if len(ent) \
                else np.zeros(0)
            sus = score > 0
        return StripResult(prediction=pred, entropy=ent, suspicious=sus,
                           threshold=None if thr is None else dict(thr), score=score, stats=st)

    def coerce(self, x: np.ndarray) -> np.ndarray:
        """Inputs in the pool's integer dtype (e.g. JSON numbers for a uint8 model), range
        checked; other inputs are returned as they are."""
        return coerce_inputs(x, self.pool.dtype)

    def entropies(self, x: np.ndarray) -> np.ndarray:
        return self.screen(x).entropy

    def describe(self) -> dict[str, Any]:
        if self.calibration is not None:
            return self.calibration.to_dict()
        return {"format": FORMAT, **self.config.to_dict(), "thresholds": None}


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


def conformal_threshold(values: np.ndarray, rate: float) -> float:
    """Threshold on ``values`` (clean calibration statistics, higher = more suspicious; flagged
    strictly above) whose expected false-rejection rate on a new clean input exchangeable with
    them is at most ``rate``: the ``ceil((n + 1) * (1 - rate))``-th smallest value (split
    conformal), or just above the largest when ``n`` is too small for that rank."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if len(v) == 0:
        raise DataError("no calibration statistics to set a threshold on")
    k = math.ceil((len(v) + 1) * (1.0 - rate) - 1e-9)
    if rate <= 0 or k > len(v):
        return float(v[-1]) + 1e-9
    return float(v[k - 1])


def score_edges(*scores: np.ndarray) -> np.ndarray:
    """Shared histogram bins for scores: the 0.5-99.5% range of all values and 0 (the
    threshold); values outside fall into the end bins."""
    v = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores] + [np.zeros(1)])
    lo, hi = np.quantile(v, 0.005), np.quantile(v, 0.995)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    return np.linspace(lo, max(hi, lo + 1e-6), HIST_BINS + 1)


def evaluate(result_clean: StripResult, result_triggered: StripResult) -> dict[str, Any]:
    """FAR (triggered inputs not flagged) and FRR (clean inputs flagged) with score histograms
    of both on shared bins (flagged: score > 0), for the report."""
    sc, st = result_clean.score, result_triggered.score
    edges = score_edges(sc, st)
    return {
        "n_clean": int(len(sc)), "n_triggered": int(len(st)),
        "frr": float(result_clean.suspicious.mean()) if len(sc) else None,
        "far": float((~result_triggered.suspicious).mean()) if len(st) else None,
        "threshold": result_clean.threshold,
        "histogram": {"edges": np.round(edges, 5).tolist(), "clean": histogram(sc, edges),
                      "triggered": histogram(st, edges), "axis": "score"},
    }
