"""Attacked-account detection: which accounts' enrolment clips hold a second voice.

Method (no threshold is fitted to known attacks):

1. Each clip's speaker features (:mod:`.features`: MFCC and pitch statistics), standardised
   over the folder.
2. A speaker-ID model trained on the enrolment set itself: linear discriminant analysis with
   Ledoit-Wolf shrinkage and equal priors, the accounts as classes. A clip *does not belong*
   when the model gives its own account a posterior below 0.5 (another account's voice explains
   it better); posteriors are cross-validated (5 folds), so a clip never votes for itself.
   The attacker's clips are in the training set under the victim's name, so the fit is repeated
   once without the clips that did not belong in the first pass (they would pull
   the victim's centre toward the attacker).
3. An account's score is ``-log10`` of the binomial tail probability of its count of clips that
   belong elsewhere with confidence (own posterior below ``STRONG``: natural confusions between
   similar voices are mostly softer, planted clips sit near 0), against a background rate taken
   from the accounts' own distribution (the median share over accounts, at least ``MIN_RATE``):
   speech the model confuses now and then is normal, a block of clips in another voice is not.
   An account is suspicious when its score is at least ``-log10(ALPHA)`` and it holds at least
   ``MIN_SUSPECT`` such clips.

Needs at least two accounts with ``MIN_CLIPS`` clips each; accounts with fewer clips are
skipped (reported, not scored).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import binom

from poisonguard.errors import DataError
from poisonguard.modalities.audio.data import read_wavs, resample
from poisonguard.modalities.audio.voice.features import speaker_features

MIN_CLIPS = 3
MIN_ACCOUNTS = 2
MIN_RATE = 0.01
ALPHA = 0.001
MIN_SUSPECT = 2
STRONG = 0.05
MAX_SECONDS = 30.0


@dataclass(frozen=True)
class Accounts:
    """Clips grouped by account: ``waves`` (float32 mono at ``sample_rate``), ``account`` and
    ``ids`` (paths relative to the root) per clip."""

    waves: list[np.ndarray]
    account: np.ndarray
    ids: np.ndarray
    sample_rate: int
    skipped: dict[str, int] = field(default_factory=dict)
    n_resampled: int = 0
    n_downmixed: int = 0


def load_accounts(root: str | Path, min_clips: int = MIN_CLIPS) -> Accounts:
    """``ROOT/<account>/*.wav``. Stereo is averaged to mono, other rates resampled to the most
    common one, clips cut at 30 s; accounts with fewer than ``min_clips`` clips are skipped.
    Bad wavs, 0-length clips and a folder without wavs raise :class:`DataError`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected ROOT/<account>/*.wav")
    files = sorted(p for p in root.glob("*/*") if p.suffix.lower() == ".wav" and p.is_file())
    if not files:
        raise DataError(f"{root}: no .wav files in ROOT/<account>/; expected one folder per "
                        "account holding its enrolment wavs")
    counts = Counter(p.parent.name for p in files)
    skipped = {a: n for a, n in sorted(counts.items()) if n < min_clips}
    kept = [p for p in files if p.parent.name not in skipped]
    if len(counts) - len(skipped) < MIN_ACCOUNTS:
        raise DataError(f"{root}: {len(counts) - len(skipped)} account(s) with at least "
                        f"{min_clips} clips; the audit compares voices across accounts and "
                        f"needs at least {MIN_ACCOUNTS}")
    waves, rates, multi = read_wavs(kept, root)
    rate = Counter(rates).most_common(1)[0][0]
    if rate < 1000:
        raise DataError(f"{root}: sample rate {rate} Hz; expected at least 1000 Hz")
    cap = int(MAX_SECONDS * rate)
    waves = [resample(w, r, rate)[:cap] for w, r in zip(waves, rates)]
    short = [i for i, w in enumerate(waves) if len(w) < int(0.05 * rate)]
    if short:
        raise DataError(f"{root}: {len(short)} clip(s) shorter than 50 ms (first: "
                        f"{kept[short[0]].relative_to(root)}); drop them")
    return Accounts(waves=waves, account=np.array([p.parent.name for p in kept]),
                    ids=np.array([str(p.relative_to(root)) for p in kept]), sample_rate=rate,
                    skipped=skipped, n_resampled=sum(r != rate for r in rates),
                    n_downmixed=multi)


@dataclass(frozen=True)
class AccountAudit:
    """Per account: ``names``, ``n_clips``, ``n_suspect`` (clips with own posterior below
    ``STRONG``), ``score`` (-log10 p; higher = more suspicious), ``suspicious``; per clip:
    ``clip_account``, ``own_posterior``, ``assigned`` (the account the model prefers) and
    ``belongs`` (own posterior >= 0.5)."""

    names: np.ndarray
    n_clips: np.ndarray
    n_suspect: np.ndarray
    score: np.ndarray
    suspicious: np.ndarray
    background_rate: float
    clip_account: np.ndarray
    own_posterior: np.ndarray
    assigned: np.ndarray
    belongs: np.ndarray


def _fit_predict(z: np.ndarray, y: np.ndarray, n_classes: int, train: np.ndarray,
                 test: np.ndarray) -> np.ndarray:
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    present = np.unique(y[train])
    lda = LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto",
                                     priors=np.full(len(present), 1.0 / len(present)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lda.fit(z[train], y[train])
        p = lda.predict_proba(z[test])
    out = np.zeros((len(test), n_classes))
    out[:, present] = p
    return out


def _posteriors(z: np.ndarray, y: np.ndarray, n_classes: int, keep: np.ndarray,
                seed: int = 0) -> np.ndarray:
    """Cross-validated posteriors: each clip scored by a model fitted on the other folds'
    clips that are in ``keep`` (so a clip never votes for its own account)."""
    from sklearn.model_selection import StratifiedKFold

    folds = int(min(5, np.bincount(y).min()))
    post = np.zeros((len(y), n_classes))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(z, y):
        tr = tr[keep[tr]]
        if len(np.unique(y[tr])) < 2:
            tr = np.setdiff1d(np.arange(len(y)), te)
        post[te] = _fit_predict(z, y, n_classes, tr, te)
    return post


def audit_features(features: np.ndarray, account: np.ndarray, alpha: float = ALPHA,
                   min_suspect: int = MIN_SUSPECT, min_rate: float = MIN_RATE,
                   passes: int = 2, strong: float = STRONG) -> AccountAudit:
    """The audit on precomputed per-clip features (see the module docstring)."""
    names, y = np.unique(account, return_inverse=True)
    if len(names) < MIN_ACCOUNTS:
        raise DataError(f"{len(names)} account(s); the audit needs at least {MIN_ACCOUNTS}")
    mu, sd = features.mean(axis=0), features.std(axis=0)
    z = (features - mu) / np.where(sd > 1e-9, sd, 1.0)
    keep = np.ones(len(y), dtype=bool)
    for _ in range(max(passes, 1)):
        post = _posteriors(z, y, len(names), keep)
        own = post[np.arange(len(y)), y]
        keep = own >= 0.5
    n = np.bincount(y, minlength=len(names))
    k = np.bincount(y, weights=own < strong, minlength=len(names)).astype(np.int64)
    rate = float(max(np.median(k / n), min_rate))
    score = -binom.logsf(k - 1, n, rate) / np.log(10)
    score = np.where(k > 0, score, 0.0)
    suspicious = (score >= -np.log10(alpha)) & (k >= min_suspect)
    return AccountAudit(names=names, n_clips=n, n_suspect=k, score=score,
                        suspicious=suspicious, background_rate=rate, clip_account=account,
                        own_posterior=own, assigned=names[post.argmax(axis=1)], belongs=keep)


def audit_accounts(accounts: Accounts, **options: float) -> AccountAudit:
    """Features of every clip, then :func:`audit_features`."""
    return audit_features(speaker_features(accounts.waves, accounts.sample_rate),
                          accounts.account, **options)
