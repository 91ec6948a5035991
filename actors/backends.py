"""``make_backend``: the one place that turns ``[system]`` settings into a backend (a context manager).

    with make_backend(cfg) as backend:
        summary = run(cfg, backend, run_dir)
"""

from __future__ import annotations

from actors.inline import InlineBackend
from actors.pool import RayPool
from simulator.config.schema import ExperimentConfig
from simulator.contract import Backend, WorkerSpec


def make_backend(cfg: ExperimentConfig) -> Backend:
    """The in-process backend (``system.backend = "inline"``) or a Ray actor pool sized from the cluster."""
    spec = WorkerSpec.from_config(cfg)
    if cfg.system.backend == "inline":
        return InlineBackend(spec, cfg.system)
    return RayPool(spec, cfg.system, cfg.clients.per_round)
