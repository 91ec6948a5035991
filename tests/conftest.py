"""Shared fixtures: one Ray instance for the whole session (2 CPUs), small configs."""

from __future__ import annotations

import os

import pytest

from actors.backends import make_backend
from simulator.rounds.run import run

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def run_with_backend(cfg, run_dir, *args, **kw) -> dict:
    """``simulator.rounds.run.run`` on the config's own backend (``actors.backends.make_backend``)."""
    with make_backend(cfg) as backend:
        return run(cfg, backend, run_dir, *args, **kw)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once per test session with 2 CPUs; backends reuse it and never shut it down."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def small_overrides(**extra: object) -> list[str]:
    """A seconds-long experiment: few clients, few rounds, evaluation twice."""
    base = {
        "rounds": 4, "data.num_clients": 24, "data.eval_clients": 4, "clients.per_round": 6,
        "eval.every": 2, "eval.clients": 4, "eval.adapt_steps": 2, "algorithm.local_steps": 2,
        "metrics.flush_every": 2,
    }
    base.update(extra)
    return [f"{k}={_toml(v)}" for k, v in base.items()]


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)
