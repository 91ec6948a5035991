"""The on-disk cache shared by the file datasets (LEAF and tables): where it lives, its key, its atomic
build, the ``.npy`` column writer that fills it, and the seeded choice of which users become clients.

A cache is a directory of memory-mapped ``.npy`` arrays plus an ``index.npz``, keyed by a fingerprint of
the source files' names, sizes and mtimes, so that it is rebuilt whenever a source file changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from simulator.config.schema import ConfigError, DataConfig
from simulator.rng import generator

log = logging.getLogger("metafleet.data")

#: bump when the cache layout changes: old caches are then ignored (and rebuilt); 2: with a manifest
CACHE_VERSION = 2
#: written last into a finished cache: every file's size, and the index's SHA-256
MANIFEST = "manifest.txt"
#: a temporary build directory this old is a killed build's leftover
STALE_BUILD_S = 86400.0


def fingerprint(files: list[Path], root: Path, extra: str = "") -> str:
    """A short hash of the files' names (relative to ``root``), sizes and mtimes: the cache key."""
    h = hashlib.sha256(f"metafleet-cache-{CACHE_VERSION}\0{extra}\n".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_candidates(home: Path, tag: str) -> list[Path]:
    """Where a cache may live: ``<home>/.metafleet-cache/<tag>``, else ``~/.cache/metafleet/<tag>``."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [home / ".metafleet-cache" / tag, user / "metafleet" / tag]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(directory: Path) -> None:
    """Record every file's size and the index's SHA-256 (the index is small; the arrays are checked by size),
    as tab-separated lines after a version header."""
    lines = [f"{p.name}\t{p.stat().st_size}\t{_sha256(p) if p.name == 'index.npz' else '-'}"
             for p in sorted(directory.iterdir()) if p.is_file()]
    (directory / MANIFEST).write_text(f"metafleet-cache {CACHE_VERSION}\n" + "\n".join(lines) + "\n")


def damage(directory: Path) -> str | None:
    """Why a finished cache is not intact (a file missing, of another size, or an index changed), or None."""
    try:
        header, *lines = (directory / MANIFEST).read_text().splitlines()
        files = [(name, int(size), digest) for name, size, digest in (line.split("\t") for line in lines)]
    except (OSError, ValueError, UnicodeDecodeError):
        return f"its {MANIFEST} is missing or unreadable"
    if header != f"metafleet-cache {CACHE_VERSION}":
        return f"its {MANIFEST} is of another cache version"
    for name, size, digest in files:
        path = directory / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest {size}"
        if digest != "-" and _sha256(path) != digest:
            return f"{name} does not match its checksum"
    return None


def find_or_build(candidates: list[Path], build: Callable[[Path], None], key: str) -> Path:
    """The first intact cache of ``candidates``, else one built by ``build(tmp)`` in a fresh temporary
    directory of the first writable candidate's parent, given a manifest and renamed into place: a killed
    build leaves no half cache, of concurrent builders the first rename wins, and a cache damaged since
    (a file truncated or replaced) is detected by its manifest and rebuilt."""
    for c in candidates:
        if c.is_dir():
            why = damage(c)
            if why is None:
                return c
            log.warning("%s: the dataset cache %s is damaged (%s); rebuilding it", key, c, why)
            shutil.rmtree(c, ignore_errors=True)
    errors = []
    for c in candidates:
        try:
            c.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{c.name}-", dir=c.parent))
        except OSError as exc:
            errors.append(f"{c.parent}: {exc.strerror or exc}")
            continue
        log.warning("%s: building the dataset cache %s (once: later runs and the workers reuse it)", key, c)
        try:
            build(tmp)
            write_manifest(tmp)
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared dataset's cache from other users
            try:
                tmp.rename(c)
            except OSError:
                if damage(c) is not None:  # not a concurrent builder's finished cache
                    raise
        except OSError as exc:
            raise ConfigError(f"{key}: could not write the dataset cache in {c.parent} ({exc}); "
                              "free disk space or make the directory writable") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in c.parent.glob(f".tmp-{c.name}-*"):  # left by killed builds a day or more ago
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > STALE_BUILD_S:
                    shutil.rmtree(stale)
        return c
    raise ConfigError(f"{key}: no writable directory for the dataset cache ({'; '.join(errors)}); "
                      "make one of them writable")


class ColumnWriter:
    """An ``.npy`` array written by appending rows, its length unknown until ``finish``: the rows go to
    a raw file, which ``finish`` copies after the ``.npy`` header."""

    def __init__(self, path: Path, dtype: Any, width: int | None = None) -> None:
        self.path, self.dtype, self.width, self.rows = path, np.dtype(dtype), width, 0
        self._raw_path = path.with_name(path.name + ".raw")
        self._raw = open(self._raw_path, "wb")  # closed by finish

    def append(self, rows: np.ndarray) -> None:
        self._raw.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def finish(self) -> None:
        self._raw.close()
        shape = (self.rows,) if self.width is None else (self.rows, self.width)
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        with open(self.path, "wb") as out, open(self._raw_path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, 1 << 24)
        self._raw_path.unlink()


def pick_clients(keep: np.ndarray, cfg: DataConfig, seed: int, purpose: str, found: str) -> np.ndarray:
    """The rows of ``keep`` (usable users or clients) that become client ids 0.. (training, then held-out),
    in a seeded order; too few of them is a ConfigError (``found`` says what the data has)."""
    total = cfg.num_clients + cfg.eval_clients
    if total > keep.size:
        raise ConfigError(
            f"data.num_clients + data.eval_clients = {cfg.num_clients} + {cfg.eval_clients} = {total} clients, "
            f"but {found}; lower data.num_clients or data.eval_clients so that they add up to at most {keep.size}")
    return keep[generator(seed, purpose).permutation(keep.size)][:total]
