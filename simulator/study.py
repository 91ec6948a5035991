"""A study: a base experiment config plus a ``[sweep]`` table, expanded into validated trial configs.

    [sweep]
    grid = {"algorithm.name" = ["reptile", "maml"], "data.dirichlet_alpha" = [0.1, 1.0]}   # cross product
    zip = {"algorithm.inner_lr" = [0.01, 0.02], "algorithm.inner_steps" = [5, 10]}       # varied together
    seeds = [0, 1, 2]
    max_concurrent = 0      # trials at once (0 = as many as the cluster holds)
    driver_cpus = 0.5       # CPUs reserved for each trial's own driver when it uses Ray actors

Trials are the cross product of ``grid``'s lists, times ``zip``'s lists taken position by position (one
axis), times ``seeds``, in that order (the last key of ``grid`` varies fastest, the seed fastest of all). Every
trial's config is built and validated here, before any trial starts: a bad key or value in the grid is one
``ConfigError`` that names the trial's keys. Pure: nothing here runs a trial (``actors.sweep`` does).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator.config.schema import ConfigError, ExperimentConfig
from simulator.config.toml import flatten_dict, parse_overrides, read_toml, set_dotted, shown
from simulator.experiment import from_dict, replace, with_local_factories

SWEEP_KEYS = ("grid", "zip", "seeds", "max_concurrent", "driver_cpus")
MAX_TRIALS = 100_000


@dataclass(frozen=True)
class Trial:
    """One run of a study: its index, directory name, the swept keys' values, and its validated config."""

    index: int
    name: str
    keys: dict[str, Any]
    config: ExperimentConfig

    @property
    def seed(self) -> int:
        return self.config.seed


@dataclass(frozen=True)
class Study:
    """The base config (the study file without ``[sweep]``), the sweep itself and its trials."""

    base: dict[str, Any]
    grid: dict[str, list[Any]]
    zip: dict[str, list[Any]]
    seeds: tuple[int, ...]
    max_concurrent: int
    driver_cpus: float
    trials: tuple[Trial, ...]

    def as_toml_dict(self) -> dict[str, Any]:
        """The study as one TOML document (base plus ``[sweep]``), as a sweep directory stores it."""
        sweep: dict[str, Any] = {"grid": self.grid, "seeds": list(self.seeds), "max_concurrent": self.max_concurrent,
                                 "driver_cpus": self.driver_cpus}
        if self.zip:
            sweep["zip"] = self.zip
        return {**self.base, "sweep": sweep}


def read_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Read a study file; ``overrides`` (``key.sub=VALUE``) change the base, as ``--set`` does for a run."""
    raw = read_toml(path)
    sweep = raw.pop("sweep", None)
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: no [sweep] table; add one, e.g. [sweep] grid = {{\"algorithm.name\" = "
                          "[\"reptile\", \"maml\"]}, seeds = [0, 1, 2] (README: Studies and sweeps)")
    # factory files next to the study file: located once here, so every trial records the same absolute path
    return expand(with_local_factories(set_dotted(raw, parse_overrides(overrides)), Path(path).parent), sweep)


def expand(base: Mapping[str, Any], sweep: Mapping[str, Any]) -> Study:
    """The trials of a study: every combination, validated (see the module docstring)."""
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"sweep.{unknown[0]} is not a sweep key; the keys are {', '.join(SWEEP_KEYS)}")
    grid = _axes(sweep.get("grid", {}), "sweep.grid")
    zipped = _axes(sweep.get("zip", {}), "sweep.zip")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise ConfigError("sweep.zip: its lists are varied together, so they must have one length; got "
                          + ", ".join(f"{k}: {len(v)}" for k, v in zipped.items()))
    both = sorted(set(grid) & set(zipped))
    if both:
        raise ConfigError(f"{both[0]!r} is in both sweep.grid and sweep.zip; keep it in one of them")
    if "seed" in grid or "seed" in zipped:
        raise ConfigError("sweep the seed with sweep.seeds = [0, 1, 2], not in grid or zip")
    seeds = sweep.get("seeds", [base.get("seed", 0)])
    if (not isinstance(seeds, list) or not seeds or not all(type(s) is int for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"sweep.seeds = {shown(seeds)} must be a non-empty list of distinct integers, e.g. [0, 1, 2]")
    max_concurrent = sweep.get("max_concurrent", 0)
    if type(max_concurrent) is not int or max_concurrent < 0:
        raise ConfigError(f"sweep.max_concurrent = {shown(max_concurrent)} must be an integer >= 0 (0 = as many "
                          "trials at once as the cluster holds)")
    driver_cpus = sweep.get("driver_cpus", 0.5)
    if type(driver_cpus) not in (int, float) or not 0 < driver_cpus <= 1024:
        raise ConfigError(f"sweep.driver_cpus = {shown(driver_cpus)} must be a number of CPUs in (0, 1024]")
    count = math.prod(len(v) for v in grid.values()) * (lengths.pop() if lengths else 1) * len(seeds)
    if count > MAX_TRIALS:
        raise ConfigError(f"the sweep has {count:,} trials, more than {MAX_TRIALS:,}; split the study")
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    rows = [dict(zip(zipped, values, strict=True)) for values in zip(*zipped.values(), strict=True)] or [{}]
    trials = []
    for combo in combos:
        for row in rows:
            keys = {**combo, **row}
            for seed in seeds:
                trials.append(_trial(len(trials), dict(base), keys, seed))
    return Study(dict(base), grid, zipped, tuple(seeds), max_concurrent, float(driver_cpus), tuple(trials))


def _axes(table: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of dotted keys to lists, e.g. {{\"algorithm.name\" = "
                          "[\"reptile\", \"maml\"]}")
    table = flatten_dict(table)  # unquoted dotted keys (grid.algorithm.name = [...]) are nested tables in TOML
    for key, values in table.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key!r} = {shown(values)} must be a non-empty list of values")
    return {k: list(v) for k, v in table.items()}


def _trial(index: int, base: dict[str, Any], keys: dict[str, Any], seed: int) -> Trial:
    name = trial_name(index, keys, seed)
    label = ", ".join(f"{k}={shown(v)}" for k, v in keys.items()) or "the base config"
    try:
        cfg = from_dict(set_dotted(base, {**keys, "seed": seed}))
        cfg = replace(cfg, name=f"{cfg.name}-{name}"[-200:])
    except ConfigError as exc:
        raise ConfigError(f"sweep trial {index} ({label}, seed={seed}): {exc}") from None
    if cfg.system.backend == "ray" and cfg.system.actors == 0:
        # a trial reserves what it uses: without a count its pool would size itself to the whole cluster
        cfg = replace(cfg, **{"system.actors": 1})
    return Trial(index, name, keys, cfg)


def trial_name(index: int, keys: dict[str, Any], seed: int) -> str:
    """A directory name: the index, then each swept value after its key's last part (a ``*.name`` key: its
    section, ``algorithm=maml``), then the seed."""
    parts = [f"{k.split('.')[0] if k.endswith('.name') else k.rsplit('.', 1)[-1]}={v}" for k, v in keys.items()]
    text = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", ",".join(parts))[:120]
    return f"t{index:04d}" + (f"-{text}" if text else "") + f"-seed={seed}"
