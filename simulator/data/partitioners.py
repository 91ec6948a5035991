"""Partitioners: split one pooled labelled dataset over ``num_clients`` clients.

Every partitioner is a pure function of ``(labels, num_clients, rng, its parameters)`` and returns
one sorted ``int64`` index array per client; the arrays are disjoint and together cover every index
``0 .. N-1``. All randomness comes from the ``rng`` passed in (nothing reads global RNG state), so
a partition is reproduced exactly by rebuilding the generator: ``partition`` does that from a run seed.

Partitioners:

- ``iid``: a uniform random split into near-equal parts (the IID baseline of McMahan et al. 2017).
- ``dirichlet``: label skew, each class spread over clients with Dirichlet(alpha) proportions
  (Hsu, Qi & Brown 2019; per-class formulation of Yurochkin et al. 2019 and Li et al. 2021).
- ``shards``: McMahan et al. 2017's pathological non-IID split, a few label-sorted shards per client.
- ``quantity``: quantity skew, log-normal client sizes with IID labels (Li et al. 2021, Sec. 3.2).
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Callable

import numpy as np

from simulator.rng import PURPOSES, generator

#: the purpose id of ``partition``'s generator: SeedSequence([seed, 9, 0, 0])
PARTITION_PURPOSE_ID = PURPOSES["partition"]

#: how many whole partitions ``dirichlet`` draws before repairing the last one to meet ``min_size``
DIRICHLET_MAX_TRIES = 20

Partitioner = Callable[..., list[np.ndarray]]


def _check_common(labels: np.ndarray, num_clients: int) -> tuple[np.ndarray, int, int]:
    """Validate ``labels`` (1-D integers) and ``num_clients`` (1 .. N); return them and N."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
    if isinstance(num_clients, bool):
        raise ValueError(f"num_clients must be an integer, got {num_clients!r}")
    try:
        num_clients = operator.index(num_clients)
    except TypeError:
        raise ValueError(f"num_clients must be an integer, got {num_clients!r}") from None
    n = int(labels.shape[0])
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise ValueError(f"num_clients ({num_clients}) must be <= the number of samples N ({n})")
    return labels, num_clients, n


def _check_min_size(min_size: int, num_clients: int, n: int) -> int:
    min_size = operator.index(min_size)
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_clients * min_size > n:
        raise ValueError(
            f"num_clients * min_size ({num_clients} * {min_size}) must be <= the number of samples N ({n})"
        )
    return min_size


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    """Each client's indices as a sorted int64 array."""
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The IID split of McMahan et al. 2017 ("Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS): shuffle all N indices with one seeded permutation and cut the
    permutation into ``num_clients`` contiguous parts (``np.array_split``), so sizes differ by at most 1.
    """
    labels, num_clients, n = _check_common(labels, num_clients)
    return _finish(np.array_split(rng.permutation(n), num_clients))


def dirichlet(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, alpha: float, min_size: int = 1
) -> list[np.ndarray]:
    """Dirichlet label skew (Hsu, Qi & Brown 2019, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", arXiv:1909.06335).

    Hsu et al. draw each client's class mix from Dir(alpha * p); this uses the per-class formulation
    common in benchmarks (Yurochkin et al. 2019, ICML; Li et al. 2021, "Federated Learning on Non-IID
    Data Silos", arXiv:2102.02079): for each class c present in ``labels`` (ascending), shuffle its
    indices, draw p_c ~ Dir(alpha * 1_num_clients) and split the shuffled indices among the clients
    at ``floor(cumsum(p_c)[:-1] * n_c)``. Small alpha gives clients dominated by few classes; large
    alpha approaches IID label proportions (client sizes stay random).

    If some client gets fewer than ``min_size`` samples, the whole partition is redrawn, continuing
    the same ``rng`` stream. After ``DIRICHLET_MAX_TRIES`` (20) failed draws (at 100,000 clients and
    small alpha a valid draw practically never comes), the last draw is repaired deterministically:
    each short client, in id order, takes the samples it lacks from the end of the currently
    largest client (lowest id on ties), which keeps the skew of everyone else.
    """
    labels, num_clients, n = _check_common(labels, num_clients)
    alpha = float(alpha)
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    min_size = _check_min_size(min_size, num_clients, n)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(num_clients, alpha)
    clients = np.arange(num_clients)
    for _ in range(DIRICHLET_MAX_TRIES):
        owners, members = [], []
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(concentration)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            owners.append(np.repeat(clients, np.diff(cuts, prepend=0, append=len(idx))))
            members.append(idx)
        owner = np.concatenate(owners)
        sizes = np.bincount(owner, minlength=num_clients)
        parts = np.split(np.concatenate(members)[np.argsort(owner, kind="stable")], np.cumsum(sizes)[:-1])
        if sizes.min() >= min_size:
            return _finish(parts)
    return _finish(_top_up(parts, min_size))


def _top_up(parts: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Move samples from the largest clients to those with fewer than ``min_size`` (feasible: checked).

    A heap of donors keeps this O((clients + moves) log clients), so 100,000 clients repair in a moment.
    """
    sizes = [len(p) for p in parts]
    donors = [(-size, k) for k, size in enumerate(sizes) if size > min_size]
    heapq.heapify(donors)
    for k in [k for k, size in enumerate(sizes) if size < min_size]:
        while sizes[k] < min_size:
            _, donor = heapq.heappop(donors)
            take = min(min_size - sizes[k], sizes[donor] - min_size)
            parts[k] = np.concatenate([parts[k], parts[donor][sizes[donor] - take:]])
            parts[donor] = parts[donor][:sizes[donor] - take]
            sizes[k] += take
            sizes[donor] -= take
            if sizes[donor] > min_size:
                heapq.heappush(donors, (-sizes[donor], donor))
    return parts


def shards(labels: np.ndarray, num_clients: int, rng: np.random.Generator, shards_per_client: int) -> list[np.ndarray]:
    """Pathological non-IID shards of McMahan et al. 2017 ("Communication-Efficient Learning of Deep
    Networks from Decentralized Data", AISTATS, Sec. 3): sort the indices by label (stable, so ties
    keep index order), cut them into ``num_clients * shards_per_client`` contiguous shards of
    near-equal size (``np.array_split``), and give client k the shards ``perm[k*s : (k+1)*s]`` of a
    seeded permutation ``perm`` of shard ids (s = ``shards_per_client``). With shards no larger than
    a class, each client sees at most ``2 * shards_per_client`` labels (exactly ``shards_per_client``
    when every class splits into whole shards, as in the paper's 2 x 300-image shards of MNIST).
    """
    labels, num_clients, n = _check_common(labels, num_clients)
    shards_per_client = operator.index(shards_per_client)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    if num_shards > n:
        raise ValueError(
            f"num_clients * shards_per_client ({num_clients} * {shards_per_client}) must be <= the number of "
            f"samples N ({n})"
        )
    pieces = np.array_split(np.argsort(labels, kind="stable"), num_shards)
    perm = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in perm])


def quantity(
    labels: np.ndarray, num_clients: int, rng: np.random.Generator, sigma: float = 1.0, min_size: int = 1
) -> list[np.ndarray]:
    """Quantity skew (Li et al. 2021, "Federated Learning on Non-IID Data Silos: An Experimental
    Study", arXiv:2102.02079, Sec. 3.2; log-normal sizes as in FedProx, Li et al. 2020): labels stay
    IID, client sizes vary.

    Draw weights w_k ~ LogNormal(0, sigma) (first), give every client ``min_size`` samples and share
    the remaining ``N - num_clients * min_size`` in proportion to w by largest-remainder rounding
    (floors first, then one more to the largest fractional parts, ties to the lower client id), so
    sizes sum to N exactly. Then cut one seeded permutation of the N indices at the cumulative sizes.
    ``sigma = 0`` gives sizes differing by at most 1.
    """
    labels, num_clients, n = _check_common(labels, num_clients)
    sigma = float(sigma)
    if not (sigma >= 0 and np.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    min_size = _check_min_size(min_size, num_clients, n)
    weights = rng.lognormal(0.0, sigma, num_clients)
    rest = n - num_clients * min_size
    quota = weights / weights.sum() * rest
    extra = np.floor(quota).astype(np.int64)
    short = rest - int(extra.sum())  # 0 <= short < num_clients
    extra[np.argsort(-(quota - extra), kind="stable")[:short]] += 1
    sizes = min_size + extra
    return _finish(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client label counts: an int64 array of shape (len(parts), num_classes) whose entry [k, c]
    is the number of indices in ``parts[k]`` with label c. Labels must lie in ``0 .. num_classes-1``.
    """
    labels = np.asarray(labels)
    num_classes = operator.index(num_classes)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0 .. num_classes-1 = {num_classes - 1}, "
                         f"got range {labels.min()} .. {labels.max()}")
    hist = np.zeros((len(parts), num_classes), dtype=np.int64)
    for k, part in enumerate(parts):
        hist[k] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return hist


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity": quantity,
}


def partition_generator(seed: int) -> np.random.Generator:
    """The generator ``partition`` uses: ``simulator.rng.generator(seed, "partition")``."""
    return generator(seed, "partition")


def partition(name: str, labels: np.ndarray, num_clients: int, seed: int, **params: object) -> list[np.ndarray]:
    """Split ``labels``'s indices over ``num_clients`` clients with the partitioner ``name`` (a key of
    ``PARTITIONERS``), its generator seeded from ``seed`` and the partition purpose (id 9), and its own
    parameters given as keywords (e.g. ``alpha=0.5`` for "dirichlet", ``shards_per_client=2`` for "shards").
    """
    if name not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {name!r}; choose one of {sorted(PARTITIONERS)}")
    return PARTITIONERS[name](labels, num_clients, partition_generator(seed), **params)
