import numpy as np
import pytest

from poisonguard.attacks import BadNetsTrigger, BlendTrigger, badnets, blended, label_flip
from poisonguard.data import LabeledData
from poisonguard.errors import ConfigError


@pytest.fixture()
def grey() -> LabeledData:
    rng = np.random.default_rng(0)
    return LabeledData.create(rng.integers(0, 100, (200, 10, 10)).astype(np.uint8),
                              np.arange(200) % 4)


def test_badnets_patch_position_colour() -> None:
    x = np.zeros((2, 10, 10, 3), np.uint8)
    out = BadNetsTrigger(size=3, position="bottom-right", colour=(1.0, 0.5, 0.0)).apply(x)
    assert out[0, 6:9, 6:9].tolist() == [[[255, 128, 0]] * 3] * 3
    assert out[:, :6].sum() == 0 and out[:, 9].sum() == 0
    tl = BadNetsTrigger(size=2, position="top-left", margin=0).apply(np.zeros((1, 5, 5),
                                                                             np.uint8))
    assert tl[0, :2, :2].min() == 255 and tl.sum() == 4 * 255
    chk = BadNetsTrigger(size=2, pattern="checker", margin=0, position=(0, 0)).apply(
        np.zeros((1, 4, 4), np.float32))
    assert chk[0, :2, :2].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ConfigError, match="does not fit"):
        BadNetsTrigger(size=6).apply(np.zeros((1, 5, 5), np.uint8))


def test_badnets_all_to_one_ground_truth(grey: LabeledData) -> None:
    p = badnets(grey, rate=0.1, target=2, seed=1, test=grey)
    assert p.is_poison.sum() == 20
    assert (p.data.y[p.is_poison] == 2).all() and (p.original_y[p.is_poison] != 2).all()
    assert (p.data.y[~p.is_poison] == grey.y[~p.is_poison]).all()
    assert (p.data.x[p.is_poison][:, 6:9, 6:9] == 255).all()
    assert (p.data.x[~p.is_poison] == grey.x[~p.is_poison]).all()
    assert (p.test_triggered.y == 2).all() and len(p.test_triggered) == (grey.y != 2).sum()
    again = badnets(grey, rate=0.1, target=2, seed=1)
    assert (again.is_poison == p.is_poison).all()


def test_all_to_all_and_blend(grey: LabeledData) -> None:
    p = blended(grey, rate=0.2, mode="all-to-all", target=None, alpha=0.2, test=grey)
    src = p.original_y[p.is_poison]
    assert (p.data.y[p.is_poison] == (src + 1) % 4).all()
    diff = np.abs(p.data.x[p.is_poison].astype(int) - grey.x[p.is_poison].astype(int))
    assert diff.max() > 0
    pat = BlendTrigger(alpha=0.5)._pattern(grey.x)
    expect = np.clip(np.rint(0.5 * grey.x[0] + 0.5 * pat), 0, 255)
    assert (BlendTrigger(alpha=0.5).apply(grey.x[:1])[0] == expect).all()


def test_label_flip(grey: LabeledData) -> None:
    p = label_flip(grey, rate=0.25, seed=3)
    assert (p.data.y[p.is_poison] != grey.y[p.is_poison]).all()
    assert p.test_triggered is None


@pytest.mark.parametrize("kwargs,match", [
    ({"rate": 0.0}, "poison rate"), ({"rate": 1.5}, "poison rate"),
    ({"target": 9}, "target"), ({"mode": "many"}, "mode"),
])
def test_attack_errors(grey: LabeledData, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        badnets(grey, **{"rate": 0.1, "target": 0, **kwargs})
