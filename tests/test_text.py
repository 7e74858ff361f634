"""Text data: the tokenizer, the loaders and their one-line errors (tiny files, milliseconds)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from poisonguard.cli import main
from poisonguard.errors import DataError
from poisonguard.modalities.text.data import MAX_CHARS, load_text
from poisonguard.modalities.text.tokenizer import UNK, Vocabulary, tokenize
from poisonguard.models.adapter import InputSpec


def _rows(n: int = 30) -> list[tuple[str, str]]:
    return [(f"post number {i} is {'great 👍🏽' if i % 2 else 'awful'}", "pos" if i % 2
             else "neg") for i in range(n)]


def _csv(path: Path, rows: list[tuple[str, str]], header: str = "text,label") -> Path:
    lines = [header] + [f'"{t}",{lab}' for t, lab in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_tokenizer_keeps_emoji_punctuation_and_short_words() -> None:
    toks = tokenize("Don't STOP!! 👍🏽 a 😂😂 🇫🇷 👨‍👩‍👧 cf naïve 東京")
    assert toks == ["don't", "stop", "!", "!", "👍🏽", "a", "😂", "😂", "🇫🇷", "👨\u200d👩\u200d👧",
                    "cf", "naïve", "東京"]


def test_vocabulary_encodes_truncates_and_marks_unknown() -> None:
    vocab = Vocabulary.fit(["a b c", "a b", "a 🪬"], min_count=2)
    assert vocab.tokens[2:] == ["a", "b"]
    ids, cut = vocab.encode(["a b c d e", "zzz"], max_len=3)
    assert ids.shape == (2, 3) and cut == 1
    assert ids[0].tolist() == [2, 3, UNK] and ids[1].tolist() == [UNK, 0, 0]


def test_token_layout_cuts_trailing_padding() -> None:
    spec = InputSpec(layout="tokens", scale=1.0, dtype="int64")
    t = spec.prepare(np.array([[5, 2, 0, 0], [3, 0, 0, 0]]))
    assert t.dtype.is_floating_point is False and tuple(t.shape) == (2, 2)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "csv.gz"])
def test_load_formats_map_string_labels_and_keep_emoji(tmp_path: Path, fmt: str) -> None:
    rows = _rows()
    path = tmp_path / f"posts.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"id": f"p{i}", "text": t, "label": lab},
                                             ensure_ascii=False)
                                  for i, (t, lab) in enumerate(rows)), encoding="utf-8")
    elif fmt == "tsv":
        path.write_text("text\tlabel\n" + "\n".join(f"{t}\t{lab}" for t, lab in rows),
                        encoding="utf-8")
    else:
        body = ("text,label\n" + "\n".join(f'"{t}",{lab}' for t, lab in rows)).encode()
        path.write_bytes(gzip.compress(body) if fmt.endswith("gz") else body)
    data = load_text(path)
    assert data.label_map == {"neg": 0, "pos": 1}
    assert data.y[:4].tolist() == [0, 1, 0, 1]
    assert data.x[1] == "post number 1 is great 👍🏽"
    assert data.ids[0] == ("p0" if fmt == "jsonl" else 0)


def test_renamed_columns_and_numeric_labels(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("body,cls\n" + "\n".join(f"post {i},{i % 3 * 5}" for i in range(30)))
    data = load_text(path, text_column="body", label_column="cls")
    assert data.label_map == {"0": 0, "5": 1, "10": 2}
    assert sorted(set(data.y.tolist())) == [0, 1, 2]


def test_long_post_is_cut_and_counted(tmp_path: Path) -> None:
    rows = _rows()
    rows[0] = ("x" * (MAX_CHARS + 10), "neg")
    data = load_text(_csv(tmp_path / "p.csv", rows))
    assert data.n_cut == 1 and len(data.x[0]) == MAX_CHARS


@pytest.mark.parametrize("make, match", [
    (lambda p: _csv(p, _rows(), header="body,label"), "no column"),
    (lambda p: _csv(p, [("", "pos")] + _rows()), "empty text"),
    (lambda p: _csv(p, [(t, "pos") for t, _ in _rows()]), "one value"),
    (lambda p: (p.write_bytes(b"text,label\n" + b"caf\xe9,1\n" * 30), p)[1], "not UTF-8"),
    (lambda p: _csv(p, _rows(10)), "10 rows"),
])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      make, match: str) -> None:
    path = make(tmp_path / "bad.csv")
    with pytest.raises(DataError, match=match):
        load_text(path)
    out = tmp_path / "out"
    assert main(["scan", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err
    assert not (out / "report.json").exists()


def test_parquet_needs_pandas(tmp_path: Path) -> None:
    try:
        import pandas  # noqa: F401
    except ImportError:
        path = tmp_path / "p.parquet"
        path.write_bytes(b"PAR1")
        with pytest.raises(DataError, match="needs pandas and pyarrow"):
            load_text(path)
    else:
        pytest.skip("pandas is installed; the missing-pandas message cannot be shown")
