"""`poisonguard audit` / `poisonguard.audit(...)`: every layer, one verdict, schema 2."""

import json
from pathlib import Path

import numpy as np
import pytest

import poisonguard
from poisonguard.cli import main
from poisonguard.profiles import PROFILES, Profile
from poisonguard.report.schema import report_schema, validate
from poisonguard.verdict import LAYERS, overall_status, set_verdict, skipped

CHEAP = dict(scan_rounds=1, epoch_share=0.1, min_epochs=3,
             detectors=("activation_clustering", "spectral_signatures", "loss_outliers"),
             loss_seed=False, final_model=False, seeds=(0,), recheck=False, cleanse_steps=20,
             cleanse_min_steps=10, additive_search=False, dormant=False)


@pytest.fixture(autouse=True)
def cheap_profiles(monkeypatch):
    """The named profiles with tiny budgets, so each audit runs in seconds."""
    monkeypatch.setitem(PROFILES, "quick", Profile("quick", runtime=False, **CHEAP))
    monkeypatch.setitem(PROFILES, "standard", Profile("standard", runtime=True, **CHEAP))


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits) -> dict[str, Path]:
    train, test = digits
    d = tmp_path_factory.mktemp("audit")
    np.savez(d / "train.npz", x=train.x[:400], y=train.y[:400])
    np.savez(d / "test.npz", x=test.x, y=test.y)
    np.savez(d / "clean.npz", x=test.x[:300], y=test.y[:300])
    assert main(["attack", str(d / "train.npz"), "--rate", "0.1", "--target", "3", "--size",
                 "3", "--out", str(d / "poisoned.npz")]) == 0
    assert main(["train", str(d / "train.npz"), "--epochs", "3", "--quiet", "--out",
                 str(d / "model")]) == 0
    for name in ("train", "poisoned"):
        assert main(["pin", str(d / f"{name}.npz"), "--out", str(d / f"{name}.jsonl"),
                     "--quiet"]) == 0
    return {"dir": d, "train": d / "train.npz", "poisoned": d / "poisoned.npz",
            "clean": d / "clean.npz", "model": d / "model", "test": d / "test.npz",
            "man_train": d / "train.jsonl", "man_poisoned": d / "poisoned.jsonl"}


def _report(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert validate(report) == [], validate(report)
    return report


def test_overall_is_never_clean_when_a_layer_is_not():
    clean = {"status": "clean", "summary": "", "reason": ""}
    assert overall_status({"a": clean, "b": skipped("x")}) == "clean"
    assert overall_status({"a": skipped("x")}) == "suspicious"  # nothing ran
    assert overall_status({"a": clean, "b": {**clean, "status": "error"}}) == "suspicious"
    assert overall_status({"a": {**clean, "status": "suspicious"},
                           "b": {**clean, "status": "compromised"}}) == "compromised"
    report = set_verdict({"command": "x"}, {"quarantine": clean})
    assert list(report["verdict"]["layers"]) == list(LAYERS)
    assert report["verdict"]["layers"]["runtime"]["status"] == "skipped"


def test_model_audit_outlier_kept_by_the_ratio_guard_is_suspicious():
    from poisonguard.verdict import model_audit_status

    base = {"backdoored": False, "target_class": None, "summary": "no backdoor found"}
    ev = {"anomaly_index": 5.0, "additive_anomaly_index": 0.3, "most_anomalous_class": 3}
    entry = model_audit_status({**base, "evidence": ev})
    assert entry["status"] == "suspicious" and "class 3" in entry["summary"]
    assert model_audit_status({**base, "evidence": {**ev, "anomaly_index": 3.0}})["status"] \
        == "clean"
    hit = model_audit_status({**base, "backdoored": True, "target_class": 3, "evidence": ev})
    assert hit["status"] == "compromised"


def test_schema_validator_rejects_bad_reports():
    good = set_verdict({"tool": {"name": "poisonguard", "version": "0"}, "created": "now",
                        "command": "audit", "layers": {}},
                       {"quarantine": {"status": "clean", "summary": "s", "reason": "r"}})
    assert validate(good) == []
    bad = json.loads(json.dumps(good))
    bad["verdict"]["layers"]["quarantine"]["status"] = "fine"
    bad["verdict"]["overall"] = "green"
    del bad["verdict"]["layers"]["runtime"]
    errors = validate(bad)
    assert any("quarantine.status" in e for e in errors)
    assert any("overall" in e for e in errors)
    assert any("missing 'runtime'" in e for e in errors)
    assert report_schema()["properties"]["schema_version"]["const"] == "2.0"


def test_tampered_source_is_not_clean(files, tmp_path, capsys, monkeypatch):
    import poisonguard.full_audit as fa

    monkeypatch.setattr(fa, "RUNTIME_SCREEN_MAX", 200)  # screen a sample of the inputs
    data = tmp_path / "poisoned.npz"
    data.write_bytes(files["poisoned"].read_bytes())
    with np.load(data) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["x"][7] = 255 - arrays["x"][7]
    np.savez(data, **arrays)
    out = tmp_path / "out"
    rc = main(["audit", "--data", str(data), "--model", str(files["model"]), "--clean",
               str(files["clean"]), "--manifest", str(files["man_poisoned"]), "--profile",
               "standard", "--out", str(out), "--quiet"])
    assert rc == 1
    report = _report(out)
    layers = report["verdict"]["layers"]
    assert report["verdict"]["overall"] != "clean"
    assert layers["provenance"]["status"] == "compromised"
    assert layers["provenance"]["key_numbers"]["modified"] == 1
    assert layers["quarantine"]["status"] in ("suspicious", "compromised")
    assert layers["model_audit"]["status"] in ("clean", "suspicious", "compromised")
    assert layers["runtime"]["status"] in ("clean", "suspicious")
    assert layers["guarded_training"]["status"] == "skipped"
    assert report["profile"]["name"] == "standard" and report["profile"]["ran"]
    checks = {c["check"]: c for c in report["cross_layer"]}
    prov = checks["flagged samples vs provenance changes"]
    assert prov["n_changed"] == 1
    assert "runtime-filter flags vs scan flags" in checks
    sample = report["layers"]["runtime"]["screened_sample"]
    assert sample["n_screened"] == 200 < sample["n_data"]
    rows = (out / "runtime" / "flags.csv").read_text().splitlines()[1:]
    index = [int(r.split(",")[0]) for r in rows]
    assert len(index) == 200 == len(set(index)) and max(index) < sample["n_data"]
    for name in ("flagged.csv", "sanitized.npz", "triggers.npz", "runtime/strip.json",
                 "runtime/strip_pool.npz", "runtime/flags.csv", "report.html"):
        assert (out / name).exists(), name
    page = (out / "report.html").read_text()
    assert 'class="verdict ok"' not in page and page.count('class="card ') == 5
    # the calibration is one `filter --calibration` (and so `serve`) loads
    assert main(["filter", str(files["model"]), str(files["test"]), "--calibration",
                 str(out / "runtime"), "--out", str(tmp_path / "f"), "--quiet"]) in (0, 1)
    _report(tmp_path / "f")


def test_clean_inputs_read_clean_and_python_api(files, tmp_path):
    out = tmp_path / "clean"
    rc = main(["audit", "--data", str(files["train"]), "--model", str(files["model"]),
               "--clean", str(files["clean"]), "--manifest", str(files["man_train"]),
               "--profile", "quick", "--out", str(out), "--quiet"])
    report = _report(out)
    layers = report["verdict"]["layers"]
    assert layers["provenance"]["status"] == "clean"
    assert layers["runtime"]["status"] == "skipped" and "quick" in layers["runtime"]["reason"]
    assert rc == (0 if report["verdict"]["overall"] == "clean" else 1)
    assert layers["quarantine"]["status"] == "clean", layers["quarantine"]
    assert layers["model_audit"]["status"] == "clean", layers["model_audit"]
    assert rc == 0
    # the same from Python; the subpackage stays importable
    import importlib

    import poisonguard.audit.neural_cleanse  # noqa: F401
    from poisonguard.audit import audit_model

    nc = importlib.import_module("poisonguard.audit.neural_cleanse")
    assert callable(poisonguard.audit) and callable(nc.neural_cleanse) and callable(audit_model)

    outcome = poisonguard.audit(data=str(files["train"]), manifest=str(files["man_train"]),
                                profile="quick")
    assert outcome.overall == "clean" and outcome.exit_code == 0 and outcome.out is None
    assert outcome.layers["model_audit"]["status"] == "skipped"
    assert "needs a model" in outcome.layers["model_audit"]["reason"]
    assert "card clean" in outcome._repr_html_()
    assert poisonguard.run_audit is poisonguard.full_audit.run_audit


def test_model_without_clean_data_gets_the_data_free_search(files, tmp_path):
    out = tmp_path / "free"
    rc = main(["audit", "--model", str(files["model"]), "--profile", "quick", "--quiet",
               "--out", str(out)])
    report = _report(out)
    layer = report["layers"]["model_audit"]
    status = report["verdict"]["layers"]["model_audit"]["status"]
    assert status in ("clean", "suspicious", "compromised") and "max_margin" in layer
    assert len(layer["max_margin"]["margins"]) == 10
    assert any("data-free" in step for step in report["profile"]["ran"])
    assert rc == (0 if report["verdict"]["overall"] == "clean" else 1)


def _bad(argv: list[str], capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_exit_2_one_line_nothing_left(files, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["audit", "--out", str(out), "--quiet"]
    assert "nothing to audit" in _bad(base, capsys)
    assert "no such file" in _bad(base + ["--data", str(tmp_path / "none.npz")], capsys)
    rng = np.random.default_rng(0)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=rng.integers(0, 255, (300, 12, 12), dtype=np.uint8),
             y=np.arange(300) % 10)
    assert "shape (8, 8)" in _bad(base + ["--model", str(files["model"]), "--clean",
                                          str(wrong)], capsys)
    with np.load(files["clean"]) as f:
        huge = tmp_path / "huge.npz"
        np.savez(huge, x=f["x"].astype(np.float32) * 1e30, y=f["y"])
    for cmd in (base + ["--model", str(files["model"]), "--clean", str(huge)],
                ["audit-model", str(files["model"]), "--clean", str(huge), "--out", str(out)],
                ["predict", str(files["model"]), str(huge), "--out", str(tmp_path / "p.csv")]):
        assert "values span" in _bad(cmd, capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "does not exist" in _bad(["audit", "--data", str(files["train"]), "--quiet",
                                     "--out", str(blocker / "sub" / "o")], capsys)
    assert "not a folder" in _bad(["audit", "--data", str(files["train"]), "--quiet",
                                   "--out", str(blocker)], capsys)
    truncated = tmp_path / "t.jsonl"
    truncated.write_text(files["man_train"].read_text()[:-40])
    _bad(base + ["--data", str(files["train"]), "--manifest", str(truncated)], capsys)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_paranoid_votes_seeds_and_rechecks(files):
    prof = Profile("paranoid", runtime=False, **{**CHEAP, "seeds": (0, 1, 2),
                                                  "recheck": True})
    outcome = poisonguard.audit(data=str(files["poisoned"]), profile=prof)
    q = outcome.report["layers"]["quarantine"]
    vote = q["seed_vote"]
    assert vote["seeds"] == [0, 1, 2] and len(vote["n_flagged_per_seed"]) == 3
    flagged = sum(outcome.report["samples"]["flagged"])
    recheck = q["independent_recheck"]
    assert "error" not in recheck, recheck
    # each flag had every seed's vote; the re-check is evidence beside it
    assert 3 * flagged <= sum(vote["n_flagged_per_seed"])
    assert all(r["n_confirmed"] <= prev["n_confirmed"]
               for prev, r in zip(recheck.get("rounds", []), recheck.get("rounds", [])[1:]))
    assert recheck.get("n_flagged", 0) == flagged and recheck["n_checked"] >= flagged
    if flagged:
        assert 0 <= recheck["n_confirmed"] <= flagged and recheck["per_class"]
    assert any("re-check" in step for step in outcome.report["profile"]["ran"])
    removed = outcome.artifacts["removed"]
    assert all(r["seed_votes"] == 3 and r["recheck_confirmed"] in (0, 1) for r in removed)
    assert set(vote["dirty_label_classes"]) <= {int(r["label"]) for r in removed}


def test_dirty_label_classes_need_most_flags_confirmed():
    from poisonguard.full_audit import dirty_label_classes

    y = np.repeat([0, 1, 2], 20)
    flags = np.zeros(60, bool)
    flags[:15] = flags[20:35] = flags[40:45] = True
    confirmed = np.zeros(60, bool)
    confirmed[:14] = True        # class 0: 14 of 15 confirmed (dirty-label)
    confirmed[20:22] = True      # class 1: 2 of 15 (clean-label: left as voted)
    confirmed[40:45] = True      # class 2: 5 of 5, too few flags to read
    assert dirty_label_classes(flags, confirmed, y) == [0]


def test_test_keys_win_and_sparse_labels_refused(files, tmp_path, capsys):
    from poisonguard.data import load_dataset

    with np.load(files["poisoned"]) as f:
        x, y = f["x"], f["y"]
    both = tmp_path / "both.npz"
    np.savez(both, x=x, y=y, x_test=x[:30], y_test=y[:30])
    assert len(load_dataset(both, split="test")) == 30 and len(load_dataset(both)) == len(y)
    sparse = tmp_path / "sparse.npz"
    np.savez(sparse, x=x, y=y * 10)
    err = _bad(["audit", "--data", str(sparse), "--out", str(tmp_path / "o"), "--quiet"],
               capsys)
    assert "remap them to 0..9" in err
    assert "remap" in _bad(["train", str(sparse), "--out", str(tmp_path / "t"), "--quiet"],
                           capsys)


@pytest.mark.parametrize("status", ["suspicious", "compromised", "error", "skipped"])
def test_banner_is_never_green_unless_every_run_layer_is_clean(status):
    from poisonguard.report.html import render_html

    clean = {"status": "clean", "summary": "fine", "reason": "r"}
    other = {"status": status, "summary": "s", "reason": "r"}
    report = set_verdict({"command": "audit", "tool": {"name": "poisonguard", "version": "0"}},
                         {"quarantine": clean, "model_audit": other})
    page = render_html(report)
    green = 'class="verdict ok"' in page
    assert green == (status == "skipped"), status
    assert page.count('class="card ') == len(LAYERS)
    assert f'class="card {status}"' in page


def test_unwritable_out_is_refused_before_training(files, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for argv in (["scan", str(files["train"])], ["train", str(files["train"])],
                 ["audit-model", str(files["model"]), "--clean", str(files["clean"])]):
        err = _bad(argv + ["--out", str(blocker / "out"), "--quiet"], capsys)
        assert "is a file" in err, err


def test_scripted_model_behind_a_uint8_front_end(files, tmp_path):
    import torch

    from poisonguard.models.io import load_model

    class Front(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.float().unsqueeze(1) / 255.0)

    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(Front(load_model(files["model"]).model.eval())), scripted)
    prof = Profile("standard", runtime=True, **{**CHEAP, "dormant": True})
    outcome = poisonguard.audit(model=str(scripted), clean=str(files["clean"]), profile=prof)
    layers = outcome.layers
    assert layers["model_audit"]["status"] in ("clean", "suspicious", "compromised")
    assert "TorchScript" in outcome.report["layers"]["model_audit"]["notes"][0]
    assert layers["runtime"]["status"] == "skipped"  # calibrated, nothing to screen
    assert "calibration" in outcome.report["layers"]["runtime"]
    assert layers["quarantine"]["status"] == "skipped"


def test_guarded_training_layer(files, tmp_path):
    out = tmp_path / "g"
    outcome = poisonguard.audit(data=str(files["poisoned"]), train="abl", profile="quick",
                                out=str(out))
    entry = outcome.layers["guarded_training"]
    assert entry["status"] in ("clean", "suspicious", "compromised")
    assert entry["key_numbers"]["defense"] == "abl"
    layer = outcome.report["layers"]["guarded_training"]
    assert layer["abl"]["n_isolated"] == entry["key_numbers"]["n_isolated"] > 0
    assert any("guarded training (abl)" in s for s in outcome.report["profile"]["ran"])
    _report(out)
    assert main(["predict", str(out / "guarded_model"), str(files["test"]), "--out",
                 str(tmp_path / "p.csv")]) == 0


def test_results_render_in_notebooks(files):
    from poisonguard.audit import CleanseConfig, audit_model, load_audit_model
    from poisonguard.data import load_dataset
    from poisonguard.pipeline import ScanConfig, scan

    data = load_dataset(files["poisoned"])
    result = scan(data, ScanConfig(epochs=2, max_rounds=1, final_model=False, loss_seed=False))
    page = result._repr_html_()
    assert 'class="verdict' in page and page.count('class="card ') == len(LAYERS)
    audit = audit_model(load_audit_model(files["model"]), load_dataset(files["clean"]),
                        CleanseConfig(max_steps=10, min_steps=5, additive=False), dormant=False)
    page = audit._repr_html_()
    assert "Model audit" in page and 'class="card skipped"' in page


def test_recheck_refits_with_unconfirmed_flags(digits):
    """The re-check confirms relabelled images, not the clean half of a class the scans
    over-flagged; each refit only takes confirmations away."""
    from poisonguard.data.labeled import LabeledData
    from poisonguard.full_audit import _recheck
    from poisonguard.pipeline import ScanConfig

    train, _ = digits
    y = train.y.copy()
    sevens = np.flatnonzero(y == 7)[:20]
    y[sevens] = 3                                   # dirty-label poisons in class 3
    threes = np.flatnonzero(train.y == 3)
    hole = threes[np.argsort(train.x[threes].reshape(len(threes), -1).mean(1))][-len(threes) // 2:]
    flags = np.zeros(len(y), bool)
    flags[sevens] = flags[hole] = True
    data = LabeledData(x=train.x, y=y, ids=train.ids)
    info, confirmed = _recheck(data, flags, ScanConfig(epochs=8), 0, quiet=True)
    assert confirmed is not None and not confirmed[~flags].any()
    assert confirmed[sevens].mean() >= 0.9 and confirmed[hole].mean() <= 0.2
    counts = [r["n_confirmed"] for r in info["rounds"]]
    assert 1 <= len(counts) <= 3 and counts == sorted(counts, reverse=True)
    assert counts[0] > counts[-1]                   # the refits gave the hole back
    assert counts[-1] == int(confirmed.sum())
