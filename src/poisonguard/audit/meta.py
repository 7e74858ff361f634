"""A weight-based meta-classifier: is a model backdoored, judged from its weights alone (and
optionally from its outputs on a fixed query set, as MNTD, Xu et al., IEEE S&P 2021)?

Features of one model:

- ``weights``: per-tensor statistics (moments, quantiles, kurtosis, skew, norms; for matrices
  the spread of the per-unit norms and the top singular values' share), and the output
  layer's sorted per-class weight norms and biases (class identity does not matter);
- ``projection``: a seeded random projection of every tensor's quantile sketch;
- ``queries``: the model's class probabilities on a fixed query set stored in the meta model,
  sorted per query and per class so that which class is the target does not matter.

The classifier is a standardised L2 logistic regression trained on a zoo of clean and
backdoored models of one architecture. Everything is saved as JSON plus a safetensors file of
queries (never a pickle): ``META/meta.json``, ``META/queries.safetensors`` and the zoo's
description ``META/zoo.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poisonguard.errors import ConfigError

FORMAT = "poisonguard-meta"
FORMAT_VERSION = 1
ZOO_FORMAT = "poisonguard-zoo"
META_JSON = "meta.json"
QUERIES = "queries.safetensors"
ZOO_JSON = "zoo.json"
FAMILIES = ("weights", "projection", "queries")
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
SKETCH = 32          # points of each tensor's quantile sketch (the projection's input)
BUILTIN_DIR = Path(__file__).resolve().parent / "meta_models"
BUILTIN = {"digits-cnn": BUILTIN_DIR / "digits-cnn"}


# ----------------------------------------------------------------------------- features
def signature(module: torch.nn.Module) -> list[list[Any]]:
    """The architecture as ``[name, shape]`` of every state-dict tensor (counters excluded)."""
    return [[k, list(v.shape)] for k, v in module.state_dict().items()
            if not k.endswith("num_batches_tracked")]


def _tensors(module: torch.nn.Module) -> list[tuple[str, np.ndarray]]:
    """The learned float tensors (the input-normalisation buffers, data statistics, left out)."""
    return [(k, v.detach().float().cpu().numpy()) for k, v in module.state_dict().items()
            if v.is_floating_point() and not k.startswith("normalize.")]


def _moments(w: np.ndarray) -> list[float]:
    w = w.ravel().astype(np.float64)
    mu, sd = float(w.mean()), float(w.std())
    z = (w - mu) / sd if sd > 0 else np.zeros_like(w)
    q = np.quantile(w, QUANTILES)
    return [mu, sd, float(np.abs(w).mean()), float(np.abs(w).max()),
            float(np.sqrt(np.mean(w ** 2))), float((z ** 3).mean()), float((z ** 4).mean()),
            *map(float, q)]


MOMENTS = ("mean", "std", "abs_mean", "abs_max", "rms", "skew", "kurtosis",
           *(f"q{int(100 * q):02d}" for q in QUANTILES))
MATRIX = ("row_norm_max_ratio", "row_norm_cv", "row_norm_max_z", "sv1_share", "sv2_share",
          "sv3_share")


def _matrix(w: np.ndarray) -> list[float]:
    m = w.reshape(w.shape[0], -1).astype(np.float64)
    r = np.linalg.norm(m, axis=1)
    med, sd = float(np.median(r)), float(r.std())
    sv = np.linalg.svd(m, compute_uv=False)
    share = sv / max(float(sv.sum()), 1e-12)
    share = np.pad(share[:3], (0, max(0, 3 - len(share))))
    return [float(r.max() / max(med, 1e-12)), sd / max(float(r.mean()), 1e-12),
            float((r.max() - r.mean()) / max(sd, 1e-12)), *map(float, share)]


def _sorted_z(v: np.ndarray) -> np.ndarray:
    sd = float(v.std())
    return np.sort((v - v.mean()) / sd if sd > 0 else np.zeros_like(v))[::-1]


def weight_features(module: torch.nn.Module) -> tuple[list[str], np.ndarray]:
    """Per-tensor statistics and the output layer's sorted per-class norms and biases."""
    names: list[str] = []
    vals: list[float] = []
    tensors = _tensors(module)
    for k, w in tensors:
        names += [f"{k}:{s}" for s in MOMENTS]
        vals += _moments(w)
        if w.ndim >= 2:
            names += [f"{k}:{s}" for s in MATRIX]
            vals += _matrix(w)
    mats = [(k, w) for k, w in tensors if w.ndim == 2]
    if mats:
        k, head = mats[-1]
        norms = _sorted_z(np.linalg.norm(head, axis=1))
        names += [f"head:norm_z{i}" for i in range(len(norms))]
        vals += list(map(float, norms))
        bias = dict(tensors).get(k[: -len("weight")] + "bias") if k.endswith("weight") else None
        if bias is not None and bias.shape == (head.shape[0],):
            bz = _sorted_z(bias)
            names += [f"head:bias_z{i}" for i in range(len(bz))]
            vals += list(map(float, bz))
    return names, np.asarray(vals, dtype=np.float64)


def projection_features(module: torch.nn.Module, dim: int, seed: int
                        ) -> tuple[list[str], np.ndarray]:
    """A seeded Gaussian projection (``dim`` outputs) of the tensors' quantile sketches."""
    grid = np.linspace(0.0, 1.0, SKETCH)
    sketch = np.concatenate([np.quantile(w.ravel().astype(np.float64), grid)
                             for _, w in _tensors(module)])
    proj = np.random.default_rng(seed).standard_normal((dim, len(sketch))) / np.sqrt(len(sketch))
    return [f"proj{i}" for i in range(dim)], proj @ sketch


def query_features(classifier: Any, queries: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Statistics of the class probabilities on ``queries``, invariant to class identity:
    the sorted mean probability per class, the sorted share of queries each class wins, the
    mean sorted probability vector, and the mean and spread of the top probability and of the
    entropy."""
    p = np.asarray(classifier.predict_proba(queries), dtype=np.float64)
    k = p.shape[1]
    mean_sorted = np.sort(p.mean(0))[::-1]
    wins = np.sort(np.bincount(p.argmax(1), minlength=k) / len(p))[::-1]
    per_query = np.sort(p, axis=1)[:, ::-1].mean(0)
    ent = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    top = p.max(1)
    names = ([f"q:class_mean{i}" for i in range(k)] + [f"q:class_wins{i}" for i in range(k)]
             + [f"q:sorted_prob{i}" for i in range(k)]
             + ["q:top_mean", "q:top_std", "q:entropy_mean", "q:entropy_std"])
    vals = np.concatenate([mean_sorted, wins, per_query,
                           [top.mean(), top.std(), ent.mean(), ent.std()]])
    return names, vals


@dataclass(frozen=True)
class FeatureConfig:
    """Which feature families to compute, and their settings."""

    families: tuple[str, ...] = FAMILIES
    projection_dim: int = 16
    projection_seed: int = 0

    def __post_init__(self) -> None:
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ConfigError(f"feature families must be some of {FAMILIES}, got "
                              f"{list(self.families)}")


def model_features(classifier: Any, cfg: FeatureConfig, queries: np.ndarray | None
                   ) -> tuple[list[str], np.ndarray]:
    """The feature vector of one loaded model (a ``TorchClassifier``)."""
    names: list[str] = []
    parts: list[np.ndarray] = []
    module = classifier.model
    with torch.no_grad():
        if "weights" in cfg.families:
            n, v = weight_features(module)
            names += n
            parts.append(v)
        if "projection" in cfg.families:
            n, v = projection_features(module, cfg.projection_dim, cfg.projection_seed)
            names += n
            parts.append(v)
        if "queries" in cfg.families and queries is not None:
            n, v = query_features(classifier, queries)
            names += n
            parts.append(v)
    vec = np.concatenate(parts) if parts else np.zeros(0)
    return names, np.nan_to_num(vec, nan=0.0, posinf=1e6, neginf=-1e6)


# ----------------------------------------------------------------------------- queries
def make_queries(inputs: dict[str, Any], n: int, seed: int) -> np.ndarray:
    """A fixed query set in the models' input space (``model.json``'s ``inputs``): a third
    uniform noise, a third sparse bright pixels on the low background, a third random
    squares (2-4 px) of random values, which is where patch triggers live."""
    shape = tuple(int(s) for s in inputs["sample_shape"])
    lo, hi = (float(v) for v in inputs["value_range"])
    dtype = np.dtype(inputs.get("dtype") or "float32")
    rng = np.random.default_rng(seed)
    q = np.full((n, *shape), lo, dtype=np.float64)
    third = n // 3
    q[:third] = rng.uniform(lo, hi, (third, *shape))
    sparse = rng.random((third, *shape)) < 0.1
    q[third:2 * third][sparse] = hi
    h, w = (shape[0], shape[1]) if len(shape) >= 2 else (1, shape[0])
    for i in range(2 * third, n):
        for _ in range(int(rng.integers(1, 4))):
            s = int(rng.integers(2, 5))
            r, c = int(rng.integers(0, max(1, h - s + 1))), int(rng.integers(0, max(1, w - s + 1)))
            if len(shape) >= 2:
                q[i, r:r + s, c:c + s] = rng.uniform(lo, hi)
            else:
                q[i, c:c + s] = rng.uniform(lo, hi)
    if np.issubdtype(dtype, np.integer):
        q = np.clip(np.rint(q), lo, hi)
    return q.astype(dtype)


# ----------------------------------------------------------------------------- the zoo
@dataclass
class Zoo:
    """A zoo read from ``ZOO_DIR/zoo.json``: its entries and their loaded models."""

    root: Path
    entries: list[dict[str, Any]]
    models: list[Any] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([bool(e["backdoored"]) for e in self.entries])


def read_zoo(zoo_dir: str | Path) -> Zoo:
    """Read and check the zoo (labels of both kinds, every model loadable, one architecture);
    raises :class:`ConfigError` on the first problem, before any feature is computed."""
    from poisonguard.errors import PoisonguardError
    from poisonguard.models.io import load_model

    root = Path(zoo_dir)
    index = root / ZOO_JSON
    if not index.is_file():
        raise ConfigError(f"{root}: no {ZOO_JSON} (a zoo folder lists its models there, see "
                          "docs/meta.md)")
    try:
        desc = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{index}: unreadable zoo description ({exc})") from None
    entries = desc.get("models") if isinstance(desc, dict) else None
    if desc.get("format") != ZOO_FORMAT or not isinstance(entries, list) or not entries:
        raise ConfigError(f"{index}: not a {ZOO_FORMAT} description with a non-empty "
                          "'models' list")
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("folder"), str) \
                or not isinstance(e.get("backdoored"), bool):
            raise ConfigError(f"{index}: every model needs 'folder' (str) and 'backdoored' "
                              f"(true/false), got {e!r}")
        if Path(e["folder"]).is_absolute() or ".." in Path(e["folder"]).parts:
            raise ConfigError(f"{index}: model folder {e['folder']!r} must lie inside the zoo")
    labels = [e["backdoored"] for e in entries]
    n_bd, n_clean = sum(labels), len(labels) - sum(labels)
    if n_bd < 2 or n_clean < 2:
        raise ConfigError(f"{index}: {n_clean} clean and {n_bd} backdoored models; a meta "
                          "classifier needs at least 2 of each")
    zoo = Zoo(root=root, entries=entries)
    first = None
    for e in entries:
        try:
            clf = load_model(root / e["folder"])
        except PoisonguardError as exc:
            raise ConfigError(f"zoo model {e['folder']}: {str(exc).splitlines()[0]}") from None
        sig = signature(clf.model)
        if first is None:
            first = (e["folder"], sig)
        elif sig != first[1]:
            raise ConfigError(f"zoo model {e['folder']} has another architecture than "
                              f"{first[0]}; a meta model covers one architecture")
        zoo.models.append(clf)
    return zoo


# ----------------------------------------------------------------------------- the meta model
@dataclass
class MetaModel:
    """A trained meta-classifier: scaler, logistic weights, threshold, queries, provenance."""

    feature_names: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    threshold: float
    config: FeatureConfig
    architecture: list[list[Any]]
    queries: np.ndarray | None = None
    inputs: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    zoo: dict[str, Any] = field(default_factory=dict)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """P(backdoored) for feature rows ``feats`` (N, F)."""
        z = (np.atleast_2d(feats) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ self.coef + self.intercept)))

    def check_architecture(self, classifier: Any, what: str = "the model") -> None:
        sig = signature(classifier.model)
        if sig != self.architecture:
            ours = {k: s for k, s in self.architecture}
            diff = next((f"{k} {s} (meta model: {ours.get(k)})" for k, s in sig
                         if ours.get(k) != s), f"{len(sig)} tensors vs {len(ours)}")
            raise ConfigError(f"{what} has another architecture than the meta model was "
                              f"trained on: {diff}")

    def predict(self, classifier: Any) -> dict[str, Any]:
        """Check the architecture, compute the features, return the prediction record."""
        self.check_architecture(classifier)
        if self.queries is not None:
            from poisonguard.models.io import check_inputs

            check_inputs(getattr(classifier, "expected_inputs", None), self.queries,
                         "the meta model's queries")
        names, feats = model_features(classifier, self.config, self.queries)
        if names != self.feature_names:
            raise ConfigError("the model's features do not match the meta model's")
        p = float(self.score(feats)[0])
        return {"p_backdoored": round(p, 6), "threshold": round(self.threshold, 6),
                "backdoored": p > self.threshold}


def _fit_logistic(x: np.ndarray, y: np.ndarray, c: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-12] = 1.0
    lr = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
    lr.fit((x - mean) / scale, y.astype(int))
    return mean, scale, lr.coef_[0].astype(np.float64), float(lr.intercept_[0])


def fit_meta(x: np.ndarray, y: np.ndarray, names: list[str], cfg: FeatureConfig,
             architecture: list[list[Any]], queries: np.ndarray | None = None,
             inputs: dict[str, Any] | None = None, c: float = 0.1, fpr: float = 0.05,
             seed: int = 0) -> MetaModel:
    """Fit the scaler and logistic regression on feature rows ``x`` with labels ``y``; the
    threshold is the ``1 - fpr`` quantile of the clean models' out-of-fold scores (5-fold
    at most), so it is set from clean models only and not from the training fit."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y, bool)
    folds = int(min(5, y.sum(), (~y).sum()))
    oof = np.zeros(len(y))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        m, s, w, b = _fit_logistic(x[tr], y[tr], c)
        oof[te] = 1.0 / (1.0 + np.exp(-(((x[te] - m) / s) @ w + b)))
    threshold = float(np.quantile(oof[~y], 1.0 - fpr))
    mean, scale, coef, intercept = _fit_logistic(x, y, c)
    from poisonguard.metrics import auroc

    info = {"n_models": int(len(y)), "n_backdoored": int(y.sum()), "C": c, "fpr_target": fpr,
            "cv_folds": folds, "cv_auroc": round(float(auroc(oof, y)), 4),
            "cv_clean_flagged": int((oof[~y] > threshold).sum()),
            "cv_backdoored_flagged": int((oof[y] > threshold).sum())}
    return MetaModel(feature_names=names, mean=mean, scale=scale, coef=coef,
                     intercept=intercept, threshold=threshold, config=cfg,
                     architecture=architecture, queries=queries, inputs=inputs, info=info)


def zoo_features(zoo: Zoo, cfg: FeatureConfig, queries: np.ndarray | None
                 ) -> tuple[list[str], np.ndarray]:
    rows = []
    names: list[str] = []
    for clf in zoo.models:
        names, v = model_features(clf, cfg, queries)
        rows.append(v)
    return names, np.vstack(rows)


def train_meta(zoo_dir: str | Path, cfg: FeatureConfig | None = None, n_queries: int = 96,
               query_seed: int = 0, c: float = 0.1, fpr: float = 0.05,
               queries: np.ndarray | None = None) -> MetaModel:
    """Read the zoo, compute every model's features, fit the meta-classifier."""
    cfg = cfg or FeatureConfig()
    zoo = read_zoo(zoo_dir)
    inputs = getattr(zoo.models[0], "expected_inputs", None)
    if "queries" in cfg.families and queries is None:
        if not inputs:
            raise ConfigError("query features need the zoo's models to record their inputs "
                              "(model.json 'inputs'); give --queries or --features without "
                              "queries")
        queries = make_queries(inputs, n_queries, query_seed)
    if "queries" not in cfg.families:
        queries = None
    names, x = zoo_features(zoo, cfg, queries)
    meta = fit_meta(x, zoo.labels, names, cfg, signature(zoo.models[0].model), queries,
                    inputs, c=c, fpr=fpr)
    meta.zoo = {"format": ZOO_FORMAT, "source": str(Path(zoo_dir)), "models": zoo.entries}
    return meta


def save_meta(out_dir: str | Path, meta: MetaModel) -> Path:
    """Write ``meta.json``, ``queries.safetensors`` (when there are queries) and ``zoo.json``."""
    from safetensors.numpy import save

    from poisonguard import __version__
    from poisonguard.io import atomic_write_bytes, atomic_write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if meta.queries is not None:
        atomic_write_bytes(out / QUERIES, save({"queries": np.ascontiguousarray(meta.queries)}))
    atomic_write_json(out / ZOO_JSON, meta.zoo)
    atomic_write_json(out / META_JSON, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "poisonguard_version": __version__,
        "features": {"families": list(meta.config.families),
                     "projection_dim": meta.config.projection_dim,
                     "projection_seed": meta.config.projection_seed,
                     "queries_file": QUERIES if meta.queries is not None else None},
        "architecture": meta.architecture, "inputs": meta.inputs,
        "classifier": {"kind": "logistic-regression", "feature_names": meta.feature_names,
                       "mean": meta.mean.tolist(), "scale": meta.scale.tolist(),
                       "coef": meta.coef.tolist(), "intercept": meta.intercept},
        "threshold": meta.threshold, "training": meta.info, "zoo_file": ZOO_JSON,
    })
    return out


def resolve_meta_path(spec: str | Path) -> Path:
    """A meta model folder, or the name of a built-in one (``digits-cnn``)."""
    if str(spec) in BUILTIN:
        return BUILTIN[str(spec)]
    return Path(spec)


def load_meta(spec: str | Path) -> MetaModel:
    """Load a meta model folder (or built-in name); a newer format is refused."""
    from safetensors.numpy import load_file

    path = resolve_meta_path(spec)
    meta_json = path / META_JSON if path.is_dir() else path
    if not meta_json.is_file():
        raise ConfigError(f"{spec}: no meta model there (a folder with {META_JSON}; built-in: "
                          f"{', '.join(BUILTIN)})")
    try:
        d = json.loads(meta_json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{meta_json}: unreadable meta model ({exc})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ConfigError(f"{meta_json}: not a {FORMAT} file")
    version = d.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ConfigError(f"{meta_json}: meta model format version {version} is newer than "
                          f"this poisonguard reads ({FORMAT_VERSION}); upgrade poisonguard")
    try:
        f, c = d["features"], d["classifier"]
        cfg = FeatureConfig(tuple(f["families"]), int(f["projection_dim"]),
                            int(f["projection_seed"]))
        queries = None
        if f.get("queries_file"):
            qname = str(f["queries_file"])
            if Path(qname).name != qname:
                raise ConfigError(f"{meta_json}: 'queries_file' must name a file beside it")
            queries = load_file(str(meta_json.parent / qname))["queries"]
        meta = MetaModel(feature_names=list(c["feature_names"]),
                         mean=np.asarray(c["mean"], np.float64),
                         scale=np.asarray(c["scale"], np.float64),
                         coef=np.asarray(c["coef"], np.float64),
                         intercept=float(c["intercept"]), threshold=float(d["threshold"]),
                         config=cfg, architecture=d["architecture"], queries=queries,
                         inputs=d.get("inputs"), info=d.get("training") or {})
    except (KeyError, TypeError, ValueError, OSError) as exc:
        raise ConfigError(f"{meta_json}: malformed meta model ({type(exc).__name__}: "
                          f"{exc})") from None
    n = len(meta.feature_names)
    if not (meta.mean.shape == meta.scale.shape == meta.coef.shape == (n,)):
        raise ConfigError(f"{meta_json}: classifier arrays do not match its {n} features")
    zoo_file = meta_json.parent / str(d.get("zoo_file") or ZOO_JSON)
    if zoo_file.is_file():
        try:
            meta.zoo = json.loads(zoo_file.read_text())
        except json.JSONDecodeError:
            meta.zoo = {}
    return meta


def zoo_summary(zoo: dict[str, Any]) -> dict[str, Any]:
    """Counts of a zoo description: models, clean, backdoored per attack."""
    models = zoo.get("models") or []
    attacks: dict[str, int] = {}
    for e in models:
        if e.get("backdoored"):
            a = str(e.get("attack") or "unknown")
            attacks[a] = attacks.get(a, 0) + 1
    return {"n_models": len(models), "n_clean": sum(not e.get("backdoored") for e in models),
            "backdoored_per_attack": attacks}
