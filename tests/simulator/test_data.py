"""Federated datasets: shards are pure functions of (parameters, seed, client id)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simulator.config.schema import DataConfig
from simulator.data.base import ClientShard, Split, build_shards, eval_client_ids
from simulator.data.builtin import Sinusoid, Synthetic
from simulator.data.registry import make_dataset
from simulator.rng import generator


def _same(a: ClientShard, b: ClientShard) -> bool:
    return all(torch.equal(s, t) for s, t in [(a.support.x, b.support.x), (a.support.y, b.support.y),
                                              (a.query.x, b.query.x), (a.query.y, b.query.y)])


SIN = DataConfig(name="sinusoid", shots=10, query=15)
SYN = DataConfig(name="synthetic", samples_per_client=40, test_fraction=0.25)


@pytest.mark.parametrize("cfg", [SIN, SYN], ids=["sinusoid", "synthetic"])
def test_shard_is_a_pure_function_of_params_seed_and_client(cfg):
    a, b = make_dataset(cfg, seed=3), make_dataset(cfg, seed=3)
    s1 = a.shard(5)
    a.shard(6)  # drawing another client in between changes nothing
    assert _same(s1, a.shard(5))
    assert _same(s1, b.shard(5))
    assert s1.client_id == 5
    assert not torch.equal(s1.support.x, a.shard(6).support.x)                # different clients differ
    assert not torch.equal(s1.support.x, make_dataset(cfg, seed=4).shard(5).support.x)  # different seeds


def test_make_dataset_types_and_unknown_name():
    assert isinstance(make_dataset(SIN, 0), Sinusoid)
    assert isinstance(make_dataset(SYN, 0), Synthetic)
    with pytest.raises(ValueError, match="mnist"):
        make_dataset(DataConfig(name="mnist"), 0)


@pytest.mark.parametrize("seed", [0, 7])
def test_sinusoid_shapes_and_targets(seed):
    ds = Sinusoid(SIN, seed)
    assert (ds.task, ds.input_dim, ds.output_dim) == ("regression", 1, 1)
    amplitudes = []
    for cid in range(8):
        shard = ds.shard(cid)
        assert shard.support.x.shape == (10, 1) and shard.support.y.shape == (10, 1)
        assert shard.query.x.shape == (15, 1) and shard.query.y.shape == (15, 1)
        assert shard.support.x.dtype == torch.float32 and shard.support.y.dtype == torch.float32
        assert shard.num_samples == 25 == ds.num_samples(cid)
        x = torch.cat([shard.support.x, shard.query.x]).double().numpy()[:, 0]
        y = torch.cat([shard.support.y, shard.query.y]).double().numpy()[:, 0]
        assert x.min() >= -5.0 and x.max() <= 5.0
        # y = A sin(x - p) = a sin x + b cos x with a = A cos p, b = -A sin p
        basis = np.stack([np.sin(x), np.cos(x)], axis=1)
        (a, b), *_ = np.linalg.lstsq(basis, y, rcond=None)
        amplitude, phase = np.hypot(a, b), np.arctan2(-b, a)
        assert 0.1 - 1e-5 <= amplitude <= 5.0 + 1e-5
        assert -1e-5 <= phase <= np.pi + 1e-5
        np.testing.assert_allclose(amplitude * np.sin(x - phase), y, atol=1e-5)
        amplitudes.append(amplitude)
    assert len({round(a, 6) for a in amplitudes}) == len(amplitudes)  # every client is its own task


def test_split_and_shard_helpers():
    split = Split(torch.zeros(4, 2), torch.zeros(4))
    assert len(split) == 4
    shard = ClientShard(1, split, Split(torch.zeros(3, 2), torch.zeros(3)))
    assert shard.num_samples == 7
    moved = shard.to(torch.device("cpu"))
    assert moved.client_id == 1 and torch.equal(moved.query.x, shard.query.x)


def test_synthetic_shapes_and_labels():
    ds = Synthetic(SYN, 0)
    assert (ds.task, ds.input_dim, ds.output_dim) == ("classification", 60, 10)
    for cid in range(5):
        shard = ds.shard(cid)
        assert shard.support.x.shape == (30, 60) and shard.query.x.shape == (10, 60)
        assert shard.support.y.shape == (30,) and shard.query.y.shape == (10,)
        assert shard.support.x.dtype == torch.float32
        assert shard.support.y.dtype == torch.long and shard.query.y.dtype == torch.long
        labels = torch.cat([shard.support.y, shard.query.y])
        assert int(labels.min()) >= 0 and int(labels.max()) <= 9
        assert ds.num_samples(cid) == 40 == shard.num_samples


@pytest.mark.parametrize(
    ("n", "fraction", "n_test"),
    [(40, 0.25, 10), (50, 0.2, 10), (10, 0.1, 1), (10, 0.01, 1), (2, 0.9, 1), (3, 0.5, 2), (7, 0.3, 2)],
)
def test_synthetic_split_sizes_follow_test_fraction(n, fraction, n_test):
    ds = Synthetic(DataConfig(name="synthetic", samples_per_client=n, test_fraction=fraction), 1)
    shard = ds.shard(0)
    assert len(shard.query) == n_test
    assert len(shard.support) == n - n_test


def test_synthetic_lognormal_sizes():
    ds = Synthetic(DataConfig(name="synthetic", samples_per_client=0), 2)
    sizes = []
    for cid in range(12):
        shard = ds.shard(cid)
        n = ds.num_samples(cid)
        assert n == len(shard.support) + len(shard.query) == shard.num_samples
        assert n >= 50
        assert len(shard.query) == round(n * 0.2)
        sizes.append(n)
    assert len(set(sizes)) > 1  # sizes vary across clients
    assert Synthetic(DataConfig(name="synthetic", samples_per_client=0), 2).num_samples(3) == sizes[3]


def _fedprox_draws(cfg: DataConfig, seed: int, cid: int) -> tuple[np.ndarray, np.ndarray]:
    """FedProx's Synthetic(alpha, beta) client generator written out draw by draw (Li et al. 2020, Sec. 5.1; its
    ``generate_synthetic``): u, B scalars, v, W, b, then x ~ N(v, Sigma), y = argmax(W x + b)."""
    rng = generator(seed, "data", 0, cid)
    d, c = 60, 10
    if cfg.iid:
        shared = generator(seed, "data_global")
        w, b, v = shared.normal(0.0, 1.0, (d, c)), shared.normal(0.0, 1.0, c), np.zeros(d)
    else:
        u, big_b = rng.normal(0.0, cfg.alpha), rng.normal(0.0, cfg.beta)
        v = rng.normal(big_b, 1.0, d)
        w, b = rng.normal(u, 1.0, (d, c)), rng.normal(u, 1.0, c)
    n = Synthetic(cfg, seed).num_samples(cid)
    x = v + rng.normal(0.0, 1.0, (n, d)) * np.sqrt(np.arange(1, d + 1, dtype=np.float64) ** -1.2)
    return x.astype(np.float32), np.argmax(x @ w + b, axis=1)


@pytest.mark.parametrize("cfg", [DataConfig(name="synthetic", samples_per_client=50),
                                 DataConfig(name="synthetic", samples_per_client=0, alpha=0.5, beta=2.0),
                                 DataConfig(name="synthetic", samples_per_client=30, alpha=0.0, beta=0.0),
                                 DataConfig(name="synthetic", samples_per_client=40, iid=True)])
def test_synthetic_shards_are_fedprox_draws_bit_for_bit(cfg):
    """The shard's one standard-normal draw gives the values of FedProx's draws made one by one, exactly."""
    ds = Synthetic(cfg, 3)
    for cid in (0, 1, 17, 999):
        x, y = _fedprox_draws(cfg, 3, cid)
        shard = ds.shard(cid)
        assert torch.equal(shard.all.x, torch.from_numpy(x)) and torch.equal(shard.all.y, torch.from_numpy(y))


def test_a_shard_from_rows_is_views_of_its_whole_data():
    x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    shard = ClientShard.from_rows(4, x, y, 4)
    assert torch.equal(shard.support.x, x[:4]) and torch.equal(shard.query.y, y[4:])
    assert shard.all.x is x and shard.all.y is y and shard.shares_rows()
    assert shard.nbytes() == x.nbytes + y.nbytes  # the splits are views of ``all``: counted once
    copied = ClientShard(4, shard.support, shard.query)
    assert torch.equal(copied.all.x, x) and not copied.shares_rows()
    assert copied.nbytes() == 2 * (x.nbytes + y.nbytes)  # ``all`` concatenated: a second copy
    assert shard.to(torch.device("cpu")) is shard  # already there: nothing rebuilt


def _feature_mean_norm(ds: Synthetic, cid: int) -> float:
    shard = ds.shard(cid)
    x = torch.cat([shard.support.x, shard.query.x]).double()
    return float(x.mean(dim=0).norm())


def test_synthetic_iid_versus_non_iid_feature_means():
    iid = Synthetic(DataConfig(name="synthetic", samples_per_client=2000, iid=True), 0)
    non_iid = Synthetic(DataConfig(name="synthetic", samples_per_client=2000, iid=False, beta=1.0), 0)
    for cid in range(4):
        # iid: x ~ N(0, Sigma); the mean of 2000 draws has norm about sqrt(sum j^-1.2 / 2000) ~ 0.05
        assert _feature_mean_norm(iid, cid) < 0.3
        # non-iid: x ~ N(v_k, Sigma) with v_k[j] ~ N(B_k, 1): norm about sqrt(60 (1 + B_k^2)) >= ~6
        assert _feature_mean_norm(non_iid, cid) > 3.0


def test_synthetic_iid_clients_share_one_labelling():
    """iid: one W, b and x ~ N(0, Sigma) for every client, so label frequencies agree up to sampling noise
    (std about 0.01 with 4000 samples); non-iid clients have their own W_k, b_k, v_k and differ."""
    ds = Synthetic(DataConfig(name="synthetic", samples_per_client=4000, iid=True), 0)
    h0 = np.bincount(torch.cat([ds.shard(0).support.y, ds.shard(0).query.y]).numpy(), minlength=10) / 4000
    h1 = np.bincount(torch.cat([ds.shard(1).support.y, ds.shard(1).query.y]).numpy(), minlength=10) / 4000
    assert np.abs(h0 - h1).max() < 0.05
    non = Synthetic(DataConfig(name="synthetic", samples_per_client=4000, iid=False), 0)
    g0 = np.bincount(torch.cat([non.shard(0).support.y, non.shard(0).query.y]).numpy(), minlength=10) / 4000
    g1 = np.bincount(torch.cat([non.shard(1).support.y, non.shard(1).query.y]).numpy(), minlength=10) / 4000
    assert np.abs(g0 - g1).max() > 0.2


def test_eval_client_ids():
    cfg = DataConfig(num_clients=20, eval_clients=5)
    assert eval_client_ids(cfg) == range(20, 25)
    assert list(eval_client_ids(DataConfig(num_clients=3, eval_clients=0))) == []


@pytest.mark.parametrize("ds", [Synthetic(DataConfig(name="synthetic", samples_per_client=0), 5),
                                Synthetic(DataConfig(name="synthetic", samples_per_client=30), 5),
                                Synthetic(DataConfig(name="synthetic", samples_per_client=20, iid=True), 5),
                                Sinusoid(DataConfig(name="sinusoid", shots=5, query=7), 5)])
def test_shards_seeded_together_are_the_shards_one_by_one(ds):
    """Built together (one size: their arithmetic done as one stack), the shards are those built one by one, and
    each holds its own memory (not a view of the stack)."""
    ids = [3, 0, 41, 3, 2**33 + 5, *range(100, 120)]  # a repeat; an id past 32 bits: the bulk seeding falls back
    many = build_shards(ds, ids)
    assert [s.client_id for s in many] == ids
    assert all(_same(a, ds.shard(c)) for a, c in zip(many, ids, strict=True))
    assert all(s.all.x.untyped_storage().nbytes() == s.all.x.nbytes for s in many)
