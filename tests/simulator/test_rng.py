"""Seeded streams: ``generators`` (bulk seeding) gives exactly the streams of ``generator``."""

from __future__ import annotations

import numpy as np
import pytest

from simulator import rng
from simulator.rng import PURPOSES, generator, generators


def _same_stream(a: np.random.Generator, b: np.random.Generator) -> bool:
    return (a.bit_generator.state == b.bit_generator.state
            and np.array_equal(a.integers(0, 2**62, 8), b.integers(0, 2**62, 8))
            and np.array_equal(a.standard_normal(5), b.standard_normal(5)))


@pytest.mark.parametrize("purpose", sorted(PURPOSES))
def test_bulk_seeding_gives_the_same_streams_for_every_purpose(purpose):
    draw = np.random.default_rng(1234)
    seeds = [0, 1, 7, 2**31, 2**32 - 1, int(draw.integers(0, 2**32))]
    for seed in seeds:
        clients = [0, 1, 2**32 - 1, *draw.integers(0, 2**32, 5).tolist()]
        rounds = [0, 3, 2**32 - 1, *draw.integers(0, 10_000, 5).tolist()]
        bulk = generators(seed, purpose, rounds, clients)
        assert len(bulk) == len(clients)
        for g, r, c in zip(bulk, rounds, clients, strict=True):
            assert _same_stream(g, generator(seed, purpose, r, c)), (seed, purpose, r, c)


def test_one_key_for_all_clients_and_keys_beyond_32_bits():
    clients = [5, 9, 5]  # a repeated client gets two independent copies of one stream
    a = generators(3, "batches", 11, clients)
    assert all(_same_stream(g, generator(3, "batches", 11, c)) for g, c in zip(a, clients, strict=True))
    assert a[0] is not a[2]
    big = [2**40, 2**63 - 1]  # more than one 32-bit entropy word: the per-key path
    b = generators(2**33, "device", 0, big)
    assert all(_same_stream(g, generator(2**33, "device", 0, c)) for g, c in zip(b, big, strict=True))
    assert generators(0, "batches", 0, []) == []


def test_the_bulk_hash_checks_itself_against_numpy():
    assert rng._FAST  # numpy's SeedSequence is reproduced on this numpy; otherwise generators falls back
    keys = np.random.default_rng(5).integers(0, 2**32, (64, 4))
    want = np.stack([np.random.SeedSequence(k.tolist()).generate_state(4, np.uint64) for k in keys])
    np.testing.assert_array_equal(rng._states(rng._pools(keys.astype(np.uint32))), want)


def test_a_generator_can_still_spawn_other_sizes_of_state():
    g = generators(1, "data", 0, range(4, 4 + rng.BULK_MIN))[0]
    seq = g.bit_generator.seed_seq
    assert isinstance(seq, rng._Hashed)  # seeded by the vectorized pass
    np.testing.assert_array_equal(seq.generate_state(3), np.random.SeedSequence([1, PURPOSES["data"], 0, 4])
                                  .generate_state(3))


@pytest.mark.parametrize("n", [1, rng.BULK_MIN - 1, rng.BULK_MIN])
def test_few_keys_and_many_give_the_same_streams(n):
    """Below ``BULK_MIN`` keys each is seeded by numpy's SeedSequence, from then on by the vectorized pass."""
    clients, rounds = list(range(100, 100 + n)), list(range(7, 7 + n))
    got = generators(11, "availability", rounds, clients)
    kinds = {type(g.bit_generator.seed_seq) for g in got}
    assert kinds == ({rng._Hashed} if n >= rng.BULK_MIN else {np.random.SeedSequence})
    assert all(_same_stream(g, generator(11, "availability", r, c)) for g, r, c in zip(got, rounds, clients,
                                                                                          strict=True))
