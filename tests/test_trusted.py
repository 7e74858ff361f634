"""The trusted set: validation before any training, and a scan that uses it."""

from pathlib import Path

import numpy as np
import pytest

from poisonguard.attacks import badnets
from poisonguard.cli import main
from poisonguard.data import LabeledData, check_trusted
from poisonguard.errors import DataError
from poisonguard.pipeline import ScanConfig, scan


@pytest.fixture(scope="module")
def split(digits) -> tuple[LabeledData, LabeledData]:
    train, _ = digits
    return train.subset(np.arange(500)), train.subset(np.arange(500, 800))


def test_check_trusted_accepts_matching(split) -> None:
    data, trusted = split
    check_trusted(data, trusted)


@pytest.mark.parametrize("make, match", [
    (lambda d: LabeledData.create(d.x[:5, :4, :4], d.y[:5]), "shape"),
    (lambda d: LabeledData.create(d.x[:5].astype(np.float32) / 255, d.y[:5]), "uint8"),
    (lambda d: LabeledData.create(d.x[:5], np.full(5, 11)), "classes"),
])
def test_check_trusted_rejects(split, make, match) -> None:
    data, trusted = split
    with pytest.raises(DataError, match=match):
        check_trusted(data, make(trusted))


def test_cli_bad_trusted_exit_2_before_training(split, tmp_path: Path, capsys) -> None:
    data, trusted = split
    np.savez(tmp_path / "d.npz", x=data.x, y=data.y)
    np.savez(tmp_path / "t.npz", x=trusted.x[:, :4, :4], y=trusted.y)
    out = tmp_path / "out"
    rc = main(["scan", str(tmp_path / "d.npz"), "--trusted", str(tmp_path / "t.npz"),
               "--out", str(out), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shape" in err[0]
    assert not out.exists()


def test_scan_with_trusted_set_uses_it(split) -> None:
    data, trusted = split
    poisoned = badnets(data, rate=0.1, target=3, seed=0, size=3)
    result = scan(poisoned.data, ScanConfig(epochs=6, max_rounds=1, trusted=trusted))
    ac = next(r for r in result.detectors if r.name == "activation_clustering")
    target = next(f for f in ac.findings if f.label == 3)
    assert target.evidence["poison_group_rule"] == "farther from the trusted samples"
    assert "reason" in target.evidence
    assert 3 in result.poisoned_classes
    flagged = result.flags
    assert flagged[poisoned.is_poison].mean() >= 0.9
    # this 6-epoch toy also splits clean class 5 (4.4% of clean samples flagged without
    # confusion training); confusion training adds 9 clean samples of class 3 (6.4%)
    assert flagged[~poisoned.is_poison].mean() <= 0.07
    ct = next(r for r in result.detectors if r.name == "confusion_training")
    assert ct.suspicious_classes == [3] and ct.flags[poisoned.is_poison].all()
    assert ScanConfig(trusted=trusted).to_dict()["trusted"] == {"n_samples": len(trusted)}


def test_all_to_all_is_reported_dataset_wide(digits) -> None:
    from poisonguard.report.builder import build_scan_report

    train, _ = digits
    poisoned = badnets(train, rate=0.1, target=None, mode="all-to-all", seed=0, size=3)
    result = scan(poisoned.data, ScanConfig(epochs=8, max_rounds=1))
    ac = next(r for r in result.detectors if r.name == "activation_clustering")
    assert ac.extras["dataset_wide"]
    assert len(ac.suspicious_classes) >= 4
    assert ac.flags[poisoned.is_poison].mean() >= 0.5
    assert ac.flags[~poisoned.is_poison].mean() <= 0.01
    report = build_scan_report(result)
    assert report["verdict"]["poisoning_found"]
    assert "all-to-all" in report["verdict"]["dataset_wide"]["message"]
    assert any(c["why"] for c in report["layers"]["quarantine"]["classes"])
