"""Command-line front end of the provenance layer: ``pin``, ``verify`` and ``keygen``.

Wire into the main parser with ``register(subparsers)``; each subcommand sets ``handler`` (and
:data:`COMMANDS` maps names to handlers). Handlers return 0 (clean / done) or 1 (changes found,
or items skipped while pinning) and raise ``PoisonguardError`` subclasses on bad input (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from poisonguard.errors import ConfigError
from poisonguard.provenance.fetch import FetchOptions
from poisonguard.provenance.pin import DEFAULT_FILE_WORKERS, PinOptions, pin
from poisonguard.provenance.sign import generate_keypair
from poisonguard.provenance.verify import VerifyOptions, VerifyResult, verify

SHOW = 10  # items listed per category on the console


def _add_fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None,
                   help=f"file-hashing threads (default {DEFAULT_FILE_WORKERS}); with --engine "
                        "dask: LocalCluster worker processes (default 2)")
    p.add_argument("--fetch-workers", type=int, default=32,
                   help="concurrent HTTP requests for URL lists (default 32; with --engine, "
                        "per part task)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds per HTTP attempt, whole body included (default 10)")
    p.add_argument("--retries", type=int, default=2,
                   help="retries after a timeout, connection error or HTTP 408/429/5xx, with "
                        "exponential backoff (default 2)")
    p.add_argument("--max-bytes", type=int, default=256 << 20,
                   help="largest body fetched per URL (default 256 MiB)")
    p.add_argument("--no-keep-alive", action="store_true",
                   help="open a new connection for every URL (default: each fetch thread keeps "
                        "one HTTP/1.1 connection per host)")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    e = p.add_argument_group("crawl size (Parquet URL lists; see docs/scale.md)")
    e.add_argument("--engine", choices=["local", "dask"], default=None,
                   help="cut the URL rows into parts run as tasks, in this process (local) or "
                        "on Dask workers (dask); resumable: finished parts are kept in "
                        "--work-dir until the output is written")
    e.add_argument("--scheduler", default=None,
                   help="address of a running Dask scheduler (default: start a LocalCluster)")
    e.add_argument("--memory-limit", default="2GiB",
                   help="LocalCluster memory limit per worker (default 2GiB)")
    e.add_argument("--connect-timeout", type=float, default=5.0,
                   help="seconds to wait for --scheduler (default 5)")
    e.add_argument("--part-rows", type=int, default=None,
                   help="URL rows per part task (default 16384)")
    e.add_argument("--work-dir", default=None,
                   help="folder of finished parts (default OUT.work beside the output)")


def _engine(args: argparse.Namespace) -> Any:
    """The engine for ``--engine``, or None for the single-process path."""
    if args.engine is None:
        for flag, v in (("--scheduler", args.scheduler), ("--part-rows", args.part_rows),
                        ("--work-dir", args.work_dir)):
            if v is not None:
                raise ConfigError(f"{flag} needs --engine local or --engine dask")
        return None
    from poisonguard.scale.cli import open_engine

    return open_engine(args, workers=2 if args.workers is None else args.workers,
                       file=sys.stdout)


def _print_stats(stats: Any) -> None:
    d = stats.to_dict()
    print(f"  {d['engine'].get('engine')} engine ({d['engine'].get('workers')} worker(s)): "
          f"{d['parts']} parts, {d['parts_resumed']} already done (resumed), "
          f"{d['urls_fetched_this_run']} URLs fetched this run in {d['fetch_s']:.1f} s")
    for n in stats.notes:
        print(f"  note: {n}")


def _fetch_options(args: argparse.Namespace) -> FetchOptions:
    return FetchOptions(timeout=args.timeout, retries=args.retries, max_bytes=args.max_bytes,
                        workers=args.fetch_workers, keep_alive=not args.no_keep_alive)


def register(sub: Any) -> None:
    """Add ``pin``, ``verify`` and ``keygen`` to an argparse subparsers object."""
    p = sub.add_parser(
        "pin", help="pin sources into a manifest: size + SHA-256 of every file, npz sample or "
                    "URL (optionally signed)",
        description="Write a manifest of every item of SOURCE(s): a folder tree (one item per "
                    "file), an .npz (one item per sample) or a URL list (.csv/.tsv/.txt/"
                    ".parquet as img2dataset and LAION publish them; a sha256 column is used "
                    "without fetching, otherwise each URL is fetched and hashed).")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="folder, .npz or URL list")
    p.add_argument("--out", required=True, metavar="MANIFEST",
                   help="manifest to write: .parquet (or .pq), or .jsonl for small sets")
    p.add_argument("--sign-key", default=None, metavar="KEY",
                   help="Ed25519 private key (PEM, from `poisonguard keygen`): also write "
                        "MANIFEST.sig")
    p.add_argument("--npz-key", default=None,
                   help="npz array holding the samples (default x, else x_train)")
    p.add_argument("--label-key", default=None,
                   help="npz array holding the labels (default y / y_train to match)")
    p.add_argument("--url-column", default=None, help="URL list column with the URL (default "
                                                      "url/URL)")
    p.add_argument("--key-column", default=None,
                   help="URL list column with a unique key (default key or SAMPLE_ID if "
                        "present, else the URL itself; 'none' to use the URL)")
    p.add_argument("--hash-column", default=None,
                   help="URL list column with the content SHA-256 (default sha256, or hash if "
                        "it holds SHA-256 hex; 'none' to fetch every URL)")
    p.add_argument("--label-column", default=None,
                   help="URL list column recorded as the label (default label/caption/TEXT; "
                        "'none' for no label)")
    _add_fetch_args(p)
    p.set_defaults(handler=cmd_pin)

    v = sub.add_parser(
        "verify", help="check sources against a manifest: unchanged, modified, missing, new",
        description="Re-hash every pinned item (fetching URLs) and compare. Exit 0 when all "
                    "items are unchanged, 1 when any is modified, missing, new or "
                    "unverifiable (e.g. a URL that timed out), 2 when the manifest or its "
                    "signature is bad.")
    v.add_argument("manifest", metavar="MANIFEST")
    v.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="where the pinned sources are now, in pinning order (default: the "
                        "paths recorded in the manifest)")
    v.add_argument("--out", default=None, metavar="REPORT.json",
                   help="write the JSON report (lists modified, missing, new, unverifiable)")
    v.add_argument("--public-key", default=None, metavar="KEY.pub",
                   help="require a valid signature by this Ed25519 public key")
    v.add_argument("--signature", default=None, metavar="SIG",
                   help="signature file (default MANIFEST.sig)")
    _add_fetch_args(v)
    v.set_defaults(handler=cmd_verify)

    k = sub.add_parser("keygen", help="create an Ed25519 key pair for signing manifests")
    k.add_argument("--out", required=True, metavar="KEY",
                   help="private key file to write (mode 0600); the public key goes to KEY.pub")
    k.set_defaults(handler=cmd_keygen)


def cmd_pin(args: argparse.Namespace) -> int:
    """``poisonguard pin``: 0 when every item was pinned, 1 when some were skipped."""
    engine = _engine(args)
    opts = PinOptions(workers=DEFAULT_FILE_WORKERS if engine or args.workers is None
                      else args.workers, fetch=_fetch_options(args), npz_key=args.npz_key,
                      label_key=args.label_key, url_column=args.url_column,
                      key_column=args.key_column, hash_column=args.hash_column,
                      label_column=args.label_column)
    if engine is None:
        res = pin(args.sources, args.out, opts, sign_key=args.sign_key)
    else:
        from poisonguard.provenance.crawl import DEFAULT_PART_ROWS, pin_crawl

        try:
            res, stats = pin_crawl(args.sources, args.out, engine, opts, args.sign_key,
                                   args.work_dir, args.part_rows or DEFAULT_PART_ROWS)
        finally:
            engine.close()
        if not args.quiet:
            _print_stats(stats)
    print(f"pinned {res.item_count} items from {len(res.header['sources'])} source(s) into "
          f"{res.manifest} in {res.wall_s:.1f} s; manifest digest {res.digest}"
          + (f"; signed ({res.signature})" if res.signature else ""))
    if res.signature is None and Path(str(res.manifest) + ".sig").exists():
        print(f"warning: {res.manifest}.sig is from an earlier manifest and no longer matches; "
              "re-sign or delete it")
    if res.skipped:
        print(f"{len(res.skipped)} item(s) could not be read or fetched and were NOT pinned:")
        for s in res.skipped[:0 if args.quiet else SHOW]:
            print(f"  {s['key']}: {s['status']} {s.get('detail', '')}".rstrip())
        return 1
    return 0


def print_result(res: VerifyResult, quiet: bool = False) -> None:
    """Console summary of a verify result."""
    print(res.summary())
    if quiet:
        return
    sig = res.signature
    print(f"  manifest {res.manifest} (digest {res.manifest_digest[:16]}…), signature "
          + ("valid (key " + sig["public_key_sha256"][:16] + "…)" if sig.get("checked")
             else "not checked" + (" (present)" if sig.get("present") else " (none)")))
    for m in res.modified[:SHOW]:
        print(f"  modified  {m.key}: {m.reason}; sha256 {m.old_sha256} -> {m.new_sha256}")
    for key in res.missing[:SHOW]:
        print(f"  missing   {key}")
    for key in res.new[:SHOW]:
        print(f"  new       {key}")
    for u in res.unverifiable[:SHOW]:
        print(f"  unverifiable {u.key}: {u.status} {u.detail}".rstrip())
    for n in res.notes:
        print(f"  note: {n}")


def cmd_verify(args: argparse.Namespace) -> int:
    """``poisonguard verify``: 0 clean, 1 anything modified/missing/new/unverifiable."""
    from poisonguard.io import atomic_write_json

    engine = _engine(args)
    if engine is None:
        opts = VerifyOptions(workers=args.workers or DEFAULT_FILE_WORKERS,
                             fetch=_fetch_options(args), ignore=(args.out,) if args.out else ())
        res = verify(args.manifest, args.sources or None, public_key=args.public_key,
                     signature=args.signature, options=opts)
        if args.out:
            atomic_write_json(args.out, res.to_dict())
    else:
        from poisonguard.provenance.crawl import DEFAULT_PART_ROWS, verify_crawl

        try:
            res, stats = verify_crawl(args.manifest, args.sources or None, engine,
                                      args.public_key, args.signature, _fetch_options(args),
                                      args.out, args.work_dir,
                                      args.part_rows or DEFAULT_PART_ROWS)
        finally:
            engine.close()
        if not args.quiet:
            _print_stats(stats)
    print_result(res, args.quiet)
    if args.out:
        print(f"wrote {args.out}")
    return res.exit_code


def cmd_keygen(args: argparse.Namespace) -> int:
    """``poisonguard keygen``: write an Ed25519 key pair."""
    priv, pub = generate_keypair(args.out)
    print(f"wrote private key {priv} (keep it secret) and public key {pub}")
    return 0


def add_scan_arguments(p: argparse.ArgumentParser) -> None:
    """Options that let ``scan`` (or any layered command) run the provenance layer first."""
    p.add_argument("--manifest", default=None,
                   help="provenance manifest of the data (from `poisonguard pin`): verified "
                        "before anything else")
    p.add_argument("--public-key", default=None,
                   help="require the manifest to be signed by this Ed25519 public key")


def provenance_layer(args: argparse.Namespace, data_path: str | None = None
                     ) -> dict[str, Any] | None:
    """Run verify for ``args.manifest`` (if set) against ``data_path`` (default: the paths in
    the manifest); return the report's ``layers["provenance"]`` dict, or None without a
    manifest. Bad manifests/signatures raise (exit 2)."""
    if not getattr(args, "manifest", None):
        return None
    from poisonguard.provenance.manifest import ManifestReader

    single = len(ManifestReader(args.manifest).header["sources"]) == 1
    res = verify(args.manifest, [data_path] if data_path and single else None,
                 public_key=getattr(args, "public_key", None))
    if not getattr(args, "quiet", False):
        print_result(res, quiet=True)
    return res.to_report_layer()


COMMANDS = {"pin": cmd_pin, "verify": cmd_verify, "keygen": cmd_keygen}
