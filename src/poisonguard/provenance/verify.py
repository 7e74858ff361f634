"""``verify``: compare a manifest with its sources now: unchanged, modified, missing, new, and
unverifiable (a URL that timed out or could not be reached is never counted as clean).

The manifest is streamed in batches; the result is returned only after the whole manifest has
been read and found intact (item count, items digest, unique keys, and the signature when a
public key is given). Memory is bounded by the batch size plus 16 bytes per item (the sorted
key fingerprints used to find new items) plus the lists of findings.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from poisonguard import SCHEMA_VERSION, __version__
from poisonguard.errors import ConfigError, DataError
from poisonguard.provenance.errors import ManifestError
from poisonguard.provenance.fetch import Fetcher, FetchOptions
from poisonguard.provenance.hashing import hash_samples, submit_files
from poisonguard.provenance.manifest import ItemBatch, ManifestReader
from poisonguard.provenance.pin import DEFAULT_FILE_WORKERS, batched
from poisonguard.provenance.sign import load_public_key, signature_path, verify_digest
from poisonguard.provenance.sources import (
    Exclusion,
    NpzSamples,
    SourceSpec,
    check_relative_key,
    iter_url_rows,
    load_npz_samples,
    parse_npz_key,
    source_kind,
    url_columns,
    walk_tree,
)
from poisonguard.provenance.util import contains, fingerprints, utc_now

MAX_LAYER_FINDINGS = 1000


@dataclass(frozen=True)
class Modified:
    """An item whose content (or label, or URL) differs from the pinned one."""

    key: str
    old_sha256: str | None
    new_sha256: str | None
    old_size: int | None = None
    new_size: int | None = None
    reason: str = "content changed"
    old_label: str | None = None
    new_label: str | None = None


@dataclass(frozen=True)
class Unverifiable:
    """An item whose current content could not be obtained: not clean, not known modified."""

    key: str
    status: str
    detail: str = ""
    url: str | None = None


@dataclass(frozen=True)
class VerifyOptions:
    """File-hashing threads, HTTP limits, and extra paths to ignore inside source folders."""

    workers: int = DEFAULT_FILE_WORKERS
    fetch: FetchOptions = field(default_factory=FetchOptions)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")


@dataclass
class VerifyResult:
    """The provenance check of one manifest against its sources."""

    manifest: str
    manifest_digest: str
    header: dict[str, Any]
    sources: list[dict[str, Any]]
    signature: dict[str, Any]
    item_count: int = 0
    unchanged_count: int = 0
    modified: list[Modified] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    unverifiable: list[Unverifiable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: str = ""
    wall_s: float = 0.0
    run: dict[str, Any] | None = None  # partitioned runs: engine, parts, parts resumed

    @property
    def changed(self) -> bool:
        """Any item modified, missing or new."""
        return bool(self.modified or self.missing or self.new)

    @property
    def clean(self) -> bool:
        """Every pinned item was checked and found unchanged, and nothing was added."""
        return not self.changed and not self.unverifiable

    @property
    def exit_code(self) -> int:
        """0 when clean, 1 when anything is modified, missing, new or unverifiable."""
        return 0 if self.clean else 1

    def counts(self) -> dict[str, int]:
        return {"items": self.item_count, "unchanged": self.unchanged_count,
                "modified": len(self.modified), "missing": len(self.missing),
                "new": len(self.new), "unverifiable": len(self.unverifiable)}

    def summary(self) -> str:
        c = self.counts()
        if self.clean:
            return f"provenance verified: all {c['items']} pinned items unchanged"
        parts = [f"{c[k]} {k}" for k in ("modified", "missing", "new", "unverifiable") if c[k]]
        return (f"provenance check failed: {', '.join(parts)} "
                f"({c['unchanged']} of {c['items']} unchanged)")

    def findings(self) -> Iterator[dict[str, Any]]:
        """One finding per modified, missing, new or unverifiable item."""
        for m in self.modified:
            yield {"kind": "modified", **asdict(m)}
        for k in self.missing:
            yield {"kind": "missing", "key": k}
        for k in self.new:
            yield {"kind": "new", "key": k}
        for u in self.unverifiable:
            yield {"kind": "unverifiable", **asdict(u)}

    def to_report_layer(self, max_findings: int = MAX_LAYER_FINDINGS) -> dict[str, Any]:
        """The report's ``layers["provenance"]``: JSON-ready, findings capped at
        ``max_findings`` (modified first; ``findings_truncated`` says when cut)."""
        findings = []
        total = 0
        for f in self.findings():
            total += 1
            if len(findings) < max_findings:
                findings.append(f)
        return {
            "name": "provenance",
            "status": "verified" if self.clean else ("changed" if self.changed
                                                      else "unverifiable"),
            "summary": self.summary(),
            "manifest": {"path": self.manifest, "digest": self.manifest_digest,
                         "created": self.header.get("created"),
                         "tool": self.header.get("tool"),
                         "item_count": self.header.get("item_count")},
            "signature": self.signature,
            "sources": self.sources,
            "counts": self.counts(),
            "findings": findings,
            "findings_total": total,
            "findings_truncated": total > len(findings),
            "notes": list(self.notes),
            "started": self.started,
            "wall_s": round(self.wall_s, 3),
            **({"run": self.run} if self.run is not None else {}),
        }

    def to_dict(self) -> dict[str, Any]:
        """The full ``verify --out`` report: lists of keys, details, and the layer."""
        from poisonguard.verdict import provenance_status, set_verdict

        layer = self.to_report_layer(max_findings=MAX_LAYER_FINDINGS)
        return set_verdict({
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "poisonguard", "version": __version__},
            "created": utc_now(),
            "command": "verify",
            "verdict": {"poisoning_found": self.changed, "provenance_verified": self.clean,
                        "poisoned_classes": [], "n_flagged": sum(self.counts()[k] for k in (
                            "modified", "missing", "new", "unverifiable")),
                        "summary": self.summary()},
            "counts": self.counts(),
            "modified": [m.key for m in self.modified],
            "missing": list(self.missing),
            "new": list(self.new),
            "unverifiable": [u.key for u in self.unverifiable],
            "modified_details": [asdict(m) for m in self.modified],
            "unverifiable_details": [asdict(u) for u in self.unverifiable],
            "layers": {"provenance": layer},
        }, {"provenance": provenance_status(layer)})


# ----------------------------------------------------------------------------- sources
@dataclass
class _Source:
    index: int
    spec: SourceSpec
    path: str | None                # where it is read now (None: URL list not available)
    npz: NpzSamples | None = None
    seen: np.ndarray | None = None  # npz: which sample indices the manifest lists
    url_cols: Any = None
    pair_fps: list[np.ndarray] = field(default_factory=list)  # urls: key+url+label prints


def _resolve_sources(header: dict[str, Any], given: list[str] | None, manifest: Path,
                     notes: list[str]) -> list[_Source]:
    specs = [SourceSpec.from_dict(d) for d in header["sources"]]
    if given and len(given) != len(specs):
        raise ConfigError(f"{manifest}: the manifest pins {len(specs)} source(s) "
                          f"({', '.join(s.name for s in specs)}) but {len(given)} were given")
    out = []
    for i, spec in enumerate(specs):
        path = given[i] if given else spec.path
        exists = Path(path).exists()
        if not exists and (spec.kind != "urls" or given):
            raise DataError(f"{path}: source {spec.name!r} ({spec.kind}) not found"
                            + ("" if given else "; pass its current location as SOURCE"))
        if exists:
            kind = source_kind(path)
            if kind != spec.kind:
                raise ConfigError(f"{path}: is a {kind} source, but the manifest pinned "
                                  f"{spec.name!r} as a {spec.kind} source")
        src = _Source(i, spec, str(Path(path).resolve()) if exists else None)
        if spec.kind == "npz":
            o = spec.options
            src.npz = load_npz_samples(path, o.get("array"), o.get("labels") or None)
            if o.get("labels") is None and src.npz.y is not None:
                src.npz.y = None  # labels were not pinned; do not compare them
            src.seen = np.zeros(len(src.npz.x), dtype=bool)
        elif spec.kind == "urls":
            if exists:
                o = spec.options
                src.url_cols = url_columns(path, o.get("url_column"),
                                           o.get("key_column") or "none", "none",
                                           o.get("label_column") or "none")
            else:
                notes.append(f"URL list of source {spec.name!r} not found at {path}: pinned "
                             "URLs were fetched and checked, but new rows were not looked for")
        out.append(src)
    return out


# ----------------------------------------------------------------------------- checking
Outcome = Callable[[], None]


class _Checker:
    def __init__(self, result: VerifyResult, sources: list[_Source], pool: Executor,
                 fetcher: Fetcher) -> None:
        self.r = result
        self.sources = sources
        self.pool = pool
        self.fetcher = fetcher

    def submit(self, batch: ItemBatch) -> Outcome:
        """Start checking a batch; return a function that waits and records the outcomes."""
        src_col = batch.source
        groups: dict[int, list[int]]
        if len(self.sources) == 1:
            groups = {0: list(range(len(batch)))}
        else:
            groups = {}
            for i, s in enumerate(src_col):
                groups.setdefault(s, []).append(i)
        waits = []
        for s, rows in groups.items():
            src = self.sources[s]
            kind = src.spec.kind
            if kind == "folder":
                waits.append(self._folder(src, batch, rows))
            elif kind == "npz":
                waits.append(self._npz(src, batch, rows))
            else:
                waits.append(self._urls(src, batch, rows))

        def finish() -> None:
            for w in waits:
                w()

        return finish

    def _relkey(self, src: _Source, key: str) -> str:
        pre = src.spec.prefix
        if not key.startswith(pre):
            raise ManifestError(f"{self.r.manifest}: item {key!r} of source {src.spec.name!r} "
                                f"lacks the source's key prefix {pre!r}")
        return key[len(pre):]

    def _folder(self, src: _Source, b: ItemBatch, rows: list[int]) -> Outcome:
        root = src.path or ""
        join = os.path.join
        paths = [join(root, check_relative_key(self._relkey(src, b.key[i]), self.r.manifest))
                 for i in rows]
        collect = submit_files(paths, self.pool)

        def finish() -> None:
            r = self.r
            unchanged = 0
            for i, fh in zip(rows, collect()):
                if fh.sha256 == b.sha256[i]:
                    unchanged += 1
                elif fh.sha256 is not None:
                    r.modified.append(Modified(b.key[i], b.sha256[i], fh.sha256, b.size[i],
                                               fh.size))
                elif fh.error == "missing":
                    r.missing.append(b.key[i])
                else:
                    r.unverifiable.append(Unverifiable(b.key[i], fh.error or "unreadable"))
            r.unchanged_count += unchanged

        return finish

    def _npz(self, src: _Source, b: ItemBatch, rows: list[int]) -> Outcome:
        smp = src.npz
        assert smp is not None and src.seen is not None
        n = len(smp.x)
        idx = []
        for i in rows:
            j = parse_npz_key(self._relkey(src, b.key[i]), smp.x_key)
            if j is None:
                raise ManifestError(f"{self.r.manifest}: item {b.key[i]!r} does not name a "
                                    f"sample of array {smp.x_key!r} (expected "
                                    f"{src.spec.prefix}{smp.x_key}[INDEX])")
            idx.append(j)

        def finish() -> None:
            r = self.r
            lo = idx[0] if idx else 0
            if idx and idx[-1] < n and idx == list(range(lo, lo + len(idx))):
                hashes = hash_samples(smp.x, lo, lo + len(idx))  # the usual, contiguous case
            else:
                hashes = [hash_samples(smp.x, j, j + 1)[0] if j < n else "" for j in idx]
            for i, j, new in zip(rows, idx, hashes):
                if j >= n:
                    r.missing.append(b.key[i])
                    continue
                src.seen[j] = True
                label = smp.label(j)
                old_label = b.label[i]
                if new != b.sha256[i]:
                    r.modified.append(Modified(b.key[i], b.sha256[i], new, b.size[i],
                                               b.size[i], "content changed", old_label, label))
                elif smp.y is not None and label != old_label:
                    r.modified.append(Modified(b.key[i], b.sha256[i], new, b.size[i],
                                               b.size[i], "label changed", old_label, label))
                else:
                    r.unchanged_count += 1

        return finish

    def _urls(self, src: _Source, b: ItemBatch, rows: list[int]) -> Outcome:
        if src.path is not None:
            src.pair_fps.append(fingerprints(
                [_pair(b.key[i], b.url[i], b.label[i]) for i in rows]))
        futures = []
        for i in rows:
            url = b.url[i]
            if not url:
                raise ManifestError(f"{self.r.manifest}: item {b.key[i]!r} of URL source "
                                    f"{src.spec.name!r} has no url")
            futures.append(self.fetcher.submit(url))

        def finish() -> None:
            r = self.r
            for i, fut in zip(rows, futures):
                res = fut.result()
                if res.ok:
                    if res.sha256 == b.sha256[i]:
                        r.unchanged_count += 1
                    else:
                        r.modified.append(Modified(b.key[i], b.sha256[i], res.sha256,
                                                   b.size[i], res.size))
                elif res.status == "gone":
                    r.missing.append(b.key[i])
                else:
                    r.unverifiable.append(Unverifiable(b.key[i], res.status, res.detail,
                                                       b.url[i]))

        return finish


def _pair(key: str, url: str | None, label: str | None) -> str:
    return f"{key}\0{url or ''}\0{'' if label is None else label}"


def _find_new(result: VerifyResult, sources: list[_Source], fps: np.ndarray,
              exclude: Exclusion) -> None:
    for src in sources:
        pre = src.spec.prefix
        if src.spec.kind == "folder":
            for chunk in batched(walk_tree(src.path or "", exclude), 8192):
                keys = [pre + rel for rel, _ in chunk]
                known = contains(fps, fingerprints(keys))
                result.new.extend(k for k, ok in zip(keys, known) if not ok)
        elif src.spec.kind == "npz":
            assert src.npz is not None and src.seen is not None
            result.new.extend(f"{pre}{src.npz.x_key}[{j}]"
                              for j in np.flatnonzero(~src.seen).tolist())
        elif src.path is not None:
            pairs = (np.sort(np.concatenate(src.pair_fps)) if src.pair_fps
                     else np.empty(0, "S16"))
            for chunk in batched(iter_url_rows(src.path, src.url_cols), 8192):
                keys = [pre + row.key for row in chunk]
                known = contains(fps, fingerprints(keys))
                same = contains(pairs, fingerprints(
                    [_pair(k, row.url, row.label) for k, row in zip(keys, chunk)]))
                for k, row, ok, ok_pair in zip(keys, chunk, known, same):
                    if not ok:
                        result.new.append(k)
                    elif not ok_pair:
                        result.modified.append(Modified(
                            k, None, None, reason=f"URL or caption changed in the list (now "
                                                  f"{row.url})", new_label=row.label))


# ----------------------------------------------------------------------------- verify
def start_result(reader: ManifestReader, manifest: Path, sources: list[str] | None,
                 public_key: str | Path | None, signature: str | Path | None, started: str
                 ) -> tuple[VerifyResult, list[_Source], Path]:
    """Check the signature (when a public key is given), resolve the sources and open the
    result: the first steps every verify takes, before any item is read."""
    sig_path = Path(signature) if signature else signature_path(manifest)
    if public_key is not None:
        sig_info = verify_digest(reader.digest, sig_path, load_public_key(public_key))
    else:
        sig_info = {"checked": False, "present": sig_path.exists(),
                    "note": "no public key given: the signature was not checked"}
    notes: list[str] = []
    srcs = _resolve_sources(reader.header, sources, manifest, notes)
    result = VerifyResult(
        manifest=str(manifest), manifest_digest=reader.digest, header=reader.header,
        sources=[dict(s.spec.to_dict(), verified_path=s.path) for s in srcs],
        signature=sig_info, notes=notes, started=started)
    return result, srcs, sig_path


def verify(manifest: str | Path, sources: list[str] | None = None,
           public_key: str | Path | None = None, signature: str | Path | None = None,
           options: VerifyOptions | None = None) -> VerifyResult:
    """Verify ``manifest`` against ``sources`` (default: the paths recorded when pinning).

    With ``public_key`` the signature (``signature`` or ``MANIFEST.sig``) must be valid, else
    :class:`~poisonguard.provenance.errors.SignatureError`. A malformed, truncated or edited
    manifest raises :class:`~poisonguard.provenance.errors.ManifestError` or
    :class:`~poisonguard.errors.IntegrityError`; no partial result is returned.
    """
    t0 = time.perf_counter()
    started = utc_now()
    options = options or VerifyOptions()
    manifest = Path(manifest)
    reader = ManifestReader(manifest)
    result, srcs, sig_path = start_result(reader, manifest, sources, public_key, signature,
                                          started)
    exclude = Exclusion.of(manifest, sig_path, *(Path(p) for p in options.ignore))
    with ThreadPoolExecutor(max_workers=options.workers,
                            thread_name_prefix="poisonguard-hash") as pool, \
            Fetcher(options.fetch) as fetcher:
        checker = _Checker(result, srcs, pool, fetcher)
        pending: deque[Outcome] = deque()
        for batch in reader.batches():  # raises at the end if the manifest is not intact
            pending.append(checker.submit(batch))
            result.item_count += len(batch)
            if len(pending) > 1:
                pending.popleft()()
        while pending:
            pending.popleft()()
    assert reader.fingerprints is not None
    _find_new(result, srcs, reader.fingerprints, exclude)
    result.wall_s = time.perf_counter() - t0
    return result
