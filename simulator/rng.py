"""Seeded random streams: every draw comes from a generator keyed by (run seed, purpose, round, client).

No code in metafleet reads global RNG state. Two draws with different purposes are independent,
and a client's draws do not depend on which process, actor or order computes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.random.bit_generator import ISeedSequence

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
    "compress": 30,     # a client's compressed upload (QSGD's rounding, randk's indices); 30 leaves 16-29 free
    "dp_noise": 31,     # central DP: the Gaussian noise added to a round's (or server update's) sum
    "dp_local": 32,     # local DP: the noise a client adds to its own upload
    "dp_clip": 33,      # adaptive clipping: the noise on the count of unclipped updates
}


def seed_sequence(seed: int, purpose: str, round_idx: int = 0, client_id: int = 0) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, PURPOSES[purpose], round_idx, client_id])


def generator(seed: int, purpose: str, round_idx: int = 0, client_id: int = 0) -> np.random.Generator:
    """A fresh numpy generator for this (seed, purpose, round, client)."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, purpose, round_idx, client_id)))


# numpy's SeedSequence constants (O'Neill's seed_seq_fe, numpy/random/bit_generator.pyx)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _MASK = 0xCA01F9DD, 0x4973F715, 0xFFFFFFFF
_POOL = 4  # SeedSequence's default pool size: one 32-bit word per key entry


def _hash_consts(start: int, mult: int, count: int) -> list[np.uint32]:
    """The hash constant before each use: it evolves the same way whatever the entropy."""
    out, h = [], start
    for _ in range(count):
        out.append(np.uint32(h))
        h = (h * mult) & _MASK
    return out


_A = _hash_consts(_INIT_A, _MULT_A, _POOL + _POOL * (_POOL - 1) + 1)
_B = _hash_consts(_INIT_B, _MULT_B, 2 * _POOL + 1)


def _pools(words: np.ndarray) -> np.ndarray:
    """SeedSequence.mix_entropy for many keys at once: (n, 4) uint32 entropy words -> (n, 4) pools."""
    shift = np.uint32(16)
    uses = iter(range(len(_A)))

    def hashmix(value: np.ndarray) -> np.ndarray:
        i = next(uses)
        value = (value ^ _A[i]) * _A[i + 1]
        return value ^ (value >> shift)

    with np.errstate(over="ignore"):
        pool = [hashmix(words[:, i]) for i in range(_POOL)]
        for src in range(_POOL):
            for dst in range(_POOL):
                if src != dst:
                    mixed = np.uint32(_MIX_L) * pool[dst] - np.uint32(_MIX_R) * hashmix(pool[src])
                    pool[dst] = mixed ^ (mixed >> shift)
    return np.stack(pool, axis=1)


def _states(pools: np.ndarray) -> np.ndarray:
    """SeedSequence.generate_state(4, uint64) for many pools: (n, 4) uint32 -> (n, 4) uint64."""
    shift = np.uint32(16)
    out = np.empty((pools.shape[0], 2 * _POOL), np.uint32)
    with np.errstate(over="ignore"):
        for i in range(2 * _POOL):
            value = (pools[:, i % _POOL] ^ _B[i]) * _B[i + 1]
            out[:, i] = value ^ (value >> shift)
    return out.astype("<u4").view("<u8")


class _Hashed(ISeedSequence):
    """A seed sequence whose PCG64 seed words were computed in bulk; anything else falls back."""

    __slots__ = ("entropy", "words")

    def __init__(self, entropy: list[int], words: np.ndarray) -> None:
        self.entropy, self.words = entropy, words

    def generate_state(self, n_words: int, dtype: type = np.uint32) -> np.ndarray:
        if n_words == _POOL and np.dtype(dtype) == np.uint64:
            return self.words.copy()
        return np.random.SeedSequence(self.entropy).generate_state(n_words, dtype)


#: fewer keys than this are seeded one by one: the vectorized pass costs about 0.1 ms whatever the count, numpy's
#: own SeedSequence about 11 us a key (``benchmarks/README.md``, "Asynchronous driver"); the two cross near 8
BULK_MIN = 8


def generators(seed: int, purpose: str, round_idx: int | Sequence[int], client_ids: Sequence[int]
               ) -> list[np.random.Generator]:
    """``[generator(seed, purpose, r, c) ...]`` for many clients (``round_idx`` one for all or one per
    client): the same streams, seeded several times faster by hashing every key in one vectorized pass of
    numpy's SeedSequence algorithm. A key with an entry >= 2**32 (more than one entropy word), or fewer than
    ``BULK_MIN`` keys (the asynchronous server seeds one client per completion), take ``generator`` itself."""
    n = len(client_ids)
    rounds = [round_idx] * n if isinstance(round_idx, int | np.integer) else list(round_idx)
    if n >= BULK_MIN and _FAST:
        keys = np.empty((n, _POOL), np.int64)
        keys[:, 0], keys[:, 1], keys[:, 2], keys[:, 3] = seed, PURPOSES[purpose], rounds, client_ids
        if keys.min() >= 0 and keys.max() <= _MASK:
            words = _states(_pools(keys.astype(np.uint32)))
            return [np.random.Generator(np.random.PCG64(_Hashed([seed, PURPOSES[purpose], int(r), int(c)], w)))
                    for r, c, w in zip(rounds, client_ids, words, strict=True)]
    return [generator(seed, purpose, int(r), int(c)) for r, c in zip(rounds, client_ids, strict=True)]


def _self_check() -> bool:
    """Whether the bulk hash reproduces this numpy's SeedSequence (else ``generators`` falls back)."""
    keys = np.array([[0, 5, 0, 0], [12345, 4, 7, 99999], [_MASK, 1, 2**31, 3]], np.int64)
    want = np.stack([np.random.SeedSequence(k.tolist()).generate_state(_POOL, np.uint64) for k in keys])
    return bool(np.array_equal(_states(_pools(keys.astype(np.uint32))), want))


_FAST = _self_check()


def torch_seed(seed: int, purpose: str, round_idx: int = 0, client_id: int = 0) -> int:
    """A 63-bit integer seed for torch, derived like ``generator``."""
    return int(seed_sequence(seed, purpose, round_idx, client_id).generate_state(1, np.uint64)[0] >> np.uint64(1))
