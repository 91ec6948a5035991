"""Users' own code named in the config: ``model.factory`` (a module) and ``algorithm.factory`` (an ``Algorithm``
record), each ``"package.module:function"`` or ``"path/to/file.py:function"``. One resolver serves both, in the
driver and in every worker.

Where a factory's module comes from (``locate``, when the config is read):

1. a module Python imports by name from elsewhere (installed, or on ``PYTHONPATH`` outside the two directories
   below) is imported by name;
2. otherwise its file is looked for next to the config file, then in the working directory
   (``package/module.py`` or ``package/module/__init__.py``; a ``.py`` path relative to the same places),
   and the factory is recorded as that file's absolute path (``/abs/dir/my_algorithms.py:fedprox``), as
   ``data.path`` is: ``config.toml`` then names the file wherever the run is resumed from, and Ray workers,
   whose ``sys.path`` and working directory are not the driver's, load the same file.

A file is loaded by itself (``importlib.util.spec_from_loader``) under a private module name
(``_metafleet_factory_<stem>_<hash>``, registered in ``sys.modules``), never by putting its directory on
``sys.path``: a local file named ``simulator.py`` or ``analysis.py`` cannot shadow metafleet's packages, and
the file's own imports (``import torch``, ``from simulator.algorithms.record import Algorithm``) resolve as
usual. Imports of sibling files (``from helpers import x``) are not resolved: install such a package, or put
it on ``PYTHONPATH``. The driver ships each factory file's source to its workers with the ``WorkerSpec``
(``factory_sources`` / ``provide_sources``), so Ray actors on other nodes load the same code without the file.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from simulator.config.schema import ConfigError

#: factory file path -> its source, as the driver shipped it to this worker (``provide_sources``)
_SOURCES: dict[str, str] = {}


def _split(key: str, spec: str) -> tuple[str, str]:
    module, sep, attr = spec.rpartition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"{key} = {spec!r} must look like 'package.module:function' or 'path/to/file.py:function'")
    return module, attr


def _origin(module: str) -> Path | None:
    """The file ``module`` imports from by name here (None: it does not import; a built-in or namespace
    package: the root, so that it counts as installed)."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError, AttributeError):  # a parent that is not a package, or an odd name
        return None
    if found is None:
        return None
    return Path(found.origin).resolve() if found.origin and found.has_location else Path("/")


def locate(key: str, spec: str, roots: Sequence[Path]) -> str:
    """``spec`` as the config records it: unchanged when its module imports by name from outside ``roots``, else
    the absolute path of its file found under ``roots`` (the config file's directory, then the working
    directory). A ``.py`` path that is in none of them is a ConfigError naming ``key``; a module that is nowhere
    is left for ``load_factory`` to report."""
    module, attr = _split(key, spec)
    if module.endswith(".py"):
        path = Path(module).expanduser()
        found = [path] if path.is_absolute() else [root / path for root in roots]
        for candidate in found:
            if candidate.is_file():
                return f"{candidate.resolve()}:{attr}"
        raise ConfigError(f"{key} = {spec!r}: no file {module!r} in {', '.join(map(str, roots))}; fix the path "
                          "(relative to the config file's directory or the working directory)")
    origin = _origin(module)
    if origin is not None and not any(origin.is_relative_to(root) for root in roots):
        return spec  # installed, or on PYTHONPATH elsewhere: imported by name, in the workers too
    parts = module.split(".")
    for root in roots:
        for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return f"{candidate.resolve()}:{attr}"
    return spec


def search_roots(config_dir: Path | None) -> list[Path]:
    """Where ``locate`` looks for a factory file: the config file's directory (when there is one), then the
    working directory."""
    roots = [config_dir.resolve()] if config_dir is not None else []
    cwd = Path.cwd()
    return roots + ([cwd] if cwd not in roots else [])


def factory_sources(specs: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """(path, source) of every factory given as a file path: what the driver ships to its workers."""
    out = []
    for spec in specs:
        module = spec.rpartition(":")[0]
        if spec and module.endswith(".py"):
            try:
                out.append((module, Path(module).read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"factory {spec!r}: cannot read {module!r} ({exc}); restore the file") from None
    return tuple(out)


def provide_sources(sources: Iterable[tuple[str, str]]) -> None:
    """Remember the factory sources the driver shipped (a worker calls this before building its model)."""
    _SOURCES.update(dict(sources))


def _load_file(key: str, spec: str, path: str) -> ModuleType:
    """The module of the file ``path`` (its shipped source when there is one), loaded once per process under a
    private name."""
    source = _SOURCES.get(path)
    if source is None:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{key} = {spec!r}: cannot read {path!r} ({exc}); check that the file exists on "
                              "this machine") from None
    digest = hashlib.sha256(f"{path}\0{source}".encode()).hexdigest()[:12]
    name = f"_metafleet_factory_{''.join(c if c.isalnum() else '_' for c in Path(path).stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_loader(name, loader=None, origin=path)
    assert module_spec is not None  # a spec without a loader is always built
    module = importlib.util.module_from_spec(module_spec)
    module.__file__ = path
    sys.modules[name] = module  # dataclasses and typing look a module up by name while it executes
    try:
        exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102 - the user's own factory file
    except Exception as exc:
        del sys.modules[name]
        raise ConfigError(f"{key} = {spec!r}: {path!r} raised {type(exc).__name__} on import: {exc}") from None
    return module


def load_factory(key: str, spec: str) -> Callable[..., Any]:
    """The callable named by ``spec``; any failure is a ConfigError naming ``key``."""
    module_name, attr = _split(key, spec)
    if module_name.endswith(".py"):
        module = _load_file(key, spec, module_name)
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any import failure is the user's factory path
            raise ConfigError(f"{key} = {spec!r}: cannot import {module_name!r} ({exc}); put the module next to "
                              "the config file or in the working directory, or make it importable (installed, or "
                              "on PYTHONPATH)") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key} = {spec!r}: {module_name!r} has no callable {attr!r}")
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
