"""Client sampling: which clients train (cutting a cohort into worker calls is ``simulator.contract``).

Every draw is seeded by (seed, purpose, key): the synchronous modes key the sampler by round,
the asynchronous mode by refill group (one group per simulated instant at which free slots are
refilled), so that async with a full buffer and equal devices draws exactly sync's cohorts.
"""

from __future__ import annotations

import numpy as np

from simulator.rng import generator


def sample_cohort(seed: int, round_idx: int, num_clients: int, per_round: int) -> np.ndarray:
    """``per_round`` distinct client ids out of ``0..num_clients-1``, uniformly, sorted ascending.

    O(per_round) work and memory, whatever the population (numpy's Floyd-style sampling for
    small cohorts), so a 1,000,000-client registry costs the driver nothing per round.
    """
    rng = generator(seed, "sample", round_idx)
    return np.sort(rng.choice(num_clients, size=per_round, replace=False)).astype(np.int64)


def sample_clients(seed: int, key: int, num_clients: int, count: int, exclude: set[int] | frozenset[int]) -> np.ndarray:
    """``count`` distinct ids not in ``exclude`` (clients already training), uniformly, sorted.

    With nothing excluded this is ``sample_cohort(seed, key, ...)``. Otherwise ids are drawn one
    at a time from the same seeded stream and rejected if excluded or repeated: O(count) expected
    work while ``exclude`` is a small part of the population. Fewer ids come back only when fewer
    than ``count`` clients are free.
    """
    count = min(count, num_clients - len(exclude))
    if count <= 0:
        return np.zeros(0, np.int64)
    if not exclude:
        return sample_cohort(seed, key, num_clients, count)
    rng = generator(seed, "sample", key)
    picked: set[int] = set()
    while len(picked) < count:
        for cid in rng.integers(0, num_clients, size=2 * (count - len(picked))).tolist():
            if cid not in exclude and cid not in picked:
                picked.add(cid)
                if len(picked) == count:
                    break
    return np.array(sorted(picked), np.int64)


def select_eval_clients(seed: int, first_id: int, available: int, count: int) -> np.ndarray:
    """A fixed, seeded subset of the held-out clients, evaluated at every evaluation."""
    rng = generator(seed, "eval_select")
    return np.sort(rng.choice(available, size=count, replace=False)).astype(np.int64) + first_id
