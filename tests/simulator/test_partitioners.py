"""Partitioners: disjoint, covering, seeded splits of a pooled dataset, and their skew properties."""

from __future__ import annotations

import numpy as np
import pytest

from simulator import rng as rng_module
from simulator.data.partitioners import (
    PARTITION_PURPOSE_ID,
    PARTITIONERS,
    dirichlet,
    iid,
    label_histogram,
    partition,
    partition_generator,
    quantity,
    shards,
)

LABELS = np.repeat(np.arange(10), 30)  # 300 samples, 10 balanced classes, sorted by label

CASES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("dirichlet", {"alpha": 0.1, "min_size": 5}),
    ("shards", {"shards_per_client": 2}),
    ("quantity", {"sigma": 1.0}),
    ("quantity", {"sigma": 2.0, "min_size": 3}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in params.items()) or 'default'}" for name, params in CASES]


def _gen(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 9, 0, 0])))


def _assert_valid(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert isinstance(p, np.ndarray) and p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0)  # strictly increasing: sorted, no repeats within a client
    union = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(union, np.arange(n))  # disjoint across clients and covering


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
@pytest.mark.parametrize("labels", [LABELS, np.random.default_rng(1).permutation(LABELS)], ids=["sorted", "shuffled"])
def test_partitions_are_disjoint_sorted_covering_and_seeded(name, params, labels):
    parts = partition(name, labels, 12, seed=3, **params)
    _assert_valid(parts, len(labels), 12)
    again = partition(name, labels, 12, seed=3, **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(name, labels, 12, seed=4, **params)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize(("name", "params"), CASES, ids=IDS)
def test_partition_uses_the_reserved_partition_stream(name, params):
    direct = PARTITIONERS[name](LABELS, 7, _gen(11), **params)
    via = partition(name, LABELS, 7, seed=11, **params)
    assert all(np.array_equal(a, b) for a, b in zip(direct, via, strict=True))
    assert partition_generator(11).integers(1 << 62) == _gen(11).integers(1 << 62)


def test_partition_purpose_id_does_not_collide_with_rng_purposes():
    assert PARTITION_PURPOSE_ID == 9
    others = {v for k, v in rng_module.PURPOSES.items() if k != "partition"}
    assert PARTITION_PURPOSE_ID not in others
    assert rng_module.PURPOSES["partition"] == PARTITION_PURPOSE_ID


def test_partition_dispatch_and_unknown_name():
    assert PARTITIONERS == {"iid": iid, "dirichlet": dirichlet, "shards": shards, "quantity": quantity}
    with pytest.raises(ValueError, match=r"'nope'.*dirichlet.*iid.*quantity.*shards"):
        partition("nope", LABELS, 4, seed=0)


# ---- iid -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "num_clients"), [(300, 12), (301, 12), (17, 17), (1000, 7)])
def test_iid_sizes_differ_by_at_most_one(n, num_clients):
    labels = np.zeros(n, dtype=np.int64)
    parts = iid(labels, num_clients, _gen(0))
    _assert_valid(parts, n, num_clients)
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() - sizes.min() <= (0 if n % num_clients == 0 else 1)
    assert sizes.sum() == n


def test_iid_label_mix_is_roughly_uniform():
    labels = np.repeat(np.arange(10), 100)
    hist = label_histogram(labels, iid(labels, 10, _gen(5)), 10)
    assert np.all(hist.sum(axis=1) == 100)
    # hypergeometric counts: mean 10, sd ~2.9; a split without shuffling would give 100s and 0s
    assert hist.min() >= 1 and hist.max() <= 25


# ---- shards ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True], ids=["sorted", "shuffled"])
def test_shards_give_two_whole_label_shards_per_client(shuffle):
    labels = np.repeat(np.arange(10), 20)  # 200 samples -> 20 shards of 10, two per class
    if shuffle:
        labels = np.random.default_rng(0).permutation(labels)
    parts = shards(labels, 10, _gen(2), shards_per_client=2)
    _assert_valid(parts, 200, 10)
    hist = label_histogram(labels, parts, 10)
    assert np.all(hist.sum(axis=1) == 20)             # 200 samples / 10 clients
    assert np.all((hist > 0).sum(axis=1) <= 2)        # at most two labels per client
    assert np.all(hist % 10 == 0)                     # shards never straddle a label boundary
    assert len({tuple(row) for row in hist}) > 1      # the shard assignment is not the identity cut


def test_shards_are_contiguous_label_sorted_runs():
    labels = np.repeat(np.arange(10), 20)
    for part in shards(labels, 10, _gen(8), shards_per_client=2):
        runs = part.reshape(2, 10)                    # each client: two aligned runs of 10 indices
        assert np.all(runs[:, 0] % 10 == 0)
        assert np.all(np.diff(runs, axis=1) == 1)
        assert all(len(np.unique(labels[r])) == 1 for r in runs)


def test_shards_uneven_sizes_follow_array_split():
    labels = np.arange(23) % 3
    parts = shards(labels, 4, _gen(1), shards_per_client=2)  # 8 shards of sizes 3 (x7) and 2 (x1)
    _assert_valid(parts, 23, 4)
    assert sorted(len(p) for p in parts) == [5, 6, 6, 6]


# ---- dirichlet -------------------------------------------------------------------------------------


def test_dirichlet_large_alpha_is_near_uniform_in_labels():
    labels = np.repeat(np.arange(10), 1000)
    parts = dirichlet(labels, 10, _gen(0), alpha=1e3)
    hist = label_histogram(labels, parts, 10)
    fractions = hist / hist.sum(axis=1, keepdims=True)
    assert np.abs(fractions - 0.1).max() < 0.03  # per-class proportions ~ Dir(1000): sd ~0.003
    # each class's indices are shuffled before the split: no client holds a contiguous run of a class
    for part in parts:
        for c in range(10):
            piece = part[labels[part] == c]
            assert piece[-1] - piece[0] + 1 > len(piece)


def test_dirichlet_small_alpha_is_strongly_skewed():
    labels = np.repeat(np.arange(10), 100)
    parts = dirichlet(labels, 20, _gen(0), alpha=0.05)
    _assert_valid(parts, 1000, 20)
    hist = label_histogram(labels, parts, 10)
    fractions = hist / hist.sum(axis=1, keepdims=True)
    assert fractions.max(axis=1).mean() > 0.6
    # the same split at alpha = 1e3 is nowhere near that skewed
    flat = label_histogram(labels, dirichlet(labels, 20, _gen(0), alpha=1e3), 10)
    assert (flat / flat.sum(axis=1, keepdims=True)).max(axis=1).mean() < 0.3


def test_dirichlet_min_size_is_enforced_by_redrawing():
    labels = np.repeat(np.arange(10), 100)
    unconstrained = dirichlet(labels, 20, _gen(3), alpha=0.5, min_size=0)
    assert min(len(p) for p in unconstrained) < 20  # so the constraint below binds at this seed
    parts = dirichlet(labels, 20, _gen(3), alpha=0.5, min_size=20)
    _assert_valid(parts, 1000, 20)
    assert min(len(p) for p in parts) >= 20


def test_dirichlet_repairs_a_draw_that_never_meets_min_size():
    labels = np.repeat(np.arange(2), 10)  # 20 samples; 10 clients of >= 2 is all but impossible at alpha 0.01
    parts = dirichlet(labels, 10, _gen(0), alpha=0.01, min_size=2)
    _assert_valid(parts, 20, 10)
    assert [len(p) for p in parts] == [2] * 10
    # the repair is deterministic, and cheap at scale where a valid draw never comes
    assert [p.tolist() for p in parts] == [p.tolist() for p in dirichlet(labels, 10, _gen(0), alpha=0.01, min_size=2)]
    big = np.repeat(np.arange(10), 5000)
    parts = dirichlet(big, 10_000, _gen(1), alpha=0.1, min_size=2)
    assert min(len(p) for p in parts) >= 2 and sum(len(p) for p in parts) == 50_000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 50, "alpha": 1.0}, "num_clients"),
        ({"num_clients": 10, "alpha": 1.0, "min_size": 3}, "min_size"),
        ({"num_clients": 4, "alpha": 0.0}, "alpha"),
        ({"num_clients": 4, "alpha": -1.0}, "alpha"),
        ({"num_clients": 4, "alpha": float("nan")}, "alpha"),
        ({"num_clients": 4, "alpha": 1.0, "min_size": -1}, "min_size"),
        ({"num_clients": 0, "alpha": 1.0}, "num_clients"),
    ],
)
def test_dirichlet_rejects_impossible_settings(kwargs, match):
    labels = np.repeat(np.arange(2), 10)  # 20 samples
    with pytest.raises(ValueError, match=match):
        dirichlet(labels, rng=_gen(0), **kwargs)


# ---- quantity --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sigma", "min_size"), [(0.5, 1), (1.0, 1), (2.0, 10), (3.0, 0)])
def test_quantity_sizes_sum_to_n_and_follow_largest_remainder(sigma, min_size):
    n, num_clients = 1003, 20
    labels = np.zeros(n, dtype=np.int64)
    parts = quantity(labels, num_clients, _gen(4), sigma=sigma, min_size=min_size)
    _assert_valid(parts, n, num_clients)
    sizes = np.array([len(p) for p in parts])
    assert sizes.sum() == n and sizes.min() >= min_size
    # the weights are the generator's first draw; each size is its quota rounded down or up
    weights = _gen(4).lognormal(0.0, sigma, num_clients)
    quota = weights / weights.sum() * (n - num_clients * min_size)
    assert np.all(sizes - min_size >= np.floor(quota)) and np.all(sizes - min_size <= np.ceil(quota))


def test_quantity_sigma_zero_is_balanced():
    sizes = [len(p) for p in quantity(np.zeros(1003, dtype=np.int64), 20, _gen(0), sigma=0.0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003


def test_quantity_larger_sigma_spreads_sizes_more():
    labels = np.zeros(10_000, dtype=np.int64)

    def cv(sigma: float) -> float:
        sizes = np.array([len(p) for p in quantity(labels, 50, _gen(6), sigma=sigma)], dtype=float)
        return float(sizes.std() / sizes.mean())

    assert cv(0.0) < 0.01 < cv(0.5) < cv(1.0) < cv(2.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 11, "min_size": 2}, "min_size"),
        ({"num_clients": 21}, "num_clients"),
        ({"num_clients": 4, "sigma": -0.1}, "sigma"),
    ],
)
def test_quantity_rejects_impossible_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantity(np.zeros(20, dtype=np.int64), rng=_gen(0), **kwargs)


# ---- shards and common validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: shards(LABELS, 4, _gen(0), shards_per_client=0), "shards_per_client"),
        (lambda: shards(LABELS, 200, _gen(0), shards_per_client=2), r"num_clients \* shards_per_client"),
        (lambda: iid(LABELS, 301, _gen(0)), "num_clients"),
        (lambda: iid(LABELS.astype(float), 4, _gen(0)), "integer dtype"),
        (lambda: iid(LABELS.reshape(30, 10), 4, _gen(0)), "1-D"),
        (lambda: partition("dirichlet", LABELS, 4, seed=0, alpha=0), "alpha"),
    ],
)
def test_invalid_arguments_raise_value_errors_naming_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- label_histogram -------------------------------------------------------------------------------


def test_label_histogram_exact_counts():
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histogram(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 3)
    np.testing.assert_array_equal(hist, [[1, 1, 0], [0, 1, 3]])
    assert hist.dtype == np.int64
    np.testing.assert_array_equal(label_histogram(labels, [np.array([], dtype=np.int64)], 4), [[0, 0, 0, 0]])


def test_label_histogram_rejects_labels_outside_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        label_histogram(np.array([0, 1, 3]), [np.array([0, 1, 2])], 3)
