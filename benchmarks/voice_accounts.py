"""Attacked voice accounts (issue 18, item 6) on FSDD's 6 speakers.

For every ordered (victim, attacker) pair, enrolment poison share (20%, 40%), enrolment size
and seed: a folder of accounts (each speaker's clean enrolment of ``n`` clips from FSDD's
training split) in which ``share`` of the victim's clips are replaced by the attacker's, audited
with :func:`~poisonguard.modalities.audio.voice.accounts.audit_features` (features computed
once per clip). Normal accounts are the five other accounts of each attacked folder and the
six of a clean folder drawn alongside. A second scenario drops the attacker's own account
from the folder (the attacker is not a user).

The verifier (:class:`~poisonguard.modalities.audio.voice.verifier.CosineVerifier`) embeds clips
with an LDA trained on the 6 speakers' training clips (a well-trained speaker encoder; one
trained on the other 4 speakers only accepts about 40% of an attacker's clips against a clean
enrolment, too weak to measure the attack with), scores a trial against the mean enrolment embedding
("mean") or the best-matching enrolment clip ("max"), and accepts at cosine >= a threshold set
at 5% FRR on the victim's 50 genuine test trials against a clean enrolment. Attack success = share
of the attacker's test clips the victim's template accepts: clean enrolment, poisoned
enrolment, and after removing the suspect clips of flagged accounts.

    OMP_NUM_THREADS=1 python benchmarks/voice_accounts.py --seeds 0 1 2 --sizes 20 40

Writes benchmarks/results/voice_accounts.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard.io import atomic_write_json, atomic_write_text
from poisonguard.modalities.audio.voice.accounts import audit_features
from poisonguard.modalities.audio.voice.features import speaker_features
from poisonguard.modalities.audio.voice.redteam import poison_enrolment
from poisonguard.modalities.audio.voice.verifier import CosineVerifier

ROOT = Path(__file__).resolve().parent
FSDD = ROOT.parent.parent / "shared" / "datasets" / "fsdd" / "fsdd.npz"
RESULTS = ROOT / "results"
SHARES = (0.2, 0.4)


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], float]:
    with np.load(FSDD, allow_pickle=False) as z:
        audio, off, n = z["audio"], z["offsets"], z["lengths"]
        waves = [audio[o:o + k].astype(np.float32) / 32768.0 for o, k in zip(off, n)]
        spk, is_test = z["speaker_id"], z["is_test"].astype(bool)
        names = [str(s) for s in z["speaker_names"]]
        rate = int(z["sample_rate"])
    t0 = time.perf_counter()
    feats = speaker_features(waves, rate)
    return feats, spk, is_test, names, time.perf_counter() - t0


def verifier_for(feats: np.ndarray, spk: np.ndarray, is_test: np.ndarray, background: np.ndarray,
                 mode: str, clean_template_of: np.ndarray, genuine: np.ndarray
                 ) -> CosineVerifier:
    """An encoder (LDA) trained on the ``background`` speakers' training clips, its threshold
    at 5% FRR on the victim's genuine test trials against the victim's clean enrolment."""
    bg = np.isin(spk, background) & ~is_test
    ver = CosineVerifier(frr=0.05, mode=mode).fit(feats[bg], spk[bg])
    ver.calibrate(ver.scores(ver.template(feats[clean_template_of]), feats[genuine]))
    return ver


def run_seed(feats: np.ndarray, spk: np.ndarray, is_test: np.ndarray, n: int,
             seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    speakers = np.unique(spk)
    pool = {s: np.flatnonzero((spk == s) & ~is_test) for s in speakers}
    trials = {s: np.flatnonzero((spk == s) & is_test) for s in speakers}
    records = []
    for share, (v, a) in itertools.product(SHARES, itertools.permutations(speakers, 2)):
        items, is_att = poison_enrolment(pool[v], pool[a], n, share, rng)
        others = {s: rng.choice(np.setdiff1d(pool[s], items), n, replace=False)
                  for s in speakers if s != v}
        clean_v = rng.choice(pool[v], n, replace=False)
        background = speakers
        vers = {m: verifier_for(feats, spk, is_test, background, m, clean_v, trials[v])
                for m in ("mean", "max")}
        rec: dict[str, Any] = {"seed": seed, "n": n, "share": share, "victim": int(v),
                               "attacker": int(a), "n_planted": int(is_att.sum())}
        for scenario, keep in (("attacker_enrolled", list(others)),
                               ("attacker_not_enrolled", [s for s in others if s != a])):
            idx = np.concatenate([items] + [others[s] for s in keep])
            acc = np.concatenate([np.full(n, v)] + [np.full(n, s) for s in keep])
            audit = audit_features(feats[idx], acc)
            flagged = dict(zip(audit.names.tolist(), audit.suspicious.tolist()))
            sus = ~audit.belongs[acc == v]
            cidx = np.concatenate([clean_v] + [others[s] for s in keep])
            clean_audit = audit_features(feats[cidx], acc)
            normal = [flagged[s] for s in keep] + clean_audit.suspicious.tolist()
            kept = items[~sus] if flagged[v] else items
            r: dict[str, Any] = {
                "victim_flagged": bool(flagged[v]),
                "victim_score": float(audit.score[audit.names == v][0]),
                "normal_flagged": int(sum(normal)), "normal_total": len(normal),
                "planted_found": int((sus & is_att).sum()),
                "genuine_removed": int((sus & ~is_att).sum())}
            for m, ver in vers.items():
                for name, enrol, probe in (("clean", clean_v, a), ("poisoned", items, a),
                                           ("after", kept, a), ("genuine_after", kept, v)):
                    r[f"{m}_{name}"] = float(ver.accept(ver.template(feats[enrol]),
                                                        feats[trials[probe]]).mean())
            rec[scenario] = r
        records.append(rec)
    return records


def summarise(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# Attacked voice accounts (FSDD, 6 speakers)", "",
             "Written by `benchmarks/voice_accounts.py` (command in its docstring). Every ordered "
             "(victim, attacker) pair of FSDD's 6 speakers, seeds "
             f"{meta['seeds']}; an account holds `n` enrolment clips from FSDD's training split, "
             "`share` of the victim's replaced by the attacker's. Normal accounts: the other "
             "accounts of each attacked folder plus a clean folder drawn alongside. Verifier: "
             "an LDA speaker embedding trained on the 6 speakers' training clips (one trained on "
             "the other 4 only accepts ~40% of an attacker's clips with a clean enrolment), "
             "cosine against the mean enrolment embedding (mean) or the best "
             "enrolment clip (max), threshold at 5% FRR on the victim's genuine test trials; "
             "attack success = share of the attacker's 50 test clips accepted by the victim's "
             "enrolment. Targets (issue 18): >= 95% of attacked "
             "accounts flagged, <= 5% of normal accounts flagged, attack success after "
             "removal <= 5%.", "",
             f"Feature extraction: {meta['feature_s']:.1f} s for {meta['n_clips']} clips "
             f"(1 thread); audit time per folder: {meta['audit_ms']:.0f} ms.", "",
             "| scenario | n | share | attacked flagged | normal flagged | planted clips found "
             "| genuine clips removed | attack success, mean template: clean / poisoned / "
             "after | max template: clean / poisoned / after | genuine accept after (mean, "
             "max) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for scenario in ("attacker_enrolled", "attacker_not_enrolled"):
        for n, share in sorted({(r["n"], r["share"]) for r in records}):
            sel = [r for r in records if r["n"] == n and r["share"] == share]
            rs = [r[scenario] for r in sel]
            planted = sum(r["n_planted"] for r in sel)
            genuine = sum(r["n"] - r["n_planted"] for r in sel)
            nf = sum(x["normal_flagged"] for x in rs)
            nt = sum(x["normal_total"] for x in rs)

            def avg(key: str, rs: list[dict[str, Any]] = rs) -> str:
                return f"{np.mean([x[key] for x in rs]):.1%}"

            lines.append(
                f"| {scenario.replace('_', ' ')} | {n} | {share:.0%} | "
                f"{avg('victim_flagged')} ({len(rs)}) | {nf / nt:.1%} ({nf}/{nt}) | "
                f"{sum(x['planted_found'] for x in rs) / planted:.1%} | "
                f"{sum(x['genuine_removed'] for x in rs) / genuine:.1%} | "
                f"{avg('mean_clean')} / {avg('mean_poisoned')} / {avg('mean_after')} | "
                f"{avg('max_clean')} / {avg('max_poisoned')} / {avg('max_after')} | "
                f"{avg('mean_genuine_after')}, {avg('max_genuine_after')} |")
    worst = sorted(records, key=lambda r: -r["attacker_enrolled"]["max_after"])[:5]
    lines += ["", "Worst pairs by attack success after removal (attacker enrolled):", ""]
    lines += [f"- seed {r['seed']}, n {r['n']}, share {r['share']:.0%}, victim "
              f"{meta['speakers'][r['victim']]}, attacker {meta['speakers'][r['attacker']]}: "
              f"flagged {r['attacker_enrolled']['victim_flagged']}, "
              f"max-template attack success after {r['attacker_enrolled']['max_after']:.0%} "
              f"(poisoned {r['attacker_enrolled']['max_poisoned']:.0%})" for r in worst]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 40])
    args = ap.parse_args()
    feats, spk, is_test, names, feature_s = load()
    records = []
    t0 = time.perf_counter()
    for n, seed in itertools.product(args.sizes, args.seeds):
        records += run_seed(feats, spk, is_test, n, seed)
    n_audits = 4 * len(records)
    meta = {"seeds": args.seeds, "sizes": args.sizes, "speakers": names,
            "n_clips": len(feats), "feature_s": feature_s,
            "audit_ms": 1000 * (time.perf_counter() - t0) / max(n_audits, 1)}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "voice_accounts.json", {"meta": meta, "records": records})
    atomic_write_text(RESULTS / "voice_accounts.md", summarise(records, meta))
    print(summarise(records, meta))


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    main()
