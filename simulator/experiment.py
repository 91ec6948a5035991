"""The validated experiment: ``load_config``, ``from_dict`` and ``replace`` build an ``ExperimentConfig``
from TOML, a dict or dotted-key changes, and check every value range and combination of keys; each
failure is one ``ConfigError`` naming the key and the fix (the CLI exits with code 2).

The choices of ``data.name``, ``model.name`` and ``algorithm.name`` are the keys of the dataset, model
and algorithm registries, so this module sits above them in the import graph (the schema itself,
``simulator.config``, is at the bottom). An algorithm's own keys are checked and its defaults filled in by
its record's ``configure``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from simulator.algorithms.fedavg import with_proximal
from simulator.algorithms.registry import ALGORITHMS, resolve
from simulator.config.schema import (
    CHOICES,
    DATASET_KEYS,
    DATASET_ONLY,
    ConfigError,
    DataConfig,
    Distribution,
    ExperimentConfig,
    TrackingConfig,
    overselect_cohort,
    section,
)
from simulator.config.toml import build, parse_overrides, read_toml, set_dotted, shown, to_dict
from simulator.data.registry import DATASETS, FILE_DATASETS
from simulator.models import MODELS
from simulator.plugins import locate, search_roots
from simulator.privacy.settings import check_privacy

#: the longest run name in UTF-8 bytes (a run directory is NAME-YYYYmmdd-HHMMSS[-N], within a file name's 255)
MAX_NAME = 200
#: the most QSGD levels (compression.levels): a level and its sign fit 17 bits
MAX_LEVELS = 65535
#: the most clients one round may sample
MAX_PER_ROUND = 10_000_000
#: client ids 0 .. num_clients + eval_clients - 1 must fit int64, with room to spare
MAX_CLIENT_ID = 2**62


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read ``path`` (TOML; None for the quickstart), apply ``key.sub=value`` overrides, validate (factory files
    are looked for next to ``path``, then in the working directory)."""
    raw = read_toml(path) if path is not None else {}
    return from_dict(set_dotted(raw, parse_overrides(overrides)), Path(path).parent if path is not None else None)


def replace(cfg: ExperimentConfig, **changes: Any) -> ExperimentConfig:
    """``dataclasses.replace`` with dotted keys, validated: ``replace(cfg, **{"system.actors": 2})``."""
    return from_dict(set_dotted(to_dict(cfg), changes))


FACTORY_KEYS = ("model", "algorithm")


def with_local_factories(raw: dict[str, Any], config_dir: Path | None) -> dict[str, Any]:
    """``raw`` with ``model.factory`` and ``algorithm.factory`` located (``simulator.plugins.locate``): a module that
    does not import by name but is a file next to the config (``config_dir``) or in the working directory becomes
    that file's absolute path, so workers and a later ``--resume`` load the same file."""
    out = dict(raw)
    for table in FACTORY_KEYS:
        section_raw = raw.get(table)
        if isinstance(section_raw, dict) and isinstance(section_raw.get("factory"), str) and section_raw["factory"]:
            found = locate(f"{table}.factory", section_raw["factory"], search_roots(config_dir))
            out[table] = {**section_raw, "factory": found}
    return out


def from_dict(raw: dict[str, Any], config_dir: Path | None = None) -> ExperimentConfig:
    """Build and validate an ``ExperimentConfig`` from a nested dict (parsed TOML); ``config_dir``: the directory of
    the file it was read from, where factory files are looked for first (``with_local_factories``). For file
    datasets (LEAF, tables) an unset ``data.num_clients`` is every client of the files but the held-out ones."""
    raw = with_local_factories(raw, config_dir)
    cfg = build(raw)
    if not cfg.name:  # the default name says what runs: ALGORITHM-DATASET (a factory's record names its own)
        named = resolve(cfg.algorithm).name if cfg.algorithm.factory else cfg.algorithm.name
        cfg = dataclasses.replace(cfg, name=f"{named}-{cfg.data.name}")
    if cfg.data.path and not Path(cfg.data.path).expanduser().is_absolute():
        # actors (on other nodes too) read the data themselves: give them a path independent of their cwd
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                path=str(Path(cfg.data.path).expanduser().resolve())))
    cfg = dataclasses.replace(cfg, tracking=resolve_tracking(cfg.tracking))
    raw_data = raw.get("data", {}) if isinstance(raw.get("data"), dict) else {}
    cfg = _all_file_clients(cfg, raw_data)
    validate(cfg, raw_data)
    given = raw.get("algorithm", {}) if isinstance(raw.get("algorithm"), dict) else {}
    algorithm = resolve(cfg.algorithm)
    if cfg.algorithm.factory:
        if "name" in given and given["name"] != algorithm.name:
            raise ConfigError(f"algorithm.name = {given['name']!r} but algorithm.factory = {cfg.algorithm.factory!r} "
                              f"returns the algorithm {algorithm.name!r}; drop algorithm.name")
        cfg = dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm, name=algorithm.name))
    if algorithm.configure is not None:
        cfg = algorithm.configure(cfg, frozenset(given))
    return check_privacy(cfg)


def _all_file_clients(cfg: ExperimentConfig, raw_data: dict[str, Any]) -> ExperimentConfig:
    """A file dataset without ``data.num_clients``: every client its files hold but the ``data.eval_clients`` held
    out (the number is written into ``config.toml``, so a resumed run keeps it)."""
    d = cfg.data
    if d.name not in FILE_DATASETS or "num_clients" in raw_data or not d.path.strip():
        return cfg
    available = FILE_DATASETS[d.name](d)
    _require(available > d.eval_clients,
             f"data.path = {d.path!r} holds {available} clients and data.eval_clients = {d.eval_clients} of them "
             f"are held out, which leaves none to train; lower data.eval_clients below {available} (and "
             "eval.clients to at most it), or set data.num_clients")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, num_clients=available - d.eval_clients))


#: a URI scheme ("file:", "http:", "sqlite:"); MLflow's bare names below are URIs too
URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
MLFLOW_BARE_URIS = frozenset({"databricks", "databricks-uc", "uc"})


def resolve_tracking(t: TrackingConfig) -> TrackingConfig:
    """Relative tracking locations made absolute (as ``data.path``): ``config.toml`` records where the run logged,
    so ``--resume`` from another directory continues there. A TensorBoard directory other than "run" becomes an
    absolute path; an MLflow store given as a path or a relative ``file:`` URI becomes an absolute ``file://`` URI."""
    _validate_tracking(t)
    board = t.tensorboard
    if board.strip() and board != "run":
        board = str(Path(board).expanduser().resolve())
    uri = t.mlflow_uri
    if uri.strip() and uri not in MLFLOW_BARE_URIS:
        if not URI_SCHEME.match(uri):
            uri = Path(uri).expanduser().resolve().as_uri()
        elif uri.startswith("file:") and not uri.startswith("file://"):
            uri = Path(uri[len("file:"):]).expanduser().resolve().as_uri()
    return dataclasses.replace(t, tensorboard=board, mlflow_uri=uri)


def _validate_tracking(t: TrackingConfig) -> None:
    for key, value in (("tracking.tensorboard", t.tensorboard), ("tracking.mlflow_uri", t.mlflow_uri)):
        _require(value == value.strip() and "\0" not in value,
                 f"{key} = {shown(value)} has leading or trailing spaces or a NUL; write the bare location "
                 "(\"\" turns it off)")
    _require(not t.mlflow_uri or bool(t.mlflow_experiment.strip()),
             "tracking.mlflow_experiment must name an MLflow experiment when tracking.mlflow_uri is set, got \"\"; "
             "e.g. tracking.mlflow_experiment=\"metafleet\"")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: ExperimentConfig, raw_data: dict[str, Any]) -> None:
    """Every range and combination of keys (``raw_data``: the [data] keys the user set)."""
    choices = {**CHOICES, "data.name": tuple(DATASETS), "model.name": tuple(MODELS),
               "algorithm.name": tuple(ALGORITHMS)}
    for key, options in choices.items():
        first, *rest = key.split(".")
        value: Any = section(cfg, first)
        for attr in rest:
            value = getattr(value, attr)
        if (key == "model.name" and cfg.model.factory) or (key == "algorithm.name" and cfg.algorithm.factory):
            continue
        _require(value in options, f"{key} = {value!r} is not supported; choose one of {', '.join(options)}")
    wrong = sorted((DATASET_ONLY - DATASET_KEYS[cfg.data.name]) & raw_data.keys())
    if wrong:
        owners = [n for n, keys in DATASET_KEYS.items() if wrong[0] in keys]
        raise ConfigError(f"data.{wrong[0]} applies to data.name = {' or '.join(map(repr, owners))}, "
                          f"not {cfg.data.name!r}; remove it")
    d, a, s, e = cfg.data, cfg.algorithm, cfg.system, cfg.eval
    name = cfg.name
    _require(bool(name.strip()) and len(name.encode()) <= MAX_NAME and name not in (".", "..")
             and "/" not in name and "\0" not in name,
             f"name = {shown(name)} must be 1 to {MAX_NAME} bytes without '/' or NUL (it names the run "
             "directory); choose a shorter or plainer name")
    _require(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}")
    _require(cfg.rounds >= 1, f"rounds must be >= 1, got {cfg.rounds}")
    _require(cfg.checkpoint_every >= 0,
             f"checkpoint_every must be >= 0 (0 = only on Ctrl-C), got {cfg.checkpoint_every}")
    _require(d.num_clients >= 1, f"data.num_clients must be >= 1, got {d.num_clients}")
    _require(d.eval_clients >= 0, f"data.eval_clients must be >= 0, got {d.eval_clients}")
    _require(d.shots >= 1 and d.query >= 1, "data.shots and data.query must be >= 1")
    _require(d.alpha >= 0 and d.beta >= 0, "data.alpha and data.beta must be >= 0 (they are variances)")
    _require(d.samples_per_client >= 0, "data.samples_per_client must be >= 0 (0 = FedProx's log-normal sizes)")
    _require(d.samples_per_client == 0 or d.samples_per_client >= 2,
             "data.samples_per_client must be >= 2 so that each client has a train and a test sample")
    _require(0 < d.test_fraction < 1, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
    _require(all(h >= 1 for h in cfg.model.hidden), f"model.hidden widths must be >= 1, got {list(cfg.model.hidden)}")
    for key, factory in (("model.factory", cfg.model.factory), ("algorithm.factory", cfg.algorithm.factory)):
        _require(not factory or ":" in factory, f"{key} = {factory!r} must look like 'package.module:function'")
    _require(a.local_steps >= 1, f"algorithm.local_steps must be >= 1, got {a.local_steps}")
    _require(a.local_lr > 0, f"algorithm.local_lr must be > 0, got {a.local_lr}")
    _require(a.batch_size >= 0, f"algorithm.batch_size must be >= 0 (0 = full batch), got {a.batch_size}")
    _require(a.server_lr > 0, f"algorithm.server_lr must be > 0, got {a.server_lr}")
    _require(0 <= a.server_momentum < 1, f"algorithm.server_momentum must be in [0, 1), got {a.server_momentum}")
    _require(0 <= a.server_beta1 < 1, f"algorithm.server_beta1 must be in [0, 1), got {a.server_beta1}")
    _require(0 <= a.server_beta2 < 1, f"algorithm.server_beta2 must be in [0, 1), got {a.server_beta2}")
    _require(a.server_tau > 0, f"algorithm.server_tau must be > 0 (FedOpt's adaptivity, e.g. 0.001), "
                               f"got {a.server_tau}")
    _require(a.outer_lr >= 0, f"algorithm.outer_lr must be >= 0 (0 = algorithm.local_lr), got {a.outer_lr}")
    _require(a.hf_delta > 0, f"algorithm.hf_delta must be > 0, got {a.hf_delta}")
    _require(a.switch_round >= 0, f"algorithm.switch_round must be >= 0 (0 = half of the rounds), got {a.switch_round}")
    _require(a.finetune_server_lr > 0, f"algorithm.finetune_server_lr must be > 0, got {a.finetune_server_lr}")
    _require(cfg.clients.per_round >= 1, f"clients.per_round must be >= 1, got {cfg.clients.per_round}")
    _require(cfg.clients.per_round <= MAX_PER_ROUND,
             f"clients.per_round = {cfg.clients.per_round} is more than {MAX_PER_ROUND:,} (a round's per-client "
             "rows are held in memory); lower it")
    _require(d.num_clients + d.eval_clients <= MAX_CLIENT_ID,
             f"data.num_clients + data.eval_clients = {d.num_clients + d.eval_clients} is more than 2**62 (client "
             "ids are 64-bit integers); lower them")
    _require(cfg.clients.per_round <= d.num_clients,
             f"clients.per_round = {cfg.clients.per_round} is larger than data.num_clients = {d.num_clients}; "
             "lower clients.per_round or raise data.num_clients")
    _require(s.actors >= 0, f"system.actors must be >= 0 (0 = size from the cluster), got {s.actors}")
    _require(s.cpus_per_actor > 0, f"system.cpus_per_actor must be > 0, got {s.cpus_per_actor}")
    _require(s.gpus_per_actor == 0 or 0 < s.gpus_per_actor <= 1,
             f"system.gpus_per_actor must be a fraction in (0, 1] (or 0 for none), got {s.gpus_per_actor}")
    _require(0 <= s.gpu_memory_fraction <= 1,
             f"system.gpu_memory_fraction must be a fraction in (0, 1] (or 0 for gpus_per_actor's share), "
             f"got {s.gpu_memory_fraction}")
    _require(s.clients_per_actor >= 0, f"system.clients_per_actor must be >= 0, got {s.clients_per_actor}")
    _require(s.threads >= 1, f"system.threads must be >= 1, got {s.threads}")
    _require(s.shard_cache >= 1, f"system.shard_cache must be >= 1, got {s.shard_cache}")
    _require(s.shard_cache_mb > 0, f"system.shard_cache_mb must be > 0 (MiB of cached shards per worker), "
                                   f"got {s.shard_cache_mb}")
    _require(s.max_failures >= 0, f"system.max_failures must be >= 0, got {s.max_failures}")
    _require(s.call_timeout_s >= 0, f"system.call_timeout_s must be >= 0 (seconds; 0 = no deadline), "
                                    f"got {s.call_timeout_s}")
    _require(e.every >= 1, f"eval.every must be >= 1, got {e.every}")
    _require(e.clients >= 0, f"eval.clients must be >= 0, got {e.clients}")
    _require(e.clients <= d.eval_clients,
             f"eval.clients = {e.clients} is larger than data.eval_clients = {d.eval_clients}; "
             "lower eval.clients or raise data.eval_clients")
    _require(e.adapt_steps >= 0, f"eval.adapt_steps must be >= 0, got {e.adapt_steps}")
    _require(e.adapt_lr > 0, f"eval.adapt_lr must be > 0, got {e.adapt_lr}")
    _require(d.name not in ("leaf", "table") or bool(d.path.strip()),
             f"data.name = {d.name!r} needs data.path (the dataset's directory or file)")
    _validate_pooled(d)
    _validate_system(cfg)
    _require(1 <= cfg.compression.levels <= MAX_LEVELS,
             f"compression.levels must be in [1, {MAX_LEVELS}] (QSGD's s), got {cfg.compression.levels}")
    _require(0 < cfg.compression.fraction <= 1,
             f"compression.fraction must be in (0, 1] (the share randk and topk keep), got {cfg.compression.fraction}")
    _require(cfg.metrics.flush_every >= 1, f"metrics.flush_every must be >= 1, got {cfg.metrics.flush_every}")


def _validate_pooled(d: DataConfig) -> None:
    _require(d.dirichlet_alpha > 0, f"data.dirichlet_alpha must be > 0, got {d.dirichlet_alpha}")
    _require(d.shards_per_client >= 1, f"data.shards_per_client must be >= 1, got {d.shards_per_client}")
    _require(d.quantity_sigma >= 0, f"data.quantity_sigma must be >= 0, got {d.quantity_sigma}")
    _require(d.pool_size >= 0, f"data.pool_size must be >= 0 (0 = 50 samples per client), got {d.pool_size}")
    _require(d.num_classes >= 2, f"data.num_classes must be >= 2, got {d.num_classes}")
    _require(d.features >= 1, f"data.features must be >= 1, got {d.features}")
    _require(d.separation > 0, f"data.separation must be > 0, got {d.separation}")


def _validate_distribution(key: str, dist: Distribution) -> None:
    _require(dist.median > 0, f"{key}.median must be > 0, got {dist.median}")
    _require(dist.sigma >= 0, f"{key}.sigma must be >= 0, got {dist.sigma}")
    _require(dist.shape > 0, f"{key}.shape must be > 0 (the Pareto tail index), got {dist.shape}")


def _validate_system(cfg: ExperimentConfig) -> None:
    s, dv, a = cfg.system, cfg.devices, cfg.async_
    _validate_distribution("devices.speed", dv.speed)
    _validate_distribution("devices.bandwidth", dv.bandwidth)
    _require(dv.uplink_ratio > 0, f"devices.uplink_ratio must be > 0, got {dv.uplink_ratio}")
    _require(0 < dv.availability <= 1,
             f"devices.availability must be a probability in (0, 1], got {dv.availability}")
    _require(0 <= dv.dropout < 1, f"devices.dropout must be a probability in [0, 1), got {dv.dropout}")
    _require(s.mode != "deadline" or s.deadline_s > 0,
             f"system.mode = \"deadline\" needs system.deadline_s > 0 (simulated seconds), got {s.deadline_s}")
    _require(s.deadline_s >= 0, f"system.deadline_s must be >= 0, got {s.deadline_s}")
    _require(s.overselect >= 1, f"system.overselect must be >= 1 (e.g. 1.3 samples 30% more), got {s.overselect}")
    if s.mode == "overselect":
        sampled = overselect_cohort(cfg.clients.per_round, s.overselect)
        _require(sampled <= cfg.data.num_clients,
                 f"system.overselect = {s.overselect} samples {sampled} clients, more than data.num_clients = "
                 f"{cfg.data.num_clients}; lower system.overselect")
    _require(s.max_concurrency >= 0, f"system.max_concurrency must be >= 0 (0 = clients.per_round), "
                                     f"got {s.max_concurrency}")
    _require(s.max_concurrency <= cfg.data.num_clients,
             f"system.max_concurrency = {s.max_concurrency} is larger than data.num_clients = "
             f"{cfg.data.num_clients}; lower it")
    _require(s.max_staleness >= 0, f"system.max_staleness must be >= 0 (0 = no limit), got {s.max_staleness}")
    _require(a.buffer_size >= 1, f"async.buffer_size must be >= 1, got {a.buffer_size}")
    _require(a.staleness_a >= 0, f"async.staleness_a must be >= 0, got {a.staleness_a}")
    _require(a.staleness_b >= 0, f"async.staleness_b must be >= 0, got {a.staleness_b}")
    _require(0 < a.mixing <= 1, f"async.mixing must be in (0, 1], got {a.mixing}")
    _require(a.proximal_rho >= 0, f"async.proximal_rho must be >= 0 (0 = off), got {a.proximal_rho}")
    if a.proximal_rho:
        _require(s.mode == "async" and a.rule == "fedasync",
                 f"async.proximal_rho = {a.proximal_rho} is FedAsync's client term; it needs system.mode = \"async\" "
                 "and async.rule = \"fedasync\" (or set async.proximal_rho = 0)")
        with_proximal(resolve(cfg.algorithm), a.proximal_rho)  # ConfigError for a client that is not local SGD
    if s.mode == "async" and a.rule == "fedasync":
        _require(cfg.algorithm.server_optimizer == "sgd" and cfg.algorithm.server_momentum == 0,
                 "async.rule = \"fedasync\" mixes models directly (no server optimizer); set "
                 "algorithm.server_optimizer = \"sgd\" and algorithm.server_momentum = 0, or use rule = \"fedbuff\"")
