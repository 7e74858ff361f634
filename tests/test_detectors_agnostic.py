"""SCAn and SPECTRE on small synthetic Gaussian features (10 classes x 200 samples x 32 dims)."""

import numpy as np
import pytest

from poisonguard.detect import SCAn, Spectre
from poisonguard.errors import DataError


def gaussian_classes(plant=(1,), n_poison=40, shift=4.0, seed=0, trusted_per=100,
                     n_cls=10, per=200, d=32):
    """Unit-variance classes around spread-out means; in each class of ``plant`` the first
    ``n_poison`` samples are moved ``shift`` SDs along a random direction."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_cls, d)) * 3
    x, y, truth = [], [], []
    for c in range(n_cls):
        xc = means[c] + rng.standard_normal((per, d))
        tc = np.zeros(per, dtype=bool)
        if c in plant:
            u = rng.standard_normal(d)
            xc[:n_poison] += shift * u / np.linalg.norm(u)
            tc[:n_poison] = True
        x.append(xc)
        y.append(np.full(per, c))
        truth.append(tc)
    tx = np.vstack([means[c] + rng.standard_normal((trusted_per, d)) for c in range(n_cls)])
    ty = np.repeat(np.arange(n_cls), trusted_per)
    return np.vstack(x), np.concatenate(y), np.concatenate(truth), tx, ty


def recall_false(r, truth):
    return (r.flags & truth).sum() / truth.sum(), int((r.flags & ~truth).sum())


@pytest.mark.parametrize("trusted", [False, True])
def test_scan_finds_planted_cluster(trusted: bool) -> None:
    x, y, truth, tx, ty = gaussian_classes(seed=5)
    kw = {"trusted_features": tx, "trusted_labels": ty} if trusted else {}
    r = SCAn().detect(x, y, **kw)
    assert r.name == "scan_decomposition" and r.suspicious_classes == [1]
    rec, false = recall_false(r, truth)
    assert rec >= 0.9 and false <= 10
    assert "likelihood ratio J=" in r.findings[1].evidence["reason"]
    assert r.threshold == pytest.approx(np.exp(2))


def test_scan_clean_flags_nothing() -> None:
    x, y, _, tx, ty = gaussian_classes(plant=())
    for kw in ({}, {"trusted_features": tx, "trusted_labels": ty}):
        r = SCAn().detect(x, y, **kw)
        assert r.suspicious_classes == [] and r.flags.sum() == 0
        assert r.extras["all_classes_split"] <= 0.2


def test_scan_trusted_picks_majority_poison() -> None:
    """70% of the class is poison (clean-label style): size and no losses pick the wrong
    subgroup, the trusted class mean picks the right one."""
    x, y, truth, tx, ty = gaussian_classes(n_poison=140, seed=3)
    r = SCAn().detect(x, y, trusted_features=tx, trusted_labels=ty)
    assert r.suspicious_classes == [1]
    rec, false = recall_false(r, truth)
    assert rec >= 0.9 and false <= 10
    assert "trusted" in r.findings[1].evidence["poison_group_rule"]
    r0 = SCAn().detect(x, y)
    assert recall_false(r0, truth)[0] < 0.5  # the smaller subgroup is the clean one here


@pytest.mark.parametrize("trusted", [False, True])
def test_scan_all_classes_split(trusted: bool) -> None:
    x, y, _, tx, ty = gaussian_classes(plant=tuple(range(10)))
    kw = {"trusted_features": tx, "trusted_labels": ty} if trusted else {}
    r = SCAn().detect(x, y, **kw)
    assert r.extras["all_classes_split"] >= 0.8


@pytest.mark.parametrize("det", [SCAn(), Spectre()])
def test_bad_input_raises(det) -> None:
    x, y, _, tx, ty = gaussian_classes(plant=(), per=20, trusted_per=5)
    with pytest.raises(DataError):
        det.detect(x[:-1], y)
    with pytest.raises(DataError):
        det.detect(x, y, trusted_features=tx[:, :-1], trusted_labels=ty)
    with pytest.raises(DataError):
        det.detect(x, y, trusted_features=tx, trusted_labels=ty[:-1])
    with pytest.raises(DataError):
        det.detect(x, y, trusted_features=tx)


@pytest.mark.parametrize("trusted", [False, True])
def test_spectre_finds_planted_cluster(trusted: bool) -> None:
    """SPECTRE whitens with a covariance estimated per class, so it needs more samples per
    class than SCAn: 1000 per class, 10% of class 1 moved 6 SDs."""
    x, y, truth, tx, ty = gaussian_classes(per=1000, n_poison=100, shift=6.0, seed=5)
    kw = {"trusted_features": tx, "trusted_labels": ty} if trusted else {}
    r = Spectre().detect(x, y, **kw)
    assert r.name == "spectre" and r.suspicious_classes == [1]
    rec, false = recall_false(r, truth)
    assert rec >= 0.9 and false <= (10 if trusted else 30)
    assert "QUE statistic T=" in r.findings[1].evidence["reason"]
    if trusted:
        assert "trusted" in r.findings[1].evidence["cut_rule"]


def test_spectre_clean_flags_nothing() -> None:
    x, y, _, tx, ty = gaussian_classes(plant=(), per=1000)
    for kw in ({}, {"trusted_features": tx, "trusted_labels": ty}):
        r = Spectre().detect(x, y, **kw)
        assert r.suspicious_classes == [] and r.flags.sum() == 0
