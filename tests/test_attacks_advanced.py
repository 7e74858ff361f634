import json
from pathlib import Path

import numpy as np
import pytest

from poisonguard.attacks import (
    ATTACKS,
    AdaptiveBlendTrigger,
    AdaptivePatchTrigger,
    RandomPatchTrigger,
    SigTrigger,
    WarpTrigger,
    WatermarkTrigger,
    make_attack,
)
from poisonguard.cli import main
from poisonguard.data import LabeledData
from poisonguard.errors import ConfigError

TARGET = 1


@pytest.fixture(scope="module")
def imgs() -> LabeledData:
    rng = np.random.default_rng(0)
    return LabeledData.create(rng.integers(0, 256, (60, 16, 16, 3)).astype(np.uint8),
                              np.arange(60) % 3)


def changed(p, data: LabeledData) -> np.ndarray:
    return (p.data.x != data.x).reshape(len(data), -1).any(axis=1)


def check_common(p, data: LabeledData, n_poison: int, clean_label: bool = False) -> None:
    assert p.is_poison.sum() == n_poison == p.attack["n_poison"]
    assert (p.original_y == data.y).all()
    json.dumps(p.attack)
    if clean_label:
        assert (p.data.y == data.y).all()
        assert (data.y[p.is_poison] == TARGET).all()
    else:
        assert (p.data.y[p.is_poison] == TARGET).all()
        assert (data.y[p.is_poison] != TARGET).all()
        assert (p.data.y[~p.is_poison] == data.y[~p.is_poison]).all()
    touched = p.is_poison | (p.is_cover if p.is_cover is not None else False)
    assert (p.data.x[~touched] == data.x[~touched]).all()
    assert changed(p, data)[p.is_poison].all()
    t = p.test_triggered
    assert len(t) == (data.y != TARGET).sum() and (t.y == TARGET).all()
    assert (t.ids == data.ids[data.y != TARGET]).all()


def run(name: str, data: LabeledData, **kw):
    return make_attack(name, data, **{"rate": 0.1, "target": TARGET, "seed": 3, "test": data,
                                      **kw})


def test_wanet(imgs: LabeledData) -> None:
    p = run("wanet", imgs)
    check_common(p, imgs, 6)
    assert p.attack["n_cross"] == 12 == p.is_cover.sum() and not (p.is_cover & p.is_poison).any()
    assert (p.data.y[p.is_cover] == imgs.y[p.is_cover]).all()
    trig = WarpTrigger()
    assert (p.data.x[p.is_poison] == trig.apply(imgs.x[p.is_poison])).all()
    assert (p.test_triggered.x == trig.apply(imgs.x[imgs.y != TARGET])).all()
    # noise mode differs from the exact field; the field is a smooth warp, not a no-op
    assert (p.data.x[p.is_cover] != trig.apply(imgs.x[p.is_cover])).any()
    grid = trig.grid(16, 16)
    assert grid.abs().max() <= 1 and grid.shape == (1, 16, 16, 2)
    assert run("wanet", imgs, cross_ratio=0).is_cover.sum() == 0
    grey = WarpTrigger(k=3).apply(imgs.x[:2, :, :, 0])
    assert grey.shape == (2, 16, 16) and grey.dtype == np.uint8
    flo = WarpTrigger().apply(imgs.x[:2] / 255.0)
    assert flo.dtype == np.float64 and 0 <= flo.min() and flo.max() <= 1


def test_sig_clean_label(imgs: LabeledData) -> None:
    p = run("sig", imgs, rate=0.5)
    check_common(p, imgs, 10, clean_label=True)
    v = SigTrigger().signal(16, 255.0)
    expect = np.clip(np.rint(imgs.x[p.is_poison].astype(float) + v[None, None, :, None]), 0, 255)
    assert (p.data.x[p.is_poison] == expect).all()
    assert np.isclose(np.abs(v).max(), 20)
    default = make_attack("sig", imgs, target=TARGET)  # default rate 0.8 of the 20 targets
    assert default.is_poison.sum() == 16
    with pytest.raises(ConfigError, match="all-to-one"):
        run("sig", imgs, mode="all-to-all", target=None)


@pytest.mark.parametrize("name", ["adaptive-blend", "adaptive-patch"])
def test_adaptive(imgs: LabeledData, name: str) -> None:
    p = run(name, imgs)
    check_common(p, imgs, 6)
    assert p.attack["n_cover"] == 6 == p.is_cover.sum() and not (p.is_cover & p.is_poison).any()
    assert (p.data.y[p.is_cover] == imgs.y[p.is_cover]).all()
    assert changed(p, imgs)[p.is_cover].all()
    assert run(name, imgs, cover_rate=0.2).is_cover.sum() == 12
    assert run(name, imgs, cover_rate=0.0).is_cover.sum() == 0


def test_adaptive_blend_partial_pieces(imgs: LabeledData) -> None:
    p = run("adaptive-blend", imgs)
    trig = AdaptiveBlendTrigger()
    masks = trig.piece_masks(16, 16)
    diff = (p.data.x != imgs.x).any(axis=3)
    for d in diff[p.is_poison | p.is_cover]:
        touched = [bool(d[m].any()) for m in masks]
        assert sum(touched) <= 8  # half of the 16 pieces at most
        for m, t in zip(masks, touched):
            if not t:
                assert not d[m].any()
    full = trig.apply(imgs.x[:1]).astype(float)
    pat = trig.pattern_for(imgs.x)
    assert np.abs(full - np.rint(0.8 * imgs.x[0] + 0.2 * pat)).max() == 0


def test_adaptive_patch_regions(imgs: LabeledData) -> None:
    p = run("adaptive-patch", imgs)
    trig = AdaptivePatchTrigger()
    origins, _ = trig.layout(16, 16, 3)
    inside = np.zeros((16, 16), bool)
    for r, c in origins:
        assert not inside[r:r + 3, c:c + 3].any()  # distinct, non-overlapping
        inside[r:r + 3, c:c + 3] = True
    diff = (p.data.x != imgs.x).any(axis=3)
    assert not diff[:, ~inside].any()
    n_on = [sum(diff[i, r:r + 3, c:c + 3].any() for r, c in origins)
            for i in np.flatnonzero(p.is_poison)]
    assert max(n_on) <= 2
    tdiff = (p.test_triggered.x != imgs.x[imgs.y != TARGET]).any(axis=3)
    assert not tdiff[:, ~inside].any()


def test_trojan_lowfreq_random_patch(imgs: LabeledData) -> None:
    p = run("trojan", imgs)
    check_common(p, imgs, 6)
    shape, _ = WatermarkTrigger().shape_and_colour()
    d = (p.data.x != imgs.x).any(axis=3)
    region = np.zeros((16, 16), bool)
    region[7:15, 7:15] = shape
    assert not d[:, ~region].any()
    p = run("low-frequency", imgs, eps=0.1)
    check_common(p, imgs, 6)
    delta = p.data.x[p.is_poison].astype(int) - imgs.x[p.is_poison].astype(int)
    assert np.abs(delta).max() <= 26
    p = run("badnets-random", imgs)
    check_common(p, imgs, 6)
    r, c = p.attack["patch_origin"]
    assert 2 <= r <= 16 - 3 - 2 and 2 <= c <= 16 - 3 - 2
    d = (p.data.x != imgs.x).any(axis=3)
    region = np.zeros((16, 16), bool)
    region[r:r + 3, c:c + 3] = True
    assert not d[:, ~region].any()
    _, _, colours = RandomPatchTrigger().layout(16, 16, 3)
    assert len(np.unique(colours)) > 3  # per-pixel colours, not one solid colour


@pytest.mark.parametrize("name", ["wanet", "trojan", "low-frequency", "badnets-random"])
def test_all_to_all(imgs: LabeledData, name: str) -> None:
    p = make_attack(name, imgs, rate=0.1, target=None, mode="all-to-all", seed=0, test=imgs)
    assert (p.data.y[p.is_poison] == (imgs.y[p.is_poison] + 1) % 3).all()
    assert len(p.test_triggered) == len(imgs)
    assert (p.test_triggered.y == (imgs.y + 1) % 3).all()


@pytest.mark.parametrize("name", sorted(set(ATTACKS) - {"badnets", "blended", "label-flip"}))
def test_deterministic(imgs: LabeledData, name: str) -> None:
    kw = {"surrogate_epochs": 1} if name == "label-consistent" else {}
    rate = 0.5 if name in ("sig", "label-consistent") else 0.1
    a, b = (run(name, imgs, rate=rate, **kw) for _ in range(2))
    assert (a.data.x == b.data.x).all() and (a.is_poison == b.is_poison).all()
    c = run(name, imgs, rate=rate, seed=4, **kw)
    assert (c.is_poison != a.is_poison).any()


@pytest.mark.parametrize("name,kwargs,match", [
    ("wanet", {"rate": 0.0}, "rate"), ("wanet", {"rate": 1.0}, "rate"),
    ("wanet", {"k": 1}, "k must"), ("wanet", {"s": 0}, "strength"),
    ("wanet", {"cross_ratio": -1}, "cross_ratio"), ("wanet", {"target": 7}, "target"),
    ("wanet", {"cross_ratio": 20}, "left"),
    ("sig", {"rate": 1.0}, "rate"), ("sig", {"delta": 0}, "delta"),
    ("sig", {"freq": -1}, "frequency"), ("sig", {"target": None}, "target"),
    ("adaptive-blend", {"alpha": 1.2}, "alpha"), ("adaptive-blend", {"pieces": 10}, "square"),
    ("adaptive-blend", {"cover_rate": 1.0}, "cover rate"),
    ("adaptive-blend", {"mask_rate": 0.0}, "mask_rate"),
    ("adaptive-patch", {"n_active": 4}, "n_active"), ("adaptive-patch", {"size": 9}, "fit"),
    ("adaptive-patch", {"rate": -0.1}, "rate"), ("adaptive-patch", {"mode": "all-to-all",
                                                                     "target": None}, "all-to-one"),
    ("trojan", {"size": 20}, "fit"), ("trojan", {"alpha": 0}, "alpha"),
    ("low-frequency", {"eps": 0}, "eps"), ("low-frequency", {"cutoff": 0}, "cutoff"),
    ("badnets-random", {"size": 14}, "at least"), ("badnets-random", {"rate": 2}, "rate"),
])
def test_bad_parameters(imgs: LabeledData, name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run(name, imgs, **kwargs)


def test_vectors_rejected() -> None:
    vec = LabeledData.create(np.random.default_rng(0).random((30, 8)), np.arange(30) % 3)
    for name in ("wanet", "sig", "adaptive-blend", "trojan"):
        with pytest.raises(ConfigError, match="needs images"):
            make_attack(name, vec, rate=0.2, target=1)


def test_cli_new_attack_and_errors(tmp_path: Path, imgs: LabeledData, capsys) -> None:
    np.savez(tmp_path / "train.npz", x=imgs.x, y=imgs.y)
    out = tmp_path / "p.npz"
    rc = main(["attack", str(tmp_path / "train.npz"), "--attack", "wanet", "--rate", "0.1",
               "--target", "1", "--k", "3", "--s", "0.75", "--test", str(tmp_path / "train.npz"),
               "--out", str(out)])
    assert rc == 0
    with np.load(out) as f:
        meta = json.loads(str(f["attack_json"]))
        assert meta["name"] == "wanet" and meta["k"] == 3 and meta["s"] == 0.75
        assert f["is_poison"].sum() == 6 and (f["y"][f["is_poison"]] == 1).all()
        assert "x_triggered" in f.files and "is_cover" in f.files
    rc = main(["attack", str(tmp_path / "train.npz"), "--attack", "badnets", "--mode",
               "all-to-all", "--out", str(tmp_path / "a2a.npz")])
    assert rc == 0
    capsys.readouterr()
    rc = main(["attack", str(tmp_path / "train.npz"), "--attack", "sig", "--delta", "0",
               "--out", str(tmp_path / "bad.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "delta" in err
    assert not (tmp_path / "bad.npz").exists()


def test_label_consistent(imgs: LabeledData) -> None:
    from poisonguard.attacks import FourCornerTrigger

    p = run("label-consistent", imgs, rate=0.5, surrogate_epochs=1)
    check_common(p, imgs, 10, clean_label=True)
    corners = np.zeros((16, 16), bool)
    for sl in ((slice(0, 3), slice(0, 3)), (slice(0, 3), slice(13, 16)),
               (slice(13, 16), slice(0, 3)), (slice(13, 16), slice(13, 16))):
        corners[sl] = True
    stamped = FourCornerTrigger().apply(imgs.x[p.is_poison])
    assert (p.data.x[p.is_poison][:, corners] == stamped[:, corners]).all()
    delta = np.abs(p.data.x[p.is_poison].astype(int) - imgs.x[p.is_poison].astype(int))
    assert delta[:, ~corners].max() <= 8 and delta[:, ~corners].mean() > 1  # PGD, eps 8/255
    assert (p.test_triggered.x == FourCornerTrigger().apply(imgs.x[imgs.y != TARGET])).all()
    assert p.attack["surrogate"].startswith("trained 1 epoch")


def test_label_consistent_given_surrogate_and_errors(imgs: LabeledData) -> None:
    from poisonguard.attacks.label_consistent import pgd_untargeted
    from poisonguard.models.training import TrainConfig, train_classifier

    clf = train_classifier(imgs, TrainConfig(epochs=1, batch_size=16)).classifier
    p = run("label-consistent", imgs, rate=0.5, surrogate=clf, steps=3, eps=4 / 255)
    assert p.attack["surrogate"] == "given" and p.is_poison.sum() == 10
    x, y = imgs.x[:8], imgs.y[:8]
    loss = lambda z: clf.per_sample_loss(z, y).mean()  # noqa: E731
    assert loss(pgd_untargeted(clf, x, y, 8 / 255, 5)) > loss(x)
    for kwargs, match in (({"eps": 0}, "eps"), ({"steps": 0}, "steps"),
                          ({"surrogate_epochs": 0}, "surrogate_epochs"), ({"rate": 1}, "rate"),
                          ({"mode": "all-to-all", "target": None}, "all-to-one"),
                          ({"size": 9}, "fit")):
        with pytest.raises(ConfigError, match=match):
            run("label-consistent", imgs, **kwargs)
