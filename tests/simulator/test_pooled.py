"""Pooled datasets (gaussian, digits) partitioned over clients: pure shards, a covering partition, skew."""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from simulator.config.schema import ConfigError, DataConfig
from simulator.data.base import ClientShard
from simulator.data.pooled import NOISE_BLOCK, DigitsPool, GaussianPool, make_pooled
from simulator.data.registry import make_dataset
from simulator.experiment import load_config
from simulator.rng import generator

GAUSS = DataConfig(name="gaussian", num_clients=30, eval_clients=6, pool_size=2000)
DIGITS = DataConfig(name="digits", num_clients=40, eval_clients=8)


def _same(a: ClientShard, b: ClientShard) -> bool:
    return all(torch.equal(s, t) for s, t in [(a.support.x, b.support.x), (a.support.y, b.support.y),
                                              (a.query.x, b.query.x), (a.query.y, b.query.y)])


def _max_class_fraction(hist: np.ndarray) -> float:
    return float((hist.max(axis=1) / hist.sum(axis=1)).mean())


@pytest.mark.parametrize("cfg", [GAUSS, DIGITS], ids=["gaussian", "digits"])
def test_shards_are_pure_functions_of_config_seed_and_client(cfg):
    a, b = make_pooled(cfg, seed=3), make_pooled(cfg, seed=3)
    s1 = a.shard(5)
    a.shard(6)
    assert _same(s1, a.shard(5)) and _same(s1, b.shard(5)) and s1.client_id == 5
    assert s1.support.x.dtype == torch.float32 and s1.support.y.dtype == torch.int64
    assert not torch.equal(s1.support.x, make_pooled(cfg, seed=4).shard(5).support.x)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards", "quantity"])
@pytest.mark.parametrize("cfg", [GAUSS, DIGITS], ids=["gaussian", "digits"])
def test_partition_covers_the_pool_and_sizes_match_the_shards(cfg, partition):
    ds = make_pooled(replace(cfg, partition=partition), seed=1)
    total = cfg.num_clients + cfg.eval_clients
    parts = [ds.part(c) for c in range(total)]
    pool = np.concatenate(parts)
    assert np.array_equal(np.sort(pool), np.arange(ds.labels.size))  # disjoint and covering
    assert all(ds.num_samples(c) >= 2 for c in range(total))
    for c in (0, 7, total - 1):
        shard = ds.shard(c)
        assert ds.split_sizes(c) == (len(shard.support), len(shard.query))
        assert ds.num_samples(c) == sum(ds.split_sizes(c)) == shard.num_samples
        assert np.array_equal(np.sort(ds.client_indices(c)), parts[c])
    with pytest.raises(IndexError):
        ds.shard(total)


def test_label_histogram_matches_the_shards():
    ds = make_pooled(replace(GAUSS, partition="dirichlet"), seed=2)
    hist = ds.label_histogram()
    assert hist.dtype == np.int64 and hist.shape == (36, 10)
    assert np.array_equal(hist.sum(axis=1), [ds.num_samples(c) for c in range(36)])
    for c in (0, 11, 35):
        y = ds.shard(c).all.y.numpy()
        assert np.array_equal(np.bincount(y, minlength=10), hist[c])


def test_support_and_query_both_see_the_clients_labels():
    ds = make_pooled(replace(DIGITS, partition="shards", shards_per_client=2), seed=0)
    for c in range(48):
        idx = ds.client_indices(c)
        assert np.array_equal(idx, ds.part(c)[generator(0, "data", 0, c).permutation(idx.size)])
        shard = ds.shard(c)
        assert set(shard.query.y.tolist()) <= set(shard.support.y.tolist())


@pytest.mark.parametrize("cfg", [GAUSS, DIGITS], ids=["gaussian", "digits"])
def test_dirichlet_and_shards_skew_the_labels(cfg):
    iid = _max_class_fraction(make_pooled(cfg, 0).label_histogram())
    skewed = _max_class_fraction(make_pooled(replace(cfg, partition="dirichlet", dirichlet_alpha=0.1), 0)
                                 .label_histogram())
    assert skewed > iid + 0.2
    hist = make_pooled(replace(cfg, partition="shards", shards_per_client=2), 0).label_histogram()
    assert (hist > 0).sum(axis=1).max() <= 4  # 2 shards, each spanning at most 2 classes


def test_gaussian_features_are_a_pure_function_of_the_pool_index():
    a = make_pooled(GAUSS, seed=5)
    b = make_pooled(replace(GAUSS, partition="shards"), seed=5)  # same pool, other partition
    assert np.array_equal(a.labels, b.labels)
    i = int(a.part(2)[0])
    cb = int(np.searchsorted(b.offsets, np.flatnonzero(b.order == i)[0], side="right") - 1)
    xa, xb = a.shard(2).all.x.numpy(), b.shard(cb).all.x.numpy()
    row_a, row_b = np.flatnonzero(a.client_indices(2) == i)[0], np.flatnonzero(b.client_indices(cb) == i)[0]
    assert np.array_equal(xa[row_a], xb[row_b])
    # and equals mean + the full noise block's row, however few rows a shard drew
    idx = a.client_indices(2)
    blocks = {blk: generator(5, "data", 1, blk).standard_normal((NOISE_BLOCK, GAUSS.features), dtype=np.float32)
              for blk in set((idx // NOISE_BLOCK).tolist())}
    expect = np.stack([blocks[j // NOISE_BLOCK][j % NOISE_BLOCK] for j in idx.tolist()])
    expect += a.means[a.labels[idx]].astype(np.float32)
    assert np.array_equal(xa, expect)


def test_gaussian_sizes_and_errors():
    ds = make_pooled(DataConfig(name="gaussian", num_clients=8, eval_clients=2, num_classes=3, features=5), 0)
    assert isinstance(ds, GaussianPool) and (ds.input_dim, ds.output_dim) == (5, 3)
    assert ds.labels.size == 500 and ds.labels.nbytes <= 4 * 500  # 50 per client; labels only
    with pytest.raises(ConfigError, match="data.pool_size"):
        make_pooled(replace(GAUSS, pool_size=50), 0)
    with pytest.raises(ConfigError, match="data.shards_per_client"):
        make_pooled(replace(GAUSS, partition="shards", shards_per_client=100), 0)
    # extreme skew on a tight pool: the partitioner repairs its draw so every client has 2 samples
    tight = make_pooled(replace(GAUSS, pool_size=80, partition="dirichlet", dirichlet_alpha=0.01), 0)
    assert min(tight.num_samples(c) for c in range(tight.num_clients_total)) >= 2


def test_digits_shapes_values_and_errors(monkeypatch):
    ds = make_pooled(DIGITS, 0)
    assert isinstance(ds, DigitsPool) and (ds.task, ds.input_dim, ds.output_dim) == ("classification", 64, 10)
    assert ds.labels.size == 1797 and set(np.unique(ds.labels).tolist()) == set(range(10))
    x = ds.shard(0).all.x
    assert x.shape[1] == 64 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    with pytest.raises(ConfigError, match="data.num_clients"):
        make_pooled(replace(DIGITS, num_clients=2000), 0)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ConfigError, match="scikit-learn"):
        make_pooled(DIGITS, 0)


def test_end_to_end_through_config():
    cfg = load_config(None, ['data.name="gaussian"', "data.num_clients=20", "data.eval_clients=4",
                             "clients.per_round=5", "eval.clients=4"])
    ds = make_dataset(cfg.data, cfg.seed)
    assert isinstance(ds, GaussianPool) and ds.label_histogram().shape == (24, 10)
    shard = ds.shard(23)
    assert shard.support.x.shape == (40, 20) and shard.query.x.shape == (10, 20)
