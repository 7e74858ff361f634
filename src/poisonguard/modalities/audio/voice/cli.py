"""``poisonguard audit-accounts`` (attacked voice accounts) and ``poisonguard attack-accounts``
(the red-team generator). Wire into the main parser with ``register(subparsers)``.

Exit codes of ``audit-accounts``: 0 no account suspicious, 1 any is, 2 bad input (checked
before the clips are read)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

EXIT_CLEAN, EXIT_FOUND = 0, 1


def register(sub: Any) -> None:
    a = sub.add_parser(
        "audit-accounts", help="voice authentication: flag accounts whose enrolment clips hold "
                               "a second voice",
        description="ROOT/<account>/*.wav holds each account's enrolment clips. Writes "
                    "OUT/accounts.csv (account,suspicious,score; score = -log10 p, higher = "
                    "more suspicious), OUT/suspect_clips.csv (the clips that do not belong) "
                    "and OUT/report.json. Exit 0: none suspicious, 1: any, 2: bad input.")
    a.add_argument("root", help="folder of account folders holding wavs")
    a.add_argument("--out", required=True, help="output folder")
    a.add_argument("--alpha", type=float, default=None,
                   help="per-account significance level (default 0.001)")
    a.add_argument("--min-clips", type=int, default=None,
                   help="accounts with fewer clips are skipped (default 3)")
    a.add_argument("--quiet", action="store_true", help="print only the summary line")
    a.set_defaults(handler=cmd_audit_accounts, threads=1)

    r = sub.add_parser(
        "attack-accounts", help="red team: copy an accounts folder with an attacker's clips "
                                "enrolled under a victim",
        description="Replaces --share of the victim's enrolment clips by clips of the attacker "
                    "(moved from the attacker's folder). Writes a new folder --out.")
    r.add_argument("root", help="folder of account folders holding wavs")
    r.add_argument("--victim", required=True)
    r.add_argument("--attacker", required=True)
    r.add_argument("--share", type=float, default=0.2,
                   help="share of the victim's clips replaced (default 0.2)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True, help="new output folder")
    r.set_defaults(handler=cmd_attack_accounts, threads=1)


def cmd_audit_accounts(args: argparse.Namespace) -> int:
    from poisonguard.errors import ConfigError
    from poisonguard.io import (
        atomic_write_csv,
        atomic_write_json,
        check_writable_dir,
    )
    from poisonguard.modalities.audio.voice.accounts import (
        ALPHA,
        MIN_CLIPS,
        audit_accounts,
        load_accounts,
    )

    alpha = ALPHA if args.alpha is None else args.alpha
    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha {alpha}: must lie in (0, 1)")
    min_clips = MIN_CLIPS if args.min_clips is None else args.min_clips
    if min_clips < 2:
        raise ConfigError(f"--min-clips {min_clips}: must be at least 2")
    check_writable_dir(args.out)
    t0 = time.perf_counter()
    accounts = load_accounts(args.root, min_clips=min_clips)
    audit = audit_accounts(accounts, alpha=alpha)
    elapsed = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "accounts.csv", ["account", "suspicious", "score"],
                     [[n, int(s), f"{sc:.4f}"] for n, s, sc in
                      zip(audit.names, audit.suspicious, audit.score)])
    flagged = set(audit.names[audit.suspicious].tolist())
    rows = [[a, c, asg, f"{p:.4f}", int(a in flagged)] for a, c, asg, p, b in
            zip(audit.clip_account, accounts.ids, audit.assigned, audit.own_posterior,
                audit.belongs) if not b]
    atomic_write_csv(out / "suspect_clips.csv",
                     ["account", "clip", "closest_account", "own_posterior",
                      "account_suspicious"], rows)
    report = {
        "command": "audit-accounts", "root": str(args.root),
        "method": "MFCC+pitch speaker features; LDA speaker-ID on the enrolment set; "
                  "binomial test of clips assigned to another account",
        "sample_rate": accounts.sample_rate, "n_clips": len(accounts.ids),
        "n_resampled": accounts.n_resampled, "n_downmixed": accounts.n_downmixed,
        "alpha": alpha, "background_rate": audit.background_rate,
        "skipped_accounts": accounts.skipped,
        "accounts": [{"account": str(n), "n_clips": int(c), "n_suspect_clips": int(k),
                      "score": float(sc), "suspicious": bool(s)} for n, c, k, sc, s in
                     zip(audit.names, audit.n_clips, audit.n_suspect, audit.score,
                         audit.suspicious)],
        "elapsed_s": round(elapsed, 2)}
    atomic_write_json(out / "report.json", report)
    for name, n in accounts.skipped.items():
        print(f"warning: account {name} skipped ({n} clip(s) < --min-clips {min_clips})")
    if not args.quiet:
        for n, s, sc, k, c in zip(audit.names, audit.suspicious, audit.score, audit.n_suspect,
                                  audit.n_clips):
            print(f"  {n:<20} {'SUSPICIOUS' if s else 'ok':<11} score {sc:6.2f}  "
                  f"{k}/{c} clips confidently in another voice")
    print(f"{len(flagged)} of {len(audit.names)} accounts suspicious; wrote {out}/accounts.csv,"
          f" suspect_clips.csv, report.json ({elapsed:.1f} s)")
    return EXIT_FOUND if flagged else EXIT_CLEAN


def cmd_attack_accounts(args: argparse.Namespace) -> int:
    from poisonguard.modalities.audio.voice.redteam import write_poisoned_accounts

    planted = write_poisoned_accounts(args.root, args.victim, args.attacker, args.share,
                                      args.out, args.seed)
    print(f"wrote {args.out}: {len(planted)} clips of {args.attacker} enrolled under "
          f"{args.victim}")
    return EXIT_CLEAN
