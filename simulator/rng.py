"""Seeded random streams: every draw comes from a generator keyed by (run seed, purpose, round, client).

No code in metafleet reads global RNG state. Two draws with different purposes are independent,
and a client's draws do not depend on which process, actor or order computes them.
"""

from __future__ import annotations

import numpy as np

#: one fixed integer per purpose: adding a purpose never changes the streams of the others
PURPOSES: dict[str, int] = {
    "data": 1,          # a client's task and samples
    "data_global": 2,   # parameters shared by every client (e.g. the IID variant's W)
    "sizes": 3,         # a client's number of samples
    "sample": 4,        # which clients train in a round
    "batches": 5,       # a client's mini-batch order in a round
    "eval_select": 6,   # which held-out clients are evaluated
    "eval_batches": 7,  # adaptation batches of an evaluated client
    "init": 8,          # the server model's initial weights
    "partition": 9,     # how a pooled dataset is split over clients
    "device": 10,       # a client's device profile (compute speed, bandwidth)
    "availability": 11,  # whether a sampled client is online
    "dropout": 12,      # whether (and when) a client drops out mid-update
    "leaf_users": 13,   # the order of a LEAF dataset's users (which are training, which held out)
    "table_split": 14,  # a table client's rows split into support and query
    "table_clients": 15,  # the order of a table's clients
}


def seed_sequence(seed: int, purpose: str, round_idx: int = 0, client_id: int = 0) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, PURPOSES[purpose], round_idx, client_id])


def generator(seed: int, purpose: str, round_idx: int = 0, client_id: int = 0) -> np.random.Generator:
    """A fresh numpy generator for this (seed, purpose, round, client)."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose, round_idx, client_id)))


def torch_seed(seed: int, purpose: str, round_idx: int = 0, client_id: int = 0) -> int:
    """A 63-bit integer seed for torch, derived like ``generator``."""
    return int(seed_sequence(seed, purpose, round_idx, client_id).generate_state(1, np.uint64)[0] >> np.uint64(1))
