"""Pool sizing from cluster resources (pure function; no Ray needed)."""

from __future__ import annotations

import pytest

from actors.pool import pool_size
from simulator.config.schema import ConfigError, SystemConfig


def sys(**kw) -> SystemConfig:
    return SystemConfig(**kw)


@pytest.mark.parametrize(("kw", "per_round", "cpus", "gpus", "expected"), [
    ({}, 100, 2, 0, 2),                                        # one actor per CPU
    ({"cpus_per_actor": 0.5}, 100, 2, 0, 4),                   # fractional CPUs
    ({}, 1, 8, 0, 1),                                          # never more actors than clients per round
    ({"clients_per_actor": 50}, 100, 16, 0, 2),                # one actor per 50 clients
    ({"clients_per_actor": 1, "cpus_per_actor": 0.1}, 10, 2, 0, 10),  # one actor per client
    ({"gpus_per_actor": 0.25}, 100, 16, 1, 4),                 # 4 actors share one GPU
    ({"gpus_per_actor": 0.5}, 100, 16, 2, 4),
    ({"gpus_per_actor": 0.25}, 100, 2, 1, 2),                  # CPUs are the tighter limit
    ({"actors": 3}, 100, 4, 0, 3),                             # explicit count
])
def test_pool_size(kw, per_round, cpus, gpus, expected):
    assert pool_size(sys(**kw), per_round, cpus, gpus) == expected


@pytest.mark.parametrize(("kw", "cpus", "gpus", "key"), [
    ({"gpus_per_actor": 0.5}, 4, 0, "gpus_per_actor"),
    ({"actors": 5}, 2, 0, "system.actors"),
    ({"cpus_per_actor": 4.0}, 2, 0, "cpus_per_actor"),
])
def test_pool_size_rejects_what_does_not_fit(kw, cpus, gpus, key):
    with pytest.raises(ConfigError, match=key):
        pool_size(sys(**kw), 10, cpus, gpus)
