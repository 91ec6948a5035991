"""Connecting to Ray: a local Ray started for the run, or a cluster named by ``system.address``.

``connect`` is the one place metafleet starts or joins Ray. With ``system.address = ""`` (the default) a
run joins the cluster that ``RAY_ADDRESS`` names when that is set, and otherwise always starts its own
local Ray (``ray.init(address="local")``), with its session files in a directory only this user can enter:
it never joins a cluster it merely finds on the machine (another user's, or a dead one recorded in Ray's
``ray_current_cluster`` file). An unreachable address fails fast
with one clear line instead of Ray's endless retries. A cluster started with ``ray start`` (Ray 2.60) uses
token authentication, which Ray never sends to an explicitly named address unless ``RAY_AUTH_MODE=token`` is
set: a refused connection says so. ``pool_size`` sizes the actor pool from what the cluster holds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import ray

from simulator.config.schema import ConfigError, SystemConfig
from simulator.contract import WorkerFailure

log = logging.getLogger("metafleet.cluster")

#: the packages ``system.ship_code`` sends with the job (this checkout's simulator/ and actors/)
PACKAGES = [str(Path(__file__).resolve().parents[1] / name) for name in ("simulator", "actors")]


def log_level() -> int:
    return logging.getLogger("metafleet").getEffectiveLevel()


def address_of(system: SystemConfig) -> str:
    """The cluster a run joins: ``system.address``, else ``RAY_ADDRESS``; "" = start a local Ray of its own."""
    return system.address or os.environ.get("RAY_ADDRESS", "").strip()


#: the longest temp directory a local Ray's session can go under (its socket paths must fit 107 bytes)
MAX_TEMP_BASE = 20


def private_temp_dir() -> str:
    """A fresh directory that only this user can enter (0700), for a local Ray's session files: Ray makes
    its own temp directory world-writable, so it goes one level inside (``<dir>/ray``). Under ``RAY_TMPDIR``
    when that is set, else the system's temp directory, else ``/tmp`` where that one is too long for Ray's socket
    paths (107 bytes, of which a session's own part takes about 70: macOS's ``/var/folders/...`` is too long).
    Left in place after the run, like Ray's own sessions, for its logs."""
    base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    if len(base) > MAX_TEMP_BASE and Path("/tmp").is_dir():
        base = "/tmp"
    return str(Path(tempfile.mkdtemp(prefix="mf-ray-", dir=base)) / "ray")


def require_token(private_dir: Path) -> bool:
    """Turn on Ray's token authentication for the local Ray this process is about to start: a fresh random
    token in ``private_dir/auth_token`` (mode 0600, inside the 0700 directory), named by ``RAY_AUTH_TOKEN_PATH``
    with ``RAY_AUTH_MODE=token`` for this process and the Ray processes it starts. Ray 2.60's servers listen on
    every interface whatever the node address; with the token, a connection from anyone without it (another
    user, another host) is refused, so nobody else can submit code to it. Ray caches its config at import, so
    it is refreshed here the way Ray's own ``ray start`` does (``ray._raylet.Config.initialize``). Returns False,
    changing nothing, where this Ray has no token authentication or the user chose a mode (``RAY_AUTH_MODE``)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return False
    try:
        from ray._raylet import AuthenticationTokenLoader, Config  # noqa: PLC0415 (Ray's private API, >= 2.52)
    except ImportError:
        log.warning("this Ray has no token authentication: its local servers accept anyone who reaches this host")
        return False
    path = private_dir / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"], os.environ["RAY_AUTH_TOKEN_PATH"] = "token", str(path)
    os.environ.pop("RAY_AUTH_TOKEN", None)
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return True


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
        require_token(Path(temp).parent)
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


def check_gcs(gcs_address: str, timeout_s: float = 2.0) -> None:
    """Raise WorkerFailure when the cluster's GCS no longer accepts connections (its process or its node died).
    Actors keep answering a driver without a GCS, until Ray ends that driver 60 s later with no word; the pool
    checks every few seconds, so the run stops first with its summary and checkpoint."""
    host, _, port = gcs_address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise WorkerFailure(f"the Ray cluster's GCS at {gcs_address} stopped answering ({exc.strerror or exc}): "
                            "its process or its node died; restart the cluster (a local Ray: just run again) and "
                            "continue with `metafleet run --resume RUN_DIR`") from None


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


def actors_that_fit(system: SystemConfig, cpus: float, gpus: float) -> int:
    """How many actors of ``cpus_per_actor`` CPUs and ``gpus_per_actor`` GPUs the resources hold."""
    fit = math.floor(cpus / system.cpus_per_actor + 1e-9)
    if system.gpus_per_actor > 0:
        fit = min(fit, math.floor(gpus / system.gpus_per_actor + 1e-9))
    return fit


def pool_size(system: SystemConfig, per_round: int, cpus: float, gpus: float) -> int:
    """Actors to start: ``system.actors`` if set, else as many as the resources hold, no more than
    one per ``clients_per_actor`` clients of a round (and never more than the round's clients)."""
    if system.gpus_per_actor > 0 and gpus <= 0:
        raise ConfigError(f"system.gpus_per_actor = {system.gpus_per_actor} but the Ray cluster has no GPU; "
                          "set system.gpus_per_actor = 0")
    fit = actors_that_fit(system, cpus, gpus)
    if system.actors:
        if system.actors > fit:
            raise ConfigError(
                f"system.actors = {system.actors} actors of {system.cpus_per_actor} CPU / "
                f"{system.gpus_per_actor} GPU do not fit the cluster ({cpus:g} CPU, {gpus:g} GPU); "
                "lower system.actors or system.cpus_per_actor (fractions such as 0.5 are allowed)")
        return system.actors
    if fit < 1:
        raise ConfigError(f"not one actor of {system.cpus_per_actor} CPU / {system.gpus_per_actor} GPU fits the "
                          f"cluster ({cpus:g} CPU, {gpus:g} GPU); lower system.cpus_per_actor")
    if system.clients_per_actor > 0:
        fit = min(fit, -(-per_round // system.clients_per_actor))
    return max(1, min(fit, per_round))
