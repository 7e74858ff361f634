"""Provenance layer: pin + verify of folders and .npz, manifests, signatures, bad input."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonguard.errors import ConfigError, DataError, IntegrityError, PoisonguardError
from poisonguard.provenance import ManifestError, SignatureError, read_manifest, verify
from poisonguard.provenance.cli import register
from poisonguard.provenance.manifest import (
    PARQUET_META_KEY,
    ItemBatch,
    canonical_lines,
    manifest_digest,
)
from poisonguard.provenance.sources import walk_tree
from poisonguard.report.schema import validate


def run(*argv: str | Path) -> int:
    """Parse with a fresh parser that only knows the provenance commands; call the handler."""
    parser = argparse.ArgumentParser(prog="poisonguard")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.handler(args)


def make_tree(root: Path) -> Path:
    for rel, text in {"cat/001.png": "c1", "cat/002.png": "c2", "dog/001.png": "d1",
                      "dog/sub/deep.bin": "x" * 5000, ".hidden": "h", "a-b": "ab",
                      "a/z": "az"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data")


def sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


# ----------------------------------------------------------------------------- folders
def test_walk_is_sorted_and_complete(tree: Path) -> None:
    keys = [k for k, _ in walk_tree(tree)]
    assert keys == sorted(keys)
    assert set(keys) == {"cat/001.png", "cat/002.png", "dog/001.png", "dog/sub/deep.bin",
                         ".hidden", "a-b", "a/z"}


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_folder_pin_verify_unchanged(tree: Path, tmp_path: Path, suffix: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / f"m{suffix}"
    assert run("pin", tree, "--out", manifest) == 0
    header, items = read_manifest(manifest)
    assert header["item_count"] == 7 and header["tool"]["name"] == "poisonguard"
    assert header["sources"][0]["kind"] == "folder"
    by_key = {it["key"]: it for it in items}
    assert by_key["dog/sub/deep.bin"]["size"] == 5000
    assert by_key["cat/001.png"]["sha256"] == sha("c1")
    assert by_key["cat/001.png"]["pinned_at"].endswith("Z")
    report = tmp_path / "report.json"
    assert run("verify", manifest, tree, "--out", report) == 0
    rep = json.loads(report.read_text())
    assert validate(rep) == [] and rep["verdict"]["overall"] == "clean"
    assert rep["modified"] == rep["missing"] == rep["new"] == []
    assert rep["counts"]["unchanged"] == 7
    assert rep["layers"]["provenance"]["status"] == "verified"
    assert "all 7 pinned items unchanged" in capsys.readouterr().out


def test_folder_modified_missing_new(tree: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    assert run("pin", tree, "--out", manifest) == 0
    (tree / "cat/001.png").write_text("poisoned")
    (tree / "dog/001.png").unlink()
    (tree / "dog/002.png").write_text("new one")
    report = tmp_path / "r.json"
    assert run("verify", manifest, "--out", report) == 1  # source path from the header
    rep = json.loads(report.read_text())
    assert rep["modified"] == ["cat/001.png"]
    assert rep["missing"] == ["dog/001.png"]
    assert rep["new"] == ["dog/002.png"]
    layer = rep["layers"]["provenance"]
    finding = next(f for f in layer["findings"] if f["kind"] == "modified")
    assert finding["old_sha256"] == sha("c1") and finding["new_sha256"] == sha("poisoned")
    assert layer["counts"] == {"items": 7, "unchanged": 5, "modified": 1, "missing": 1,
                               "new": 1, "unverifiable": 0}
    assert rep["verdict"]["poisoning_found"] is True


def test_manifest_inside_tree_is_not_an_item(tree: Path) -> None:
    manifest = tree / "MANIFEST.parquet"
    assert run("pin", tree, "--out", manifest) == 0
    _, items = read_manifest(manifest)
    assert "MANIFEST.parquet" not in {it["key"] for it in items}
    assert run("verify", manifest, "--out", tree / "report.json") == 0


def test_multiple_sources_get_prefixes(tmp_path: Path) -> None:
    a = make_tree(tmp_path / "train")
    b = make_tree(tmp_path / "test")
    np.savez(tmp_path / "extra.npz", x=np.arange(6).reshape(3, 2))
    manifest = tmp_path / "m.jsonl"
    assert run("pin", a, b, tmp_path / "extra.npz", "--out", manifest) == 0
    _, items = read_manifest(manifest)
    keys = {it["key"] for it in items}
    assert "train/cat/001.png" in keys and "test/cat/001.png" in keys
    assert "extra.npz#x[2]" in keys and len(keys) == 17
    (b / "a-b").write_text("changed")
    res = verify(manifest)
    assert [m.key for m in res.modified] == ["test/a-b"]
    with pytest.raises(ConfigError, match="3 source"):
        verify(manifest, [str(a)])


# ----------------------------------------------------------------------------- npz
def test_npz_one_hash_per_sample_and_changes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (20, 4, 4), dtype=np.uint8)
    y = np.arange(20) % 3
    path = tmp_path / "train.npz"
    np.savez(path, x=x, y=y)
    manifest = tmp_path / "m.parquet"
    assert run("pin", path, "--out", manifest) == 0
    header, items = read_manifest(manifest)
    assert len(items) == 20 and len({it["sha256"] for it in items}) == 20
    assert items[3]["key"] == "train.npz#x[3]" and items[3]["label"] == "0"
    assert items[3]["size"] == 16
    assert header["sources"][0]["options"]["array"] == "x"
    assert run("verify", manifest, path) == 0

    x2, y2 = x.copy(), y.copy()
    x2[7, 0, 0] ^= 1       # one pixel of one sample
    y2[11] = (y[11] + 1) % 3   # one label flip
    np.savez(path, x=np.concatenate([x2, x2[:1]]), y=np.concatenate([y2, y2[:1]]))
    res = verify(manifest, [str(path)])
    assert [(m.key, m.reason) for m in res.modified] == [
        ("train.npz#x[7]", "content changed"), ("train.npz#x[11]", "label changed")]
    assert (res.modified[1].old_label, res.modified[1].new_label) == ("2", "0")
    assert res.modified[0].old_sha256 != res.modified[0].new_sha256
    assert res.new == ["train.npz#x[20]"] and res.missing == []
    assert res.unchanged_count == 18 and res.exit_code == 1

    np.savez(path, x=x[:19], y=y[:19])
    res = verify(manifest, [str(path)])
    assert res.missing == ["train.npz#x[19]"] and not res.modified


def test_npz_hash_includes_dtype(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 2), np.int32))
    manifest = tmp_path / "m.jsonl"
    pin_rc = run("pin", path, "--out", manifest)
    assert pin_rc == 0
    np.savez(path, x=np.zeros((3, 2), np.float32))  # same bytes, other dtype
    assert len(verify(manifest).modified) == 3


# ----------------------------------------------------------------------------- manifests
def test_parquet_and_jsonl_hold_the_same_manifest(tree: Path, tmp_path: Path) -> None:
    run("pin", tree, "--out", tmp_path / "m.parquet")
    run("pin", tree, "--out", tmp_path / "m.jsonl")
    hp, ip = read_manifest(tmp_path / "m.parquet")
    hj, ij = read_manifest(tmp_path / "m.jsonl")
    strip = ({k: v for k, v in it.items() if k != "pinned_at"} for it in ip)
    assert list(strip) == [{k: v for k, v in it.items() if k != "pinned_at"} for it in ij]
    assert hp["sources"] == hj["sources"] and hp["item_count"] == hj["item_count"] == 7
    assert pq.ParquetFile(tmp_path / "m.parquet").metadata.num_rows == 7


def _write_jsonl(path: Path, header: dict, rows: list[dict], *, end: dict | None = None) -> None:
    batch = ItemBatch()
    for r in rows:
        batch.append(r["key"], r["source"], r["size"], r["sha256"], r["pinned_at"],
                     r.get("label"), r.get("url"))
    digest = hashlib.sha256(canonical_lines(batch)).hexdigest()
    end = end or {"item_count": len(rows), "items_digest": digest}
    head = {k: v for k, v in header.items() if k not in ("item_count", "items_digest")}
    lines = [json.dumps({"poisonguard_manifest": head})]
    lines += [json.dumps(r) for r in rows]
    lines.append(json.dumps({"poisonguard_manifest_end": end}))
    path.write_text("\n".join(lines) + "\n")


def test_duplicate_keys_refused(tree: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    run("pin", tree, "--out", manifest)
    header, items = read_manifest(manifest)
    _write_jsonl(manifest, header, items + [items[2]])
    with pytest.raises(ManifestError, match=f"1 duplicate item key.*{items[2]['key']}"):
        run("verify", manifest, tree)


def test_edited_item_refused_even_unsigned(tree: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    run("pin", tree, "--out", manifest)
    lines = manifest.read_text().splitlines()
    item = json.loads(lines[1])
    item["sha256"] = "0" * 64
    lines[1] = json.dumps(item)
    manifest.write_text("\n".join(lines) + "\n")
    report = tmp_path / "r.json"
    with pytest.raises(IntegrityError, match="items_digest"):
        run("verify", manifest, "--out", report)
    assert not report.exists()  # nothing is reported from an untrusted manifest


@pytest.mark.parametrize("edit, match", [
    (lambda h: h.update(format="something-else"), "not a poisonguard manifest"),
    (lambda h: h.update(format_version=99), "format_version 99"),
    (lambda h: h.pop("tool"), "tool"),
    (lambda h: h.update(created="yesterday"), "ISO-8601"),
    (lambda h: h.update(sources=[]), "no sources"),
    (lambda h: h.update(item_count=-1), "item_count"),
])
def test_bad_header_refused(tree: Path, tmp_path: Path, edit, match: str) -> None:
    manifest = tmp_path / "m.parquet"
    run("pin", tree, "--out", manifest)
    table = pq.read_table(manifest)
    header = json.loads(pq.ParquetFile(manifest).metadata.metadata[PARQUET_META_KEY])
    edit(header)
    pq.write_table(table.replace_schema_metadata({PARQUET_META_KEY: json.dumps(header)}),
                   manifest)
    with pytest.raises(ManifestError, match=match):
        run("verify", manifest)


def test_not_a_manifest(tree: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"key": ["a"], "sha256": ["0" * 64]}), plain)
    with pytest.raises(ManifestError, match="no poisonguard manifest header"):
        run("verify", plain, tree)
    junk = tmp_path / "junk.jsonl"
    junk.write_text('{"hello": 1}\n')
    with pytest.raises(ManifestError, match="first line is not a manifest header"):
        run("verify", junk, tree)
    with pytest.raises(ManifestError, match="no such manifest"):
        run("verify", tmp_path / "absent.parquet", tree)


def test_truncated_manifests_refused(tree: Path, tmp_path: Path) -> None:
    pm, jm = tmp_path / "m.parquet", tmp_path / "m.jsonl"
    run("pin", tree, "--out", pm)
    run("pin", tree, "--out", jm)
    data = pm.read_bytes()
    pm.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="truncated or corrupt"):
        run("verify", pm, tree)
    lines = jm.read_text().splitlines()
    jm.write_text("\n".join(lines[:4]) + "\n")
    with pytest.raises(ManifestError, match="truncated"):
        run("verify", jm, tree)


def test_inflated_item_count_refused(tree: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    run("pin", tree, "--out", manifest)
    header, items = read_manifest(manifest)
    _write_jsonl(manifest, header, items, end={"item_count": 10**12,
                                               "items_digest": header["items_digest"]})
    with pytest.raises(ManifestError, match="more than a"):
        run("verify", manifest)
    _write_jsonl(manifest, header, items, end={"item_count": 5,
                                               "items_digest": header["items_digest"]})
    with pytest.raises(ManifestError, match="more items than the 5"):
        run("verify", manifest)


def test_unsafe_folder_key_refused(tree: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    run("pin", tree, "--out", manifest)
    header, items = read_manifest(manifest)
    items[0]["key"] = "../outside"
    _write_jsonl(manifest, header, items)
    with pytest.raises(DataError, match="clean relative path"):
        verify(manifest)


def test_bad_options(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must end in"):
        run("pin", tree, "--out", tmp_path / "m.csv")
    with pytest.raises(PoisonguardError, match="no such file"):
        run("pin", tmp_path / "nothing", "--out", tmp_path / "m.jsonl")
    with pytest.raises(ConfigError, match="kind of file"):
        (tmp_path / "x.bin").write_text("x")
        run("pin", tmp_path / "x.bin", "--out", tmp_path / "m.jsonl")


# ----------------------------------------------------------------------------- signing
@pytest.fixture()
def signed(tree: Path, tmp_path: Path) -> tuple[Path, Path, Path]:
    key = tmp_path / "keys" / "pg"
    assert run("keygen", "--out", key) == 0
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    manifest = tmp_path / "m.jsonl"
    assert run("pin", tree, "--out", manifest, "--sign-key", key) == 0
    assert Path(str(manifest) + ".sig").exists()
    return manifest, key, Path(str(key) + ".pub")


def test_valid_signature_passes(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    manifest, _, pub = signed
    report = tmp_path / "r.json"
    assert run("verify", manifest, "--public-key", pub, "--out", report) == 0
    sig = json.loads(report.read_text())["layers"]["provenance"]["signature"]
    assert sig["checked"] and sig["valid"]


def test_tampered_item_with_recomputed_digest_fails_signature(
        signed: tuple[Path, Path, Path]) -> None:
    manifest, _, pub = signed
    header, items = read_manifest(manifest)
    items[0]["sha256"] = sha("attacker content")
    _write_jsonl(manifest, header, items)  # a consistent manifest, but not the signed one
    with pytest.raises(SignatureError, match="changed after signing"):
        run("verify", manifest, "--public-key", pub)


def test_tampered_header_fails_signature(signed: tuple[Path, Path, Path]) -> None:
    manifest, _, pub = signed
    lines = manifest.read_text().splitlines()
    head = json.loads(lines[0])
    head["poisonguard_manifest"]["created"] = "2020-01-01T00:00:00Z"
    lines[0] = json.dumps(head)
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(SignatureError):
        run("verify", manifest, "--public-key", pub)


def test_truncated_signed_manifest_fails(signed: tuple[Path, Path, Path]) -> None:
    manifest, _, pub = signed
    header, items = read_manifest(manifest)
    header = dict(header)
    _write_jsonl(manifest, header, items[:-2])  # dropped rows, end record made consistent
    with pytest.raises(SignatureError):
        run("verify", manifest, "--public-key", pub)
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")  # and cut off the end record too
    with pytest.raises(ManifestError, match="truncated"):
        run("verify", manifest, "--public-key", pub)


def test_wrong_key_and_missing_signature(signed: tuple[Path, Path, Path],
                                         tmp_path: Path) -> None:
    manifest, _, _ = signed
    other = tmp_path / "other"
    run("keygen", "--out", other)
    with pytest.raises(SignatureError, match="another key"):
        run("verify", manifest, "--public-key", str(other) + ".pub")
    sig = json.loads(Path(str(manifest) + ".sig").read_text())
    sig.pop("public_key_sha256")
    Path(str(manifest) + ".sig").write_text(json.dumps(sig))
    with pytest.raises(SignatureError, match="bad signature"):
        run("verify", manifest, "--public-key", str(other) + ".pub")
    Path(str(manifest) + ".sig").unlink()
    with pytest.raises(SignatureError, match="no signature file"):
        run("verify", manifest, "--public-key", str(other) + ".pub")
    with pytest.raises(ConfigError, match="already exists"):
        run("keygen", "--out", other)


def test_signature_covers_the_digest(signed: tuple[Path, Path, Path]) -> None:
    manifest, _, _ = signed
    header, _ = read_manifest(manifest)
    sig = json.loads(Path(str(manifest) + ".sig").read_text())
    assert sig["manifest_digest"] == manifest_digest(header)


def test_canonical_lines_are_compact_json() -> None:
    batch = ItemBatch()
    batch.append('q"uote\\back\nnl\x01é\u2028', 0, None, "ab", "2024-01-01T00:00:00Z")
    batch.append("plain", 3, 12, "cd", "2024-01-01T00:00:00Z", "lab\tel", "http://x/ü")
    expected = "".join(json.dumps(list(row), separators=(",", ":"), ensure_ascii=False) + "\n"
                       for row in zip(*batch.columns()))
    assert canonical_lines(batch) == expected.encode()


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for name in ("m.parquet", "m.jsonl"):
        assert run("pin", tmp_path / "empty", "--out", tmp_path / name) == 0
        assert read_manifest(tmp_path / name)[1] == []
        (tmp_path / "empty" / "late").write_text("x")
        assert verify(tmp_path / name).new == ["late"]
        (tmp_path / "empty" / "late").unlink()


def test_scan_helper_adds_the_layer(tree: Path, tmp_path: Path) -> None:
    from poisonguard.provenance.cli import add_scan_arguments, provenance_layer

    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    add_scan_arguments(parser)
    args = parser.parse_args([str(tree)])
    assert provenance_layer(args, args.data) is None
    run("pin", tree, "--out", tmp_path / "m.parquet")
    (tree / "a-b").write_text("poison")
    args = parser.parse_args([str(tree), "--manifest", str(tmp_path / "m.parquet")])
    layer = provenance_layer(args, args.data)
    assert layer is not None and layer["status"] == "changed"
    assert layer["findings"] == [{"kind": "modified", "key": "a-b", "old_sha256": sha("ab"),
                                  "new_sha256": sha("poison"), "old_size": 2, "new_size": 6,
                                  "reason": "content changed", "old_label": None,
                                  "new_label": None}]
    json.dumps(layer)  # JSON-ready
