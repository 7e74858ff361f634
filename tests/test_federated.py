"""Federated defences: aggregators, naming of an outlier client, update validation, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from poisonguard.cli import main
from poisonguard.errors import ConfigError, DataError
from poisonguard.federated import FederatedServer, UpdateLayout, stack_updates
from poisonguard.federated import aggregators as agg


def honest_updates(n: int = 9, d: int = 200, seed: int = 0, spread: float = 0.5) -> np.ndarray:
    """Clients pulling the same way: a shared direction plus per-client noise."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, d)
    return base + spread * rng.normal(0, 1, (n, d))


def as_dict(u: np.ndarray) -> dict[str, np.ndarray]:
    return {f"c{i}": row for i, row in enumerate(u)}


def test_fedavg_is_weighted_mean() -> None:
    u = honest_updates(4, 10)
    w = np.array([1.0, 1.0, 2.0, 0.0]) / 4
    out = agg.fedavg(u, w)
    assert np.allclose(out.update, w @ u)
    assert not out.flags.any() and np.all(out.scores == 0)


def test_clip_bounds_norms_and_noise() -> None:
    u = honest_updates(5, 20)
    u[0] *= 50
    w = np.full(5, 0.2)
    out = agg.clip(u, w)
    bound = np.median(np.linalg.norm(u, axis=1))
    assert out.rule["bound"] == pytest.approx(bound)
    assert out.scores.argmax() == 0 and out.extras["clipped"][0]
    assert np.linalg.norm(out.update) <= bound + 1e-9
    given = agg.clip(u, w, bound=1.0)
    assert given.rule["bound"] == 1.0
    noisy = agg.clip(u, w, noise=0.1, rng=np.random.default_rng(0))
    assert not np.allclose(noisy.update, out.update)


def test_median_and_trimmed_mean_resist_an_outlier() -> None:
    u = honest_updates(9, 30)
    bad = np.vstack([u, 1000 * np.ones(30)])
    med = agg.median(bad)
    assert np.allclose(med.update, np.median(bad, axis=0))
    assert med.scores.argmax() == 9
    tm = agg.trimmed_mean(bad, 0.1)
    assert tm.rule["k"] == 1
    s = np.sort(bad, axis=0)[1:-1].mean(0)
    assert np.allclose(tm.update, s)
    assert tm.scores[9] == pytest.approx(1.0)  # trimmed at every coordinate
    assert np.abs(tm.update).max() < 10


def test_trimmed_mean_refuses_to_trim_everything() -> None:
    with pytest.raises(DataError, match="leaves none"):
        agg.trimmed_mean(honest_updates(2, 5), 0.4)
    with pytest.raises(ConfigError):
        agg.trim_count(10, 0.5)


def test_krum_drops_the_outlier() -> None:
    u = np.vstack([honest_updates(9, 30), 20 * np.ones(30)])
    out = agg.krum(u, f=1)
    assert out.flags[9] and out.flags.sum() == 1
    assert np.allclose(out.update, u[:9].mean(0))
    single = agg.krum(u, f=1, m=1)
    assert (~single.flags).sum() == 1 and not single.flags[:9].all()
    with pytest.raises(DataError, match="needs at least 7"):
        agg.krum(u[:6], f=2)


@pytest.mark.parametrize("kind", ["scaled", "direction", "backdoor"])
def test_cluster_names_the_outlier(kind: str) -> None:
    u = honest_updates(9, 200)
    rng = np.random.default_rng(1)
    if kind == "scaled":  # model replacement: an honest-looking update times n
        bad = 10 * (u.mean(0) + 0.5 * rng.normal(0, 1, 200))
    elif kind == "direction":  # same norm, unrelated direction
        bad = rng.normal(0, 1, 200)
        bad *= np.linalg.norm(u[0]) / np.linalg.norm(bad)
    else:  # honest pull plus a strong extra component
        bad = u.mean(0) + 2.0 * rng.normal(0, 1, 200)
    all_u = np.vstack([u, bad])
    out = agg.cluster(all_u, np.full(10, 0.1))
    assert out.flags[9] and out.flags.sum() == 1
    assert out.scores.argmax() == 9 and out.scores[9] > out.threshold
    assert np.linalg.norm(out.update) < 2 * np.linalg.norm(u.mean(0))


def test_cluster_names_no_one_among_honest_clients() -> None:
    out = agg.cluster(honest_updates(10, 200), np.full(10, 0.1))
    assert not out.flags.any()


def test_cluster_never_names_a_majority() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(0, 1, (7, 50)) * np.array([1, 1, 1, 10, 10, 10, 10])[:, None]
    out = agg.cluster(u, np.full(7, 1 / 7))
    assert out.flags.sum() <= 3
    with pytest.raises(DataError, match="at least 3"):
        agg.cluster(u[:2], np.full(2, 0.5))


def test_server_round_trip_with_state_dicts_and_tensors() -> None:
    rng = np.random.default_rng(0)
    shapes = {"w": (3, 4), "b": (4,)}
    base = {k: rng.normal(0, 1, s) for k, s in shapes.items()}
    updates = {f"c{i}": {k: torch.tensor(v + 0.1 * rng.normal(0, 1, v.shape))
                         for k, v in base.items()} for i in range(9)}
    updates["evil"] = {k: 30 * torch.tensor(v) for k, v in base.items()}
    server = FederatedServer("cluster")
    res = server.aggregate(updates, weights={c: 10 for c in updates})
    assert res.named == ["evil"]
    assert set(res.update) == {"w", "b"} and res.update["w"].shape == (3, 4)
    assert res.verdict.scores.shape == (10,) and res.verdict.flags.sum() == 1
    assert res.scores["evil"] == max(res.scores.values())
    json.dumps(res.summary())
    assert res.round == 1
    again = server.aggregate({c: {k: v.numpy() for k, v in u.items()}
                              for c, u in updates.items()})
    assert again.round == 2


@pytest.mark.parametrize("defense", ["fedavg", "clip", "median", "trimmed", "krum", "cluster"])
def test_server_every_defense_on_flat_vectors(defense: str) -> None:
    u = np.vstack([honest_updates(9, 40), 100 * np.ones(40)])
    res = FederatedServer(defense).aggregate(as_dict(u))
    assert res.update.shape == (40,) and np.isfinite(res.update).all()
    assert res.verdict.name == f"federated-{defense}"
    if defense != "fedavg":
        assert np.abs(res.update).max() < 50  # the outlier did not carry the round


def _dict_updates() -> dict[str, dict[str, np.ndarray]]:
    return {f"c{i}": {"w": np.ones((2, 2)) * i, "b": np.ones(2)} for i in range(4)}


@pytest.mark.parametrize("mutate,message", [
    (lambda u: u["c2"].update(w=np.ones((3, 2))), "c2.*'w' has shape"),
    (lambda u: u["c1"].pop("b"), "c1.*missing 1 key"),
    (lambda u: u["c3"].update(extra=np.ones(1)), "c3.*unexpected"),
    (lambda u: u["c0"].update(b=np.array([np.nan, 1.0])), "c0.*NaN or inf"),
    (lambda u: u["c0"].update(b=np.array([np.inf, 1.0])), "c0.*NaN or inf"),
    (lambda u: u["c2"].update(b=np.array(["a", "b"])), "c2.*dtype"),
    (lambda u: u.update(c1=np.ones(6)), "c1.*flat vector"),
])
def test_bad_updates_are_one_line_errors(mutate, message: str) -> None:
    updates = _dict_updates()
    mutate(updates)
    with pytest.raises(DataError, match=message) as info:
        FederatedServer("fedavg").aggregate(updates)
    assert "\n" not in str(info.value)


def test_later_rounds_must_match_the_first_layout() -> None:
    server = FederatedServer("median")
    server.aggregate(as_dict(np.ones((3, 5))))
    with pytest.raises(DataError, match="shape \\(6,\\), expected \\(5,\\)"):
        server.aggregate(as_dict(np.ones((3, 6))))
    with pytest.raises(DataError, match="state dict"):
        server.aggregate({"a": {"w": np.ones(5)}, "b": {"w": np.ones(5)}})


def test_bad_rounds_and_options() -> None:
    with pytest.raises(DataError, match="no client updates"):
        FederatedServer().aggregate({})
    with pytest.raises(DataError, match="mapping"):
        FederatedServer().aggregate([np.ones(3)])
    with pytest.raises(DataError, match="1-D"):
        FederatedServer().aggregate({"a": np.ones((2, 2)), "b": np.ones((2, 2))})
    with pytest.raises(DataError, match="empty mapping"):
        FederatedServer().aggregate({"a": {}, "b": {}})
    with pytest.raises(DataError, match="no weight for client 'b'"):
        FederatedServer("fedavg").aggregate(as_dict(np.ones((2, 3))) | {"b": np.ones(3)},
                                            weights={"c0": 1, "c1": 1})
    with pytest.raises(ConfigError, match="unknown defense"):
        FederatedServer("mean")
    with pytest.raises(ConfigError):
        FederatedServer("clip", clip_norm=-1)


def test_layout_unflatten_inverts_flatten() -> None:
    upd = {"a": np.arange(6.0).reshape(2, 3), "b": np.array([7.0])}
    layout = UpdateLayout.of("x", upd)
    vec = layout.flatten("x", upd)
    back = layout.unflatten(vec)
    assert np.array_equal(back["a"], upd["a"]) and np.array_equal(back["b"], upd["b"])
    ids, m, _ = stack_updates({1: upd, 2: upd})
    assert ids == ["1", "2"] and m.shape == (2, 7)


@pytest.fixture()
def tiny_root(tmp_path):
    """A fake MNIST in the shared-datasets layout: random digits, a little class signal."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 700).astype(np.int64)
    x = rng.integers(0, 60, (700, 28, 28)).astype(np.uint8)
    x[np.arange(700), 2 * y + 2, 5:20] = 255
    (tmp_path / "mnist").mkdir()
    np.savez(tmp_path / "mnist" / "mnist.npz", x_train=x[:500], y_train=y[:500],
             x_test=x[500:], y_test=y[500:])
    return tmp_path


def test_cli_simulation_writes_a_report(tiny_root, tmp_path, capsys) -> None:
    out = tmp_path / "fed"
    code = main(["federated", "--data-root", str(tiny_root), "--clients", "5",
                 "--samples-per-client", "80", "--rounds", "3", "--attack-start", "2",
                 "--attack", "replace", "--defense", "cluster", "--test-size", "100",
                 "--quiet", "--threads", "1", "--out", str(out)])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["rounds"]) == 3 and rep["malicious"]
    assert [r["attacking"] for r in rep["rounds"]] == [False, True, True]
    assert rep["summary"]["named_rate"] == 1.0
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--clients", "2"], "--clients must be >= 3"),
    (["--malicious", "5"], "--malicious must be in 0..4"),
    (["--rounds", "3", "--attack-start", "4"], "--attack-start must be in 1..3"),
    (["--attack", "data", "--malicious", "0"], "needs --malicious >= 1"),
    (["--defense", "trimmed", "--trim-fraction", "0.6"], "trim fraction"),
    (["--defense", "krum", "--krum-f", "4"], "needs at least 11 clients"),
    (["--samples-per-client", "100000"], "exceeds"),
    (["--poison-fraction", "1.5"], "--poison-fraction"),
])
def test_cli_bad_input_exits_2(argv, message: str, tiny_root, tmp_path, capsys) -> None:
    code = main(["federated", "--data-root", str(tiny_root), "--out", str(tmp_path / "o"),
                 "--threads", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o" / "report.json").exists()


def test_cli_missing_data_root_exits_2(tmp_path, capsys) -> None:
    code = main(["federated", "--data-root", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o"), "--threads", "1"])
    assert code == 2 and "found neither" in capsys.readouterr().err
