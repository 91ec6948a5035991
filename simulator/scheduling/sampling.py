"""Client sampling: which clients train (cutting a cohort into worker calls is ``simulator.contract``).

Every draw is seeded by (seed, purpose, key): the synchronous modes key the sampler by round,
the asynchronous mode by refill group (one group per simulated instant at which free slots are
refilled), so that async with a full buffer and equal devices draws exactly sync's cohorts.
"""

from __future__ import annotations

from collections.abc import Set

import numpy as np

from simulator.rng import generator, generators

#: sample streams seeded ahead at a time by ``SampleStreams`` (one bulk ``rng.generators`` pass)
STREAMS_AHEAD = 64


class SampleStreams:
    """The sampler's streams (seed, "sample", key) for keys met in increasing order (the asynchronous server's refill
    groups): seeded ``STREAMS_AHEAD`` at a time in one bulk pass, each handed out once. The same generators as
    ``generator(seed, "sample", key)``, at a fraction of its cost per refill."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._ahead: dict[int, np.random.Generator] = {}

    def get(self, key: int) -> np.random.Generator:
        rng = self._ahead.pop(key, None)
        if rng is None:
            keys = list(range(key, key + STREAMS_AHEAD))
            self._ahead = dict(zip(keys, generators(self.seed, "sample", keys, [0] * len(keys)), strict=True))
            rng = self._ahead.pop(key)
        return rng


def sample_cohort(seed: int, round_idx: int, num_clients: int, per_round: int,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """``per_round`` distinct client ids out of ``0..num_clients-1``, uniformly, sorted ascending; ``rng``: the
    stream (seed, "sample", round_idx) when the caller has it already (``SampleStreams``).

    O(per_round) work and memory, whatever the population (numpy's Floyd-style sampling for
    small cohorts), so a 1,000,000-client registry costs the driver nothing per round.
    """
    rng = generator(seed, "sample", round_idx) if rng is None else rng
    return np.sort(rng.choice(num_clients, size=per_round, replace=False)).astype(np.int64)


def sample_clients(seed: int, key: int, num_clients: int, count: int, exclude: Set[int],
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """``count`` distinct ids not in ``exclude`` (clients already training), uniformly, sorted; ``rng``: the stream
    (seed, "sample", key) when the caller has it already (``SampleStreams``).

    With nothing excluded this is ``sample_cohort(seed, key, ...)``. Otherwise ids are drawn one
    at a time from the same seeded stream and rejected if excluded or repeated: O(count) expected
    work while ``exclude`` is a small part of the population. Fewer ids come back only when fewer
    than ``count`` clients are free.
    """
    count = min(count, num_clients - len(exclude))
    if count <= 0:
        return np.zeros(0, np.int64)
    if not exclude:
        return sample_cohort(seed, key, num_clients, count, rng)
    rng = generator(seed, "sample", key) if rng is None else rng
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
