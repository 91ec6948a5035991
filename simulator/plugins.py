"""Users' own code named in the config as ``"package.module:function"``: ``model.factory`` (a module) and
``algorithm.factory`` (an ``Algorithm`` record). One resolver serves both, in the driver and in every
worker (a Ray actor imports the module the same way: it must be importable there too)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from simulator.config.schema import ConfigError


def load_factory(key: str, path: str) -> Callable[..., Any]:
    """The callable named by ``path`` ("package.module:function"); any failure is a ConfigError naming ``key``."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key} = {path!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the user's factory path
        raise ConfigError(f"{key} = {path!r}: cannot import {module_name!r} ({exc}); "
                          "make the module importable (installed, or on PYTHONPATH)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key} = {path!r}: {module_name!r} has no callable {attr!r}")
    return fn


def call_factory(key: str, path: str, **offered: Any) -> Any:
    """Call the factory with those of the ``offered`` keyword arguments its signature takes (none if it
    takes none); an exception inside it is a ConfigError naming ``key``."""
    fn = load_factory(key, path)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and C types may have no signature
        params = {}
    try:
        return fn(**{k: v for k, v in offered.items() if k in params})
    except Exception as exc:
        raise ConfigError(f"{key} = {path!r} raised {type(exc).__name__}: {exc}") from None
