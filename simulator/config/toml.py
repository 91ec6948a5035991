"""Reading and writing the configuration as TOML: parsing files and ``--set`` overrides, coercing values to
the schema's types, and writing ``config.toml`` back.

``build`` turns a nested dict (parsed TOML) into an ``ExperimentConfig`` whose every value has the type its
field declares, without checking ranges or choices: ``simulator.experiment`` does that, against the
registries, and is what callers use.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

from simulator.config.schema import (
    DATASET_KEYS,
    DATASET_ONLY,
    SECTIONS,
    TOP_KEYS,
    ConfigError,
    ExperimentConfig,
    attribute,
    section,
)

#: the range every integer key must fit (the metrics tables store them as int64)
INT64 = (-(2**63), 2**63 - 1)


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Nested plain dict (tuples become lists), as written to ``config.toml``."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return list(v) if isinstance(v, tuple) else v

    out: dict[str, Any] = {k: getattr(cfg, k) for k in TOP_KEYS}
    for name in SECTIONS:
        out[name] = plain(section(cfg, name))
    own = DATASET_KEYS[cfg.data.name] if cfg.data.name in DATASET_KEYS else frozenset()
    out["data"] = {k: v for k, v in out["data"].items() if k not in DATASET_ONLY or k in own}
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


def set_dotted(raw: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in changes.items():
        parts = key.split(".")
        if len(parts) > 3 or (len(parts) >= 2 and parts[0] not in SECTIONS):
            raise ConfigError(f"unknown key {key!r}{suggest(key, all_keys())}")
        if len(parts) == 1:
            out[key] = value
            continue
        table = out.setdefault(parts[0], {})
        if not isinstance(table, dict):
            raise ConfigError(f"{parts[0]!r} must be a table ([{parts[0]}]), not a value")
        if len(parts) == 3:  # a field of a nested table, e.g. devices.speed.sigma
            if key not in all_keys():
                raise ConfigError(f"unknown key {key!r}{suggest(key, all_keys())}")
            sub = table.get(parts[1], {})
            table[parts[1]] = {**sub, parts[2]: value} if isinstance(sub, dict) else sub
            continue
        table[parts[1]] = value
    return out


def all_keys() -> list[str]:
    keys = list(TOP_KEYS)
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            keys.append(f"{name}.{f.name}")
            sub = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(sub):
                keys += [f"{name}.{f.name}.{g.name}" for g in dataclasses.fields(sub)]
    return keys


def suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; valid keys are {', '.join(options)}"


def coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type annotation; ints are accepted where floats are."""
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT64[0] <= value <= INT64[1]:
                raise ConfigError(f"{key} = {shown(value)} is out of range: it must fit a 64-bit integer "
                                  f"({INT64[0]} to {INT64[1]})")
            return value
        raise ConfigError(f"{key} must be an integer, got {shown(value)}")
    if annotation is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {shown(value)}; quote it, e.g. {key}=\"...\"")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, dict):
            return build_section(key, annotation, value)
        raise ConfigError(f"{key} must be a table such as {{dist = \"lognormal\", median = 100.0, sigma = 1.0}}, "
                          f"got {value!r}")
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
        raise ConfigError(f"{key} must be a list of integers such as [64, 64], got {value!r}")
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # programming error


def build_section(name: str, cls: Any, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name!r} must be a table ([{name}]), got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{name}.{key}"
        if key not in names:
            raise ConfigError(f"unknown key {full!r}{suggest(full, [f'{name}.{n}' for n in names])}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            # a partial nested table keeps this field's own defaults (speed's median 100, not 1)
            default = getattr(cls(), key)
            value = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)} | value
        kwargs[key] = coerce(full, value, hints[key])
    return cls(**kwargs)


def build(raw: dict[str, Any]) -> ExperimentConfig:
    """An ``ExperimentConfig`` from a nested dict, every value coerced to its field's type (not yet validated)."""
    top_hints = typing.get_type_hints(ExperimentConfig)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            kwargs[attribute(key)] = build_section(key, SECTIONS[key], value)
        elif key in TOP_KEYS:
            kwargs[key] = coerce(key, value, top_hints[key])
        else:
            raise ConfigError(f"unknown key {key!r}{suggest(key, all_keys())}")
    return ExperimentConfig(**kwargs)


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a nested dict; a missing, unreadable or malformed file is a ``ConfigError``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass the path of a TOML file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}; fix the syntax") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read ({exc.strerror or exc}); pass a readable "
                          "TOML file") from None


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["rounds=50", "model.hidden=[64]"]`` as ``{"rounds": 50, "model.hidden": [64]}``."""
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r} is not of the form key.sub=value; write e.g. --set rounds=50")
        changes[key.strip()] = parse_value(value.strip())
    return changes


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


