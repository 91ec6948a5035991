"""Experiment configuration: frozen dataclasses parsed once, at the entry point, from TOML.

Every key has a default; the defaults *are* the built-in quickstart (Reptile on the sinusoid
task, 1,000 clients). ``load_config`` reads a TOML file (or nothing), applies ``--set``
overrides, and returns an ``ExperimentConfig`` or raises ``ConfigError`` naming the key and the
fix. Nothing downstream re-validates or reads raw dictionaries.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Bad user input: one message naming the key and how to fix it (the CLI exits with code 2)."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "sinusoid"
    num_clients: int = 1000
    eval_clients: int = 100
    # sinusoid (Finn et al. 2017)
    shots: int = 10
    query: int = 10
    # synthetic (Li et al. 2020, FedProx)
    alpha: float = 1.0
    beta: float = 1.0
    samples_per_client: int = 0
    iid: bool = False
    test_fraction: float = 0.2
    # pooled labelled datasets (gaussian, digits) split over clients by a partitioner
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    quantity_sigma: float = 1.0
    # gaussian mixture: pool size (0 = 50 samples per client), classes, features, class-mean spread
    pool_size: int = 0
    num_classes: int = 10
    features: int = 20
    separation: float = 0.6
    # files: "leaf" (LEAF's JSON train/ and test/ directories) or "table" (Parquet/CSV, one row per sample)
    path: str = ""
    client_column: str = "client_id"
    label_column: str = "label"


_PARTITION_KEYS = {"partition", "dirichlet_alpha", "shards_per_client", "quantity_sigma", "test_fraction"}

#: keys that belong to some datasets only; setting them for another dataset is an error
DATASET_KEYS: dict[str, frozenset[str]] = {
    "sinusoid": frozenset({"shots", "query"}),
    "synthetic": frozenset({"alpha", "beta", "samples_per_client", "iid", "test_fraction"}),
    "gaussian": frozenset(_PARTITION_KEYS | {"pool_size", "num_classes", "features", "separation"}),
    "digits": frozenset(_PARTITION_KEYS),
    "leaf": frozenset({"path"}),
    "table": frozenset({"path", "client_column", "label_column", "test_fraction"}),
}
_DATASET_ONLY = frozenset().union(*DATASET_KEYS.values())


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"
    hidden: tuple[int, ...] = (40, 40)
    factory: str = ""


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "reptile"
    local_steps: int = 10
    local_lr: float = 0.02
    batch_size: int = 10
    server_lr: float = 1.0
    server_optimizer: str = "sgd"
    server_momentum: float = 0.0
    outer_lr: float = 0.0          # Per-FedAvg's beta (Fallah et al. 2020); 0 = local_lr
    hf_delta: float = 0.001        # Per-FedAvg HF: finite-difference step of the Hessian-vector product
    switch_round: int = 0          # pfedavg: first round of Reptile fine-tuning (0 = half of the rounds)
    finetune_server_lr: float = 0.001  # pfedavg: the fine-tuning phase's server Adam learning rate


@dataclass(frozen=True)
class ClientsConfig:
    per_round: int = 20


@dataclass(frozen=True)
class SystemConfig:
    backend: str = "ray"
    actors: int = 0
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    clients_per_actor: int = 0
    address: str = ""
    threads: int = 1
    ship_code: bool = False
    shard_cache: int = 65536   # client shards each worker keeps (LRU), at most ...
    shard_cache_mb: float = 512.0  # ... and at most this many MiB of them
    vectorize: bool = True     # train a cohort's clients together with torch.func.vmap where the model allows
    max_failures: int = 3      # lost worker calls (actor or node death) retried per round before the run stops
    # round policy, in simulated time
    mode: str = "sync"
    deadline_s: float = 0.0
    overselect: float = 1.3
    max_concurrency: int = 0   # async: clients training at once (0 = clients.per_round)
    max_staleness: int = 0     # async: drop updates staler than this (0 = no limit)


@dataclass(frozen=True)
class Distribution:
    """A positive per-client quantity drawn from (seed, client id): ``dist`` is "constant" (always
    ``median``), "lognormal" (median ``median``, log-space std ``sigma``) or "pareto" (heavy-tailed
    slowness: the reciprocal of the rate is Pareto with tail index ``shape``; median ``median``)."""

    dist: str = "lognormal"
    median: float = 1.0
    sigma: float = 1.0
    shape: float = 1.5


@dataclass(frozen=True)
class DevicesConfig:
    """System heterogeneity: compute speed in samples per simulated second, download bandwidth in
    Mbit/s (upload = ``uplink_ratio`` x download), or a FedScale-style ``trace`` file; availability
    (probability of being online when sampled, or an on/off ``availability_trace``) and the
    probability of dropping out mid-update."""

    speed: Distribution = field(default_factory=lambda: Distribution("lognormal", 100.0, 1.0))
    bandwidth: Distribution = field(default_factory=lambda: Distribution("lognormal", 20.0, 1.0))
    uplink_ratio: float = 0.5
    trace: str = ""
    availability: float = 1.0
    availability_trace: str = ""
    dropout: float = 0.0


@dataclass(frozen=True)
class AsyncConfig:
    """Asynchronous aggregation (``system.mode = "async"``): FedBuff (Nguyen et al. 2022) or
    FedAsync (Xie et al. 2019), with a staleness function s(tau)."""

    rule: str = "fedbuff"
    buffer_size: int = 10
    staleness: str = "sqrt"
    staleness_a: float = 0.5
    staleness_b: float = 4.0
    mixing: float = 0.6


@dataclass(frozen=True)
class EvalConfig:
    every: int = 20
    clients: int = 100
    adapt_steps: int = 10
    adapt_lr: float = 0.02


@dataclass(frozen=True)
class MetricsConfig:
    flush_every: int = 5


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "quickstart"
    seed: int = 0
    rounds: int = 300
    checkpoint_every: int = 10  # write the server state every N rounds (async: server updates); 0 = only on Ctrl-C
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    async_: AsyncConfig = field(default_factory=AsyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """``dataclasses.replace`` with dotted keys: ``cfg.replace(**{"system.actors": 2})``."""
        return from_dict(_set_dotted(to_dict(self), changes))


#: TOML section name -> its dataclass (the ``[async]`` section is the attribute ``async_``)
TOP_KEYS = ("name", "seed", "rounds", "checkpoint_every")
_SECTIONS: dict[str, type] = {name.rstrip("_"): t for name, t in typing.get_type_hints(ExperimentConfig).items()
                              if name not in TOP_KEYS}


def _attr(section: str) -> str:
    return "async_" if section == "async" else section


def section(cfg: ExperimentConfig, name: str) -> Any:
    """A config section by its TOML name: ``section(cfg, "async")`` is ``cfg.async_``."""
    return getattr(cfg, _attr(name))

CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": ("sinusoid", "synthetic", "gaussian", "digits", "leaf", "table"),
    "data.partition": ("iid", "dirichlet", "shards", "quantity"),
    "model.name": ("mlp", "femnist_cnn", "shakespeare_lstm"),
    "algorithm.name": ("fedavg", "reptile", "fomaml", "maml", "perfedavg_fo", "perfedavg_hf", "metasgd", "pfedavg"),
    "algorithm.server_optimizer": ("sgd", "adam"),
    "system.backend": ("ray", "inline"),
    "system.mode": ("sync", "deadline", "overselect", "async"),
    "async.rule": ("fedbuff", "fedasync"),
    "async.staleness": ("constant", "polynomial", "sqrt", "hinge"),
    "devices.speed.dist": ("constant", "lognormal", "pareto"),
    "devices.bandwidth.dist": ("constant", "lognormal", "pareto"),
}


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Nested plain dict (tuples become lists), as written to ``config.toml``."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return list(v) if isinstance(v, tuple) else v

    out: dict[str, Any] = {k: getattr(cfg, k) for k in TOP_KEYS}
    for name in _SECTIONS:
        out[name] = plain(section(cfg, name))
    own = DATASET_KEYS[cfg.data.name] if cfg.data.name in DATASET_KEYS else frozenset()
    out["data"] = {k: v for k, v in out["data"].items() if k not in _DATASET_ONLY or k in own}
    return out


def flatten_dict(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"data.name": ..., "devices.speed.median": ...}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_dict(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def flatten(cfg: ExperimentConfig) -> dict[str, Any]:
    """``{"data.name": ..., "devices.speed.median": ...}``: one column per key, for analysis frames."""
    return flatten_dict(to_dict(cfg))


def parse_value(text: str) -> Any:
    """A ``--set`` value as a TOML value (``[64]``, ``0.5``, ``true``, ``"x"``); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read ``path`` (TOML; None for the quickstart), apply ``key.sub=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a TOML file")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}; fix the syntax") from None
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form key.sub=value; write e.g. --set rounds=50")
        changes[key.strip()] = parse_value(value.strip())
    return from_dict(_set_dotted(raw, changes))


def _set_dotted(raw: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in changes.items():
        parts = key.split(".")
        if len(parts) > 3 or (len(parts) >= 2 and parts[0] not in _SECTIONS):
            raise ConfigError(f"unknown key {key!r}{_suggest(key, _all_keys())}")
        if len(parts) == 1:
            out[key] = value
            continue
        table = out.setdefault(parts[0], {})
        if not isinstance(table, dict):
            raise ConfigError(f"{parts[0]!r} must be a table ([{parts[0]}]), not a value")
        if len(parts) == 3:  # a field of a nested table, e.g. devices.speed.sigma
            if key not in _all_keys():
                raise ConfigError(f"unknown key {key!r}{_suggest(key, _all_keys())}")
            sub = table.get(parts[1], {})
            table[parts[1]] = {**sub, parts[2]: value} if isinstance(sub, dict) else sub
            continue
        table[parts[1]] = value
    return out


def _all_keys() -> list[str]:
    keys = list(TOP_KEYS)
    for name, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            keys.append(f"{name}.{f.name}")
            sub = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(sub):
                keys += [f"{name}.{f.name}.{g.name}" for g in dataclasses.fields(sub)]
    return keys


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid keys are {', '.join(options)}"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type annotation; ints are accepted where floats are."""
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}; quote it, e.g. {key}=\"...\"")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, dict):
            return _build_section(key, annotation, value)
        raise ConfigError(f"{key} must be a table such as {{dist = \"lognormal\", median = 100.0, sigma = 1.0}}, "
                          f"got {value!r}")
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise ConfigError(f"{key} must be a list of integers such as [64, 64], got {value!r}")
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # programming error


def _build_section(name: str, cls: Any, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name!r} must be a table ([{name}]), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in names:
            raise ConfigError(f"unknown key {full!r}{_suggest(full, [f'{name}.{n}' for n in names])}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            # a partial nested table keeps this field's own defaults (speed's median 100, not 1)
            default = getattr(cls(), key)
            value = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)} | value
        kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an ``ExperimentConfig`` from a nested dict (parsed TOML)."""
    top_hints = typing.get_type_hints(ExperimentConfig)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            kwargs[_attr(key)] = _build_section(key, _SECTIONS[key], value)
        elif key in TOP_KEYS:
            kwargs[key] = _coerce(key, value, top_hints[key])
        else:
            raise ConfigError(f"unknown key {key!r}{_suggest(key, _all_keys())}")
    cfg = ExperimentConfig(**kwargs)
    if cfg.data.path and not Path(cfg.data.path).expanduser().is_absolute():
        # actors (on other nodes too) read the data themselves: give them a path independent of their cwd
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                path=str(Path(cfg.data.path).expanduser().resolve())))
    if cfg.algorithm.name == "pfedavg" and cfg.algorithm.switch_round == 0:  # 0 = half of the rounds, written out
        cfg = dataclasses.replace(cfg, algorithm=dataclasses.replace(cfg.algorithm,
                                                                    switch_round=max(1, cfg.rounds // 2)))
    from simulator.config_checks import validate

    validate(cfg, raw.get("data", {}) if isinstance(raw.get("data"), dict) else {})
    return cfg


def overselect_cohort(per_round: int, overselect: float) -> int:
    """Clients sampled per overselect round: ceil(overselect x per_round), ignoring float noise
    (1.1 x 50 is 55.00000000000001, and samples 55)."""
    return math.ceil(overselect * per_round - 1e-9)


def dumps_toml(data: dict[str, Any]) -> str:
    """Write the (two-level) config dict as TOML; round-trips through ``tomllib``."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string (escapes included)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):  # a nested table, written inline: speed = {dist = "lognormal", ...}
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


__all__ = [
    "AlgorithmConfig", "AsyncConfig", "ClientsConfig", "ConfigError", "DataConfig", "DevicesConfig",
    "Distribution", "EvalConfig", "ExperimentConfig", "MetricsConfig", "ModelConfig", "SystemConfig", "dumps_toml",
    "flatten", "flatten_dict", "from_dict", "load_config", "parse_value", "section", "to_dict",
]
