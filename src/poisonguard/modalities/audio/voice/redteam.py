"""The red-team generator of the enrolment-poisoning attack: an attacker's clips enrolled under
a victim's account, so that a verifier that averages the enrolment lets the attacker in."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from poisonguard.errors import ConfigError, DataError


def poison_enrolment(victim: np.ndarray, attacker: np.ndarray, n_clips: int, share: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An enrolment of ``n_clips`` items: ``round(share x n_clips)`` drawn from ``attacker``,
    the rest from ``victim`` (index or id arrays). Returns (items, is_attacker), shuffled."""
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"share {share}: must lie in [0, 1)")
    n_att = int(round(share * n_clips))
    if n_clips - n_att > len(victim) or n_att > len(attacker):
        raise ConfigError(f"{n_clips} clips at share {share} need {n_clips - n_att} victim and "
                          f"{n_att} attacker clips; have {len(victim)} and {len(attacker)}")
    items = np.concatenate([rng.choice(victim, n_clips - n_att, replace=False),
                            rng.choice(attacker, n_att, replace=False)])
    is_att = np.r_[np.zeros(n_clips - n_att, bool), np.ones(n_att, bool)]
    order = rng.permutation(n_clips)
    return items[order], is_att[order]


def write_poisoned_accounts(root: str | Path, victim: str, attacker: str, share: float,
                            out: str | Path, seed: int = 0) -> list[str]:
    """Copy ``ROOT/<account>/*.wav`` to ``out``, replacing ``share`` of the victim's clips by
    the attacker's (copied as ``<victim>/enrolled_<attacker>_<name>.wav``; the attacker's own
    account keeps its other clips). Returns the planted ids (paths relative to ``out``)."""
    root, out = Path(root), Path(out)
    if out.exists():
        raise ConfigError(f"--out {out}: already exists; give a new folder")
    clips = {d.name: sorted(d.glob("*.wav")) for d in sorted(root.iterdir()) if d.is_dir()}
    for name in (victim, attacker):
        if not clips.get(name):
            raise DataError(f"{root}: no account {name!r} with wavs")
    if victim == attacker:
        raise ConfigError("victim and attacker must be different accounts")
    rng = np.random.default_rng(seed)
    n_vic = len(clips[victim])
    n_att = int(round(share * n_vic))
    if not 0 < n_att < n_vic or n_att >= len(clips[attacker]):
        raise ConfigError(f"share {share} of {n_vic} victim clips plants {n_att}; need 1 to "
                          f"{min(n_vic, len(clips[attacker])) - 1}")
    replaced = set(rng.choice(n_vic, n_att, replace=False).tolist())
    planted_src = rng.choice(len(clips[attacker]), n_att, replace=False)
    moved = {clips[attacker][i] for i in planted_src}
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    planted = []
    try:
        for name, files in clips.items():
            (tmp / name).mkdir(parents=True)
            for i, f in enumerate(files):
                if (name == victim and i in replaced) or f in moved:
                    continue
                shutil.copy2(f, tmp / name / f.name)
        for i in planted_src:
            src = clips[attacker][i]
            rel = Path(victim) / f"enrolled_{attacker}_{src.name}"
            shutil.copy2(src, tmp / rel)
            planted.append(str(rel))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(planted)
