"""Connecting to Ray: a local Ray started for the run, or a cluster named by ``system.address``.

``connect`` is the one place metafleet starts or joins Ray. With ``system.address = ""`` (the default) a
run joins the cluster that ``RAY_ADDRESS`` names when that is set, and otherwise always starts its own
local Ray (``ray.init(address="local")``), with its session files in a directory only this user can enter:
it never joins a cluster it merely finds on the machine (another user's, or a dead one recorded in Ray's
``ray_current_cluster`` file). An unreachable address fails fast
with one clear line instead of Ray's endless retries. A cluster started with ``ray start`` (Ray 2.60) uses
token authentication, which Ray never sends to an explicitly named address unless ``RAY_AUTH_MODE=token`` is
set: a refused connection says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import ray

from simulator.config.schema import ConfigError, SystemConfig

#: the packages ``system.ship_code`` sends with the job (this checkout's simulator/ and actors/)
PACKAGES = [str(Path(__file__).resolve().parents[1] / name) for name in ("simulator", "actors")]


def log_level() -> int:
    return logging.getLogger("metafleet").getEffectiveLevel()


def address_of(system: SystemConfig) -> str:
    """The cluster a run joins: ``system.address``, else ``RAY_ADDRESS``; "" = start a local Ray of its own."""
    return system.address or os.environ.get("RAY_ADDRESS", "").strip()


def private_temp_dir() -> str:
    """A fresh directory that only this user can enter (0700), for a local Ray's session files: Ray makes
    its own temp directory world-writable, so it goes one level inside (``<dir>/ray``). Under ``RAY_TMPDIR``
    when that is set, else the system's temp directory; short, because Ray's socket paths must fit 107 bytes.
    Left in place after the run, like Ray's own sessions, for its logs."""
    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    return str(Path(tempfile.mkdtemp(prefix="metafleet-ray-", dir=base)) / "ray")


@contextlib.contextmanager
def _neutral_cwd(directory: Path) -> Iterator[None]:
    """Run ``ray.init`` from ``directory`` (this run's private, empty temp directory), then return. Ray puts the
    driver's working directory at the front of every worker's ``sys.path`` (and starts a local Ray's workers in
    it), so a user's ``simulator.py`` or ``analysis.py`` there would shadow metafleet's packages in the actors;
    factory files are loaded by path instead (``simulator.plugins``)."""
    back = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(back)


def connect(system: SystemConfig, on_start: Callable[[str], None] | None = None) -> bool:
    """Start a local Ray (no address) or join a cluster; returns True if this call started or joined it.
    ``on_start`` is told the address first ("" = a local Ray), once the address is known to answer."""
    address = address_of(system)
    _probe(address)
    if ray.is_initialized():
        return False
    if on_start is not None:
        on_start(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own messages follow metafleet's verbosity (`metafleet run -v` shows them)
    ray_level = log_level() if log_level() <= logging.INFO else logging.ERROR
    kwargs: dict[str, object] = {"include_dashboard": False, "logging_level": ray_level, "configure_logging": True,
                                 "address": address or "local"}
    if address and system.ship_code:
        kwargs["runtime_env"] = {"py_modules": PACKAGES}
    temp = private_temp_dir()
    if not address:
        kwargs["_temp_dir"] = temp
    try:
        with _neutral_cwd(Path(temp).parent):
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        if not address:
            raise ConfigError(f"could not start a local Ray ({type(exc).__name__}: {first}); check free memory "
                              "and disk space under the temp directory, or join a running cluster with --address "
                              "HOST:PORT") from None
        key = "system.address" if system.address else "RAY_ADDRESS"
        probed = ":" in address and not address.startswith("ray://")  # it answered (_probe), then refused us
        if probed and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            raise ConfigError(f"{key} = {address!r}: the cluster answers but refused the connection ({first}); a "
                              "cluster started with `ray start` uses token authentication: export "
                              "RAY_AUTH_MODE=token, with the cluster's token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH "
                              "or RAY_AUTH_TOKEN (README: Actors, GPUs and clusters)") from None
        raise ConfigError(f"{key} = {address!r}: cannot connect to a Ray cluster ({first}); check that its token "
                          "is this one (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN), or start one "
                          "with `ray start --head`, or use --address '' for a local Ray") from None
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
