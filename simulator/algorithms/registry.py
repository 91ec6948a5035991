"""The algorithm registry: every built-in algorithm's record, listed once, and the resolver of a config.

Config validation takes ``algorithm.name``'s choices from ``ALGORITHMS``, and the CLI's help its summaries;
the driver and every worker find their record with ``resolve``. ``algorithm.factory =
"package.module:function"`` names a function returning a user's own ``Algorithm`` record instead (see
README, "Your own algorithm"); it is imported the same way wherever the config is resolved, in the driver
and in each Ray actor.
"""

from __future__ import annotations

from functools import lru_cache

from simulator.algorithms.fedavg import FEDAVG, PFEDAVG, REPTILE
from simulator.algorithms.maml import FOMAML, MAML
from simulator.algorithms.metasgd import METASGD
from simulator.algorithms.perfedavg import PERFEDAVG_FO, PERFEDAVG_HF
from simulator.algorithms.record import Algorithm
from simulator.config.schema import AlgorithmConfig, ConfigError
from simulator.plugins import call_factory

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    FEDAVG, REPTILE, FOMAML, MAML, PFEDAVG, PERFEDAVG_FO, PERFEDAVG_HF, METASGD,
)}


@lru_cache(maxsize=64)
def from_factory(path: str) -> Algorithm:
    """The record returned by the user's ``algorithm.factory`` (called once per process)."""
    record = call_factory("algorithm.factory", path)
    if not isinstance(record, Algorithm):
        raise ConfigError(f"algorithm.factory = {path!r} returned {type(record).__name__}, not an "
                          "simulator.algorithms.record.Algorithm; return the record")
    return record


def resolve(cfg: AlgorithmConfig) -> Algorithm:
    """The record of ``cfg``: its factory's when ``algorithm.factory`` is set, else ``ALGORITHMS[cfg.name]``."""
    if cfg.factory:
        return from_factory(cfg.factory)
    try:
        return ALGORITHMS[cfg.name]
    except KeyError:
        raise ConfigError(f"algorithm.name = {cfg.name!r} is not supported; choose one of "
                          f"{', '.join(ALGORITHMS)}, or set algorithm.factory") from None
