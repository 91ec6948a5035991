"""Users' own federated data: one table, one row per sample, partitioned by a client column.

``data.path`` is a Parquet file, a CSV file, or a directory of Parquet files (read as one Arrow
dataset). ``data.client_column`` (any type) says which client a row belongs to,
``data.label_column`` its label, and every other column is a numeric feature (float32 inputs; a
pandas index saved as a column, ``__index_level_0__``, is ignored).
Integer (or boolean) labels are classes (non-negative ones are kept as class indices, output_dim =
max + 1; otherwise the distinct values are numbered in sorted order), string labels are numbered
0..C-1 in sorted order, float labels are a regression target (output_dim 1, y of shape (n, 1)).

The table is read once into a cache (``simulator.data.filecache.find_or_build``): the features and labels as
``.npy`` arrays with the rows grouped by client, and an index of each client's rows. The driver
keeps only that index; a worker memory-maps the arrays and reads only its clients' rows.
Client ids: the distinct client values sorted, clients with fewer than 2 rows dropped, then
permuted with ``generator(seed, "table_clients")``; an unset ``num_clients`` is every client but the held-out
ones (``available_clients``, resolved by ``simulator.experiment``). A client's rows are split with
``generator(seed, "table_split", 0, client_id)``: a permutation, the last
``min(max(1, round(n * test_fraction)), n - 1)`` rows the query split (as for the pooled datasets).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import torch
from pyarrow import csv

from simulator.config.schema import ConfigError, DataConfig
from simulator.data.base import ClientShard
from simulator.data.filecache import cache_candidates, find_or_build, fingerprint, pick_clients
from simulator.rng import generator

log = logging.getLogger("metafleet.data")

#: every client needs a support and a query sample
MIN_CLIENT_ROWS = 2
#: the index pandas' ``to_parquet`` stores as a column (e.g. of a filtered frame): not a feature
PANDAS_INDEX = re.compile(r"__index_level_\d+__")


def _is_csv(p: Path) -> bool:
    return p.name.lower().endswith((".csv", ".csv.gz"))


def _is_parquet(p: Path) -> bool:
    return p.suffix.lower() in (".parquet", ".pq")


def _files(src: Path) -> list[Path]:
    """The file, or the directory's Parquet files (hidden and ``_`` entries skipped, as Arrow does)."""
    fix = "point data.path at a .parquet or .csv file or a directory of .parquet files"
    if src.is_file():
        if not (_is_csv(src) or _is_parquet(src)):
            raise ConfigError(f"data.path = {str(src)!r} is neither a .parquet nor a .csv file; {fix}")
        return [src]
    if not src.is_dir():
        raise ConfigError(f"data.path = {str(src)!r} does not exist; {fix}")
    files = sorted(p for p in src.rglob("*") if p.is_file() and _is_parquet(p)
                   and not any(part.startswith((".", "_")) for part in p.relative_to(src).parts))
    if not files:
        raise ConfigError(f"data.path = {str(src)!r} is a directory without .parquet files; {fix}")
    return files


def _read(src: Path) -> Any:
    """The whole table as a ``pyarrow.Table`` (only while the cache is built)."""
    try:
        if src.is_file() and _is_csv(src):
            return csv.read_csv(src)
        return ds.dataset(src, format="parquet").to_table()
    except (pa.ArrowException, OSError, ValueError) as exc:
        kind = "CSV" if _is_csv(src) else "Parquet"
        raise ConfigError(f"data.path = {str(src)!r} cannot be read as {kind} ({exc}); "
                          "check that the file is complete and in that format") from None


def _column(table: Any, name: str, key: str, src: Path) -> Any:
    """A column decoded to plain values; a missing column or a missing value is a ConfigError."""
    if name not in table.column_names:
        raise ConfigError(f"{key} = {name!r} is not a column of {str(src)!r}; its columns are "
                          f"{', '.join(table.column_names)}; set {key} to one of them")
    col = table[name]
    if pa.types.is_dictionary(col.type):
        col = pa.chunked_array([c.dictionary_decode() for c in col.chunks], type=col.type.value_type)
    if col.null_count:
        raise ConfigError(f"{key} = {name!r}: {col.null_count} rows of {str(src)!r} have no value; "
                          "fill or drop them")
    return col


def _labels(col: Any, src: Path, name: str) -> tuple[str, np.ndarray, int, list[str]]:
    """(task, y, output_dim, class names) of the label column."""
    t = col.type
    values = col.to_numpy(zero_copy_only=False)
    if pa.types.is_floating(t):
        return "regression", values.astype(np.float32), 1, []
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        values = values.astype(np.int64)
        if values.size and values.min() >= 0:
            return "classification", values, int(values.max()) + 1, []
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise ConfigError(f"data.label_column = {name!r} of {str(src)!r} has type {t}; use integer or string "
                          "labels (classification) or float labels (regression)")
    classes, y = np.unique(values, return_inverse=True)
    return "classification", y.astype(np.int64), len(classes), [str(c) for c in classes]


def _check_finite(values: np.ndarray, src: Path, what: str, clients: Any) -> None:
    """A NaN or infinite value (also a float too large for float32) is bad input naming row and client."""
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ConfigError(f"data.path = {str(src)!r}: {what} holds a non-finite value ({values[row]}) in row {row} "
                          f"(client {clients[row].as_py()!r}) and {int(bad.sum()) - 1} more rows; fix or drop them "
                          "(metafleet never trains on NaN or infinite values)")


def _build(src: Path, cfg: DataConfig, out: Path) -> None:
    """Read the table once; write x.npy (float32, rows grouped by client), y.npy and index.npz."""
    table = _read(src)
    clients = _column(table, cfg.client_column, "data.client_column", src)
    labels = _column(table, cfg.label_column, "data.label_column", src)
    if cfg.client_column == cfg.label_column:
        raise ConfigError(f"data.client_column and data.label_column are both {cfg.label_column!r}; "
                          "set them to two different columns")
    features = [n for n in table.column_names if n not in (cfg.client_column, cfg.label_column)
                and not PANDAS_INDEX.fullmatch(n)]
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    bad = [f"{n} ({table[n].type})" for n in features if not any(test(table[n].type) for test in numeric)]
    if bad or not features:
        raise ConfigError(f"data.path = {str(src)!r}: every column other than data.client_column and "
                          "data.label_column is a feature and must be numeric, but "
                          + (f"{', '.join(bad)} are not; drop or encode them" if bad else
                             "there are no other columns; add feature columns"))
    task, y, output_dim, class_names = _labels(labels, src, cfg.label_column)
    if task == "regression":
        _check_finite(y, src, f"data.label_column = {cfg.label_column!r}", clients)
    names, which = np.unique(clients.to_numpy(zero_copy_only=False), return_inverse=True)
    order = np.argsort(which, kind="stable")
    counts = np.bincount(which, minlength=len(names)).astype(np.int64)
    x = np.empty((len(order), len(features)), dtype=np.float32)
    for j, n in enumerate(features):
        col = table[n]
        if col.null_count:
            raise ConfigError(f"data.path = {str(src)!r}: feature column {n!r} has {col.null_count} missing "
                              "values; fill or drop them")
        with np.errstate(over="ignore"):  # a value too large for float32 becomes inf, reported just below
            values = col.to_numpy(zero_copy_only=False).astype(np.float32)
        _check_finite(values, src, f"feature column {n!r}", clients)
        x[:, j] = values[order]
    del table, clients, labels
    np.save(out / "x.npy", x)
    np.save(out / "y.npy", y[order])
    native = names if names.dtype.kind in "biuf" else np.array([str(n) for n in names], dtype=str)
    np.savez(out / "index.npz", clients=np.array([str(n) for n in names], dtype=str), client_values=native,
             count=counts,
             start=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64), task=np.array(task),
             output_dim=np.array(output_dim), features=np.array(features, dtype=str),
             classes=np.array(class_names, dtype=str))


def _open(cfg: DataConfig) -> tuple[Path, Path]:
    """(the table's path, its cache), building the cache on first use."""
    src = Path(cfg.path).expanduser().resolve()
    files = _files(src)
    home = src if src.is_dir() else src.parent
    tag = "table-" + fingerprint(files, home, f"{cfg.client_column}\0{cfg.label_column}")
    cache = find_or_build(cache_candidates(home, tag), lambda out: _build(src, cfg, out), f"data.path = {str(src)!r}")
    return src, cache


def available_clients(cfg: DataConfig) -> int:
    """How many clients the table holds: distinct ``client_column`` values with at least ``MIN_CLIENT_ROWS`` rows
    (an unset ``data.num_clients`` is this less ``data.eval_clients``)."""
    _, cache = _open(cfg)
    with np.load(cache / "index.npz") as index:
        return int((index["count"] >= MIN_CLIENT_ROWS).sum())


class TableDataset:
    """A client-partitioned table (Parquet or CSV); see the module docstring."""
    input_dtype = torch.float32

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        src, self.cache = _open(cfg)
        with np.load(self.cache / "index.npz") as index:
            self.task, self.output_dim = str(index["task"]), int(index["output_dim"])
            self.features, self.classes = index["features"].tolist(), index["classes"].tolist()
            names, start, count = index["clients"], index["start"], index["count"]
            values = index["client_values"] if "client_values" in index else names  # (older caches: as text)
        self.input_dim = len(self.features)
        keep = np.flatnonzero(count >= MIN_CLIENT_ROWS)
        self.available, self.skipped_clients = keep.size, len(names) - keep.size
        if self.skipped_clients:
            log.info("table %s: skipped %d of %d clients with fewer than %d rows", src, self.skipped_clients,
                     len(names), MIN_CLIENT_ROWS)
        rows = pick_clients(keep, cfg, seed, "table_clients", f"{str(src)!r} has {keep.size} distinct values of "
                            f"data.client_column = {cfg.client_column!r} with at least {MIN_CLIENT_ROWS} rows")
        self.client_names: np.ndarray = names[rows]  # client id -> its client column value (as text)
        self._client_values, self._client_column = values[rows], cfg.client_column
        self._start, self._count = start[rows], count[rows]
        self.seed, self.test_fraction = seed, cfg.test_fraction
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._x is None or self._y is None:
            self._x = np.load(self.cache / "x.npy", mmap_mode="r")
            self._y = np.load(self.cache / "y.npy", mmap_mode="r")
        return self._x, self._y

    def _check(self, client_id: int) -> int:
        if not 0 <= client_id < len(self._count):
            raise IndexError(f"client id {client_id} out of range 0 .. {len(self._count) - 1}")
        return int(client_id)

    def num_samples(self, client_id: int) -> int:
        return int(self._count[self._check(client_id)])

    def split_sizes(self, client_id: int) -> tuple[int, int]:
        n = self.num_samples(client_id)
        n_query = min(max(1, round(n * self.test_fraction)), n - 1)
        return n - n_query, n_query

    def shard(self, client_id: int) -> ClientShard:
        c = self._check(client_id)
        start, n = int(self._start[c]), int(self._count[c])
        x_all, y_all = self._arrays()
        perm = generator(self.seed, "table_split", 0, c).permutation(n)
        x, y = np.asarray(x_all[start:start + n])[perm], np.asarray(y_all[start:start + n])[perm]
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        yt = torch.from_numpy(y.astype(np.int64) if self.task == "classification" else
                              y.astype(np.float32).reshape(n, 1))
        k, _ = self.split_sizes(c)
        return ClientShard.from_rows(c, xt, yt, k)

    def client_keys(self) -> tuple[str, np.ndarray]:
        """(``data.client_column``, its value for each client id): ``RUN_DIR/client_ids.parquet``."""
        return self._client_column, self._client_values

    def label_histogram(self) -> np.ndarray | None:
        """Label counts of every client (clients x classes, int64) for classification; None for regression."""
        if self.task != "classification":
            return None
        _, y = self._arrays()
        hist = np.zeros((len(self._count), self.output_dim), dtype=np.int64)
        for c, (start, n) in enumerate(zip(self._start, self._count, strict=True)):
            hist[c] = np.bincount(y[start:start + n], minlength=self.output_dim)
        return hist
