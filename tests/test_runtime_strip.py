"""STRIP core: calibration at a target FRR, flags on an input-agnostic trigger (every blend and
statistic, and the default cut+mix union), logits vs probabilities, save/load (and format-1
calibrations), cut masks, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from poisonguard.errors import ConfigError, DataError
from poisonguard.models.adapter import InputSpec, TorchClassifier
from poisonguard.runtime.strip import (
    StripConfig,
    StripFilter,
    conformal_threshold,
    cut_masks,
    evaluate,
    validate_inputs,
)


class Backdoored(nn.Module):
    """A linear 10-class model on 8x8 images with a planted trigger: pixel (7, 7) lit -> class 0
    with a large margin, whatever else is in the image."""

    def __init__(self, softmax: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(64, 10, generator=g) * 0.3, requires_grad=False)
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        logits = flat @ self.w
        logits[:, 0] = logits[:, 0] + 40.0 * flat[:, 63]
        return torch.softmax(logits, 1) if self.softmax else logits


def make_clf(softmax: bool = False) -> TorchClassifier:
    return TorchClassifier(Backdoored(softmax), InputSpec(layout="nchw", scale=1 / 255),
                           n_classes=10)


def clean_images(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).integers(0, 256, (n, 8, 8)).astype(np.uint8)
    x[:, 7, 7] = 0
    return x


def trigger(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, 7, 7] = 255
    return out


@pytest.fixture(scope="module")
def calibrated() -> StripFilter:
    return StripFilter.calibrate(make_clf(), clean_images(420), StripConfig(n_blends=10))


def test_calibration_respects_target_frr(calibrated: StripFilter) -> None:
    cal = calibrated.calibration
    assert cal is not None and cal.n_calibration == 400  # 20 of 420 form the pool (cut: 2 x 10)
    assert cal.config.blend == "cut+mix" and set(cal.thresholds) == {"cut", "mix"}
    assert cal.config.statistic == "log-odds" and len(calibrated.pool) == 20
    assert StripConfig(statistic="auto").statistic_for("cut") == "probability"
    assert StripConfig(statistic="auto").statistic_for("mix") == "log-odds"
    assert cal.achieved_frr <= 0.01
    held_out = calibrated.screen(clean_images(500, seed=1))
    assert held_out.suspicious.mean() <= 0.03


def test_trigger_is_flagged(calibrated: StripFilter) -> None:
    x = clean_images(200, seed=2)
    clean, trig = calibrated.screen(x), calibrated.screen(trigger(x))
    assert (trig.prediction == 0).all()
    assert trig.suspicious.mean() >= 0.99
    assert np.all(trig.score > clean.score.min())
    ev = evaluate(clean, trig)
    assert ev["far"] <= 0.01 and ev["frr"] <= 0.05
    assert sum(ev["histogram"]["clean"]) == 200 == sum(ev["histogram"]["triggered"])


@pytest.mark.parametrize(("blend", "statistic"), [("add", "entropy"), ("mix", "entropy"),
                                                  ("cut", "log-odds"), ("cut+add", "log-odds")])
def test_each_blend_flags_the_trigger(blend: str, statistic: str) -> None:
    filt = StripFilter.calibrate(make_clf(), clean_images(320),
                                 StripConfig(n_blends=8, blend=blend, statistic=statistic))
    assert filt.calibration.achieved_frr <= 0.01
    x = clean_images(100, seed=4)
    ev = evaluate(filt.screen(x), filt.screen(trigger(x)))
    assert ev["far"] <= 0.02 and ev["frr"] <= 0.05


@pytest.mark.parametrize("statistic", ["auto", "probability", "log-odds", "entropy"])
def test_probability_outputs_match_logits(statistic: str) -> None:
    x = clean_images(250)
    cfg = StripConfig(n_blends=5, statistic=statistic)
    a = StripFilter.calibrate(make_clf(), x, cfg)
    b = StripFilter.calibrate(make_clf(softmax=True), x, cfg)
    assert b.calibration.model["outputs"] == "probabilities"
    assert a.calibration.model["outputs"] == "logits"
    ra, rb = a.screen(x[:20]), b.screen(x[:20])
    np.testing.assert_allclose(ra.entropy, rb.entropy, atol=1e-4)
    for t in ra.stats:
        np.testing.assert_allclose(ra.stats[t], rb.stats[t], rtol=1e-3, atol=1e-2)


def test_save_load_roundtrip(calibrated: StripFilter, tmp_path) -> None:  # noqa: ANN001
    calibrated.save(tmp_path)
    loaded = StripFilter.load(tmp_path, make_clf())
    assert loaded.threshold == calibrated.threshold
    assert loaded.config == calibrated.config
    x = trigger(clean_images(30, seed=3))
    np.testing.assert_array_equal(loaded.screen(x).suspicious, calibrated.screen(x).suspicious)
    with np.load(tmp_path / "strip_pool.npz", allow_pickle=False) as arc:
        assert arc["pool"].shape == (20, 8, 8) and arc["masks"].shape == (20, 8, 8)


def test_format1_calibration_loads_as_entropy_test(tmp_path) -> None:  # noqa: ANN001
    import json

    old = StripFilter.calibrate(make_clf(), clean_images(320),
                                StripConfig(n_blends=8, blend="add", statistic="entropy"))
    old.save(tmp_path)
    meta = json.loads((tmp_path / "strip.json").read_text())
    meta["threshold"] = -meta.pop("thresholds")["add"]  # format 1: bits, flagged below
    for key in ("statistic", "cut_area", "clean_stats"):
        meta.pop(key)
    (tmp_path / "strip.json").write_text(json.dumps(meta))
    loaded = StripFilter.load(tmp_path, make_clf())
    assert loaded.config.statistic == "entropy" and loaded.threshold == old.threshold
    x = trigger(clean_images(30, seed=3))
    np.testing.assert_array_equal(loaded.screen(x).suspicious, old.screen(x).suspicious)


def test_cut_masks_cover_the_requested_area() -> None:
    for shape in [(28, 28), (32, 32, 3), (3, 32, 32), (100,)]:
        m = cut_masks(shape, 20, 0.75, seed=0)
        assert m.shape == (20, *shape) and set(np.unique(m)) <= {0.0, 1.0}
        assert abs(m.mean() - 0.75) < 0.08
        np.testing.assert_array_equal(m, cut_masks(shape, 20, 0.75, seed=0))
    hwc = cut_masks((32, 32, 3), 4, 0.5, seed=1)
    assert (hwc[..., 0] == hwc[..., 2]).all()
    with pytest.raises(ConfigError, match="cut_area"):
        StripConfig(cut_area=1.0)
    with pytest.raises(ConfigError, match="blend"):
        StripConfig(blend="cut+cut")


def test_load_refuses_garbage(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="no STRIP calibration"):
        StripFilter.load(tmp_path, make_clf())
    (tmp_path / "strip.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        StripFilter.load(tmp_path, make_clf())


def test_chunking_does_not_change_results() -> None:
    x = clean_images(250)
    big = StripFilter.calibrate(make_clf(), x, StripConfig(n_blends=5))
    small = StripFilter(make_clf(), big.pool, StripConfig(n_blends=5, chunk=7), big.calibration)
    np.testing.assert_allclose(big.screen(x[:40]).entropy, small.screen(x[:40]).entropy,
                               atol=1e-5)
    np.testing.assert_allclose(big.screen(x[:40]).score, small.screen(x[:40]).score,
                               atol=1e-4)


def test_validation_messages(calibrated: StripFilter) -> None:
    with pytest.raises(DataError, match=r"shape \(3, 9, 8\)"):
        calibrated.screen(np.zeros((3, 9, 8)))
    bad = np.zeros((2, 8, 8))
    bad[1, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        calibrated.screen(bad)
    with pytest.raises(DataError, match="not numeric"):
        validate_inputs(np.array([["a"] * 8] * 8), (8, 8))
    with pytest.raises(DataError, match="values span"):
        calibrated.screen(np.full((8, 8), 300.0))
    one = calibrated.screen(np.zeros((8, 8)))
    assert len(one) == 1


def test_too_little_calibration_data() -> None:
    with pytest.raises(DataError, match="at least"):
        StripFilter.calibrate(make_clf(), clean_images(50), StripConfig(n_blends=10))


def test_accelerated_cnn_matches_eager() -> None:
    from poisonguard.models.architectures import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(1, 10, width=4, embed_dim=16, pools=0).eval()
    clf = TorchClassifier(model, InputSpec(layout="nchw", scale=1 / 255), n_classes=10)
    x = clean_images(40)
    fast = StripFilter(clf, x[:10], StripConfig(n_blends=5))
    slow = StripFilter(clf, x[:10], StripConfig(n_blends=5), accelerate=False)
    assert fast._fast is not None and slow._fast is None
    np.testing.assert_allclose(fast.screen(x).entropy, slow.screen(x).entropy, atol=1e-4)


def test_cut_blends_and_format2_calibration(tmp_path) -> None:  # noqa: ANN001
    import json

    cfg = StripConfig(n_blends=6, cut_blends=9, statistic="log-odds")
    assert cfg.blends_for("cut") == 9 and cfg.blends_for("mix") == 6 and cfg.pool_size == 9
    assert StripConfig(n_blends=6).pool_size == 12 and StripConfig(blend="mix").pool_size == 20
    with pytest.raises(ConfigError, match="cut_blends"):
        StripConfig(cut_blends=0)
    with pytest.raises(ConfigError, match="needs 9"):
        StripFilter(make_clf(), clean_images(6), cfg)
    # a format-2 file (one pool for both tests, no cut_blends) loads with cut_blends = n_blends
    old = StripFilter.calibrate(make_clf(), clean_images(320),
                                StripConfig(n_blends=8, cut_blends=8, statistic="log-odds"))
    old.save(tmp_path)
    meta = json.loads((tmp_path / "strip.json").read_text())
    meta["format_version"] = 2
    meta.pop("cut_blends")
    (tmp_path / "strip.json").write_text(json.dumps(meta))
    loaded = StripFilter.load(tmp_path, make_clf())
    assert loaded.config.blends_for("cut") == 8 and loaded.threshold == old.threshold
    x = trigger(clean_images(30, seed=3))
    np.testing.assert_array_equal(loaded.screen(x).suspicious, old.screen(x).suspicious)
    meta["format_version"] = 99
    (tmp_path / "strip.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="newer"):
        StripFilter.load(tmp_path, make_clf())


def test_conformal_threshold() -> None:
    v = np.arange(199, -1, -1, dtype=float)  # 0..199, unsorted
    # rank ceil(201 * 0.99) = 199 -> value 198: 1 of 200 above, expected FRR 2/201 <= 1%
    assert conformal_threshold(v, 0.01) == 198.0
    assert conformal_threshold(v, 0.0) > 199.0 and conformal_threshold(v[:50], 0.01) > 49.0
    with pytest.raises(DataError, match="no calibration"):
        conformal_threshold(np.zeros(0), 0.01)
