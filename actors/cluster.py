"""Connecting to Ray: a local Ray started for the run, or a cluster named by ``system.address``.

``connect`` is the one place metafleet starts or joins Ray; an unreachable address fails fast with one
clear line instead of Ray's endless retries.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import ray

from simulator.config.schema import ConfigError, SystemConfig

#: the packages ``system.ship_code`` sends with the job (this checkout's simulator/ and actors/)
PACKAGES = [str(Path(__file__).resolve().parents[1] / name) for name in ("simulator", "actors")]


def log_level() -> int:
    return logging.getLogger("metafleet").getEffectiveLevel()


def connect(system: SystemConfig) -> bool:
    """Start a local Ray (address "") or join a cluster; returns True if this call started it."""
    _probe(system.address)
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own messages follow metafleet's verbosity (`metafleet run -v` shows them)
    ray_level = log_level() if log_level() <= logging.INFO else logging.ERROR
    kwargs: dict[str, object] = {"include_dashboard": False, "logging_level": ray_level, "configure_logging": True}
    if system.address:
        kwargs["address"] = system.address
        if system.ship_code:
            kwargs["runtime_env"] = {"py_modules": PACKAGES}
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"system.address = {system.address!r}: cannot connect to a Ray cluster ({exc}); "
                          "start one with `ray start --head`, or use --address '' for a local Ray") from None
    return True


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an unreachable HOST:PORT (``ray.init`` would retry it forever)."""
    if not address or address == "auto" or address.startswith("ray://") or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"system.address = {address!r}: nothing answers there ({exc}); start the cluster "
                          "with `ray start --head`, fix --address, or use --address '' for a local Ray") from None
