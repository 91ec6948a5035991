"""The execution layer: Ray client actors and an in-process backend with the same interface.

``make_backend`` is the one place that turns ``[system]`` settings into a backend. Ray is
imported only when the Ray backend is asked for.
"""

from __future__ import annotations

from simulator.config import ExperimentConfig
from simulator.worker import WorkerSpec


def make_backend(cfg: ExperimentConfig):  # -> simulator.driver.Backend
    spec = WorkerSpec.from_config(cfg)
    if cfg.system.backend == "inline":
        from actors.inline import InlineBackend

        return InlineBackend(spec, cfg.system)
    from actors.pool import RayPool

    return RayPool(spec, cfg.system, cfg.clients.per_round)


__all__ = ["make_backend"]
