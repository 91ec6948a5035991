"""LEAF federated datasets (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings"), read by shard.

``data.path`` is a LEAF data directory holding ``train/`` and ``test/``, each a set of JSON files
``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}`` as written
by LEAF's ``preprocess.sh -t sample`` (a per-user split: both directories hold the same users). A
user is one client: its train samples are the ``support`` split, its test samples the ``query`` split.

- FEMNIST: x = 784 floats (a 28x28 image, flattened), y in 0..61: 62 classes, float32 inputs. (784
  floats with digit labels only, 0..9, are read as a generic dataset of 10 classes: FEMNIST's letters
  would show up in any sample of it.)
- Shakespeare: x = 80 characters, y = the next character, both encoded with LEAF's 80-symbol
  vocabulary (``VOCAB``, index = position): int64 inputs of shape (n, 80), 80 classes.
- any other numeric LEAF dataset: x a fixed-length list of floats, y an integer class
  (classes = max label + 1 over all users).

The JSON is parsed once, streamed file by file, into a cache (see ``find_or_build``): per split a
memory-mapped ``{split}_x.npy`` / ``{split}_y.npy`` and an index of each user's rows. Afterwards neither the driver
nor a worker parses JSON: ``shard(c)`` reads only client ``c``'s rows of the memory map.
Client ids: the user names sorted, users without a train or a test sample dropped, then permuted
with ``generator(seed, "leaf_users")``; clients ``0 .. num_clients-1`` are the first users, the
held-out clients the next ``eval_clients``; an unset ``num_clients`` is every user but the held-out ones
(``available_clients``, resolved by ``simulator.experiment``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from simulator.config.schema import ConfigError, DataConfig
from simulator.data.base import ClientShard, Split
from simulator.data.filecache import (
    CACHE_VERSION,
    ColumnWriter,
    cache_candidates,
    find_or_build,
    fingerprint,
    pick_clients,
)

log = logging.getLogger("metafleet.data")

SPLITS = ("train", "test")  # LEAF's per-user split: train = the client's support set, test = its query set
FEMNIST_DIM, FEMNIST_CLASSES = 784, 62

#: LEAF's Shakespeare vocabulary (leaf/models/utils/language_utils.py, ALL_LETTERS): index = position
VOCAB = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
_LUT = np.full(256, 255, dtype=np.uint8)  # byte -> vocabulary index (255 = not in the vocabulary)
_LUT[np.frombuffer(VOCAB.encode("ascii"), dtype=np.uint8)] = np.arange(len(VOCAB), dtype=np.uint8)

def _bad(root: Path, what: str, fix: str) -> ConfigError:
    return ConfigError(f"data.path = {str(root)!r}: {what}; {fix}")


def _json_files(root: Path) -> dict[str, list[Path]]:
    """The JSON files of train/ and test/ (sorted), after checking the directory layout."""
    if not root.is_dir():
        raise _bad(root, "no such directory", "point data.path at a LEAF data directory holding train/ and test/ "
                                              "(e.g. leaf/data/femnist/data)")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise _bad(root, f"has no {split}/ directory", "run LEAF's preprocess.sh with -t sample (it writes "
                                                          "train/ and test/) and point data.path at their parent")
    files: dict[str, list[Path]] = {}
    for split in SPLITS:
        files[split] = sorted(p for p in (root / split).iterdir() if p.suffix == ".json" and p.is_file())
        if not files[split]:
            raise _bad(root, f"{split}/ holds no .json files", "run LEAF's preprocess.sh to completion")
    return files


def _encode_text(values: list[Any], f: Path, root: Path, what: str) -> np.ndarray:
    """Strings of one length -> uint8 vocabulary indices, shape (n, length)."""
    if not all(isinstance(s, str) for s in values):
        raise _bad(root, f"{f}: {what} mixes strings and other values", "fix the file")
    length = len(values[0])
    if any(len(s) != length for s in values):
        raise _bad(root, f"{f}: inconsistent {what} lengths ({length} and "
                         f"{next(len(s) for s in values if len(s) != length)})", "every sample must have one length")
    raw = "".join(values).encode("utf-8")
    codes = _LUT[np.frombuffer(raw, dtype=np.uint8)] if len(raw) == length * len(values) else None
    if codes is None or (codes == 255).any():
        bad = next(c for c in "".join(values) if c not in VOCAB)
        raise _bad(root, f"{f}: character {bad!r} is not in LEAF's 80-symbol Shakespeare vocabulary",
                   "preprocess the text with LEAF's shakespeare scripts")
    return codes.reshape(len(values), length)


def _encode(x: Any, y: Any, f: Path, root: Path, user: str) -> tuple[str, np.ndarray, np.ndarray]:
    """One user's samples -> (kind, x array, y array); kind is "text" or "numeric" ("" when empty)."""
    if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y):
        raise _bad(root, f"{f}: user {user!r} needs lists x and y of one length", "fix or regenerate the file")
    if not x:
        return "", np.empty((0, 0), np.float32), np.empty(0, np.int64)
    if isinstance(x[0], str):
        ys = _encode_text(y, f, root, "y")
        if ys.shape[1] != 1:
            raise _bad(root, f"{f}: user {user!r}: Shakespeare labels must be single characters", "fix the file")
        return "text", _encode_text(x, f, root, "x"), ys[:, 0].astype(np.int64)
    try:
        xa = np.asarray(x, dtype=np.float32)
        ya = np.asarray(y, dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise _bad(root, f"{f}: user {user!r} has inconsistent x lengths or non-numeric values ({exc})",
                   "every sample's x must be a list of numbers of one length") from None
    if xa.ndim < 2 or ya.ndim != 1 or not np.isfinite(ya).all() or (ya != np.round(ya)).any() or (ya < 0).any():
        raise _bad(root, f"{f}: user {user!r}: x must be lists of numbers and y non-negative integer labels",
                   "fix or regenerate the file")
    flat = xa.reshape(len(xa), -1)
    finite = np.isfinite(flat)
    if not finite.all():
        i = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise _bad(root, f"{f}: user {user!r}, sample {i}: x holds a non-finite value ({flat[i][~finite[i]][0]})",
                   "fix or remove those samples (metafleet never trains on NaN or infinite features)")
    return "numeric", flat, ya.astype(np.int64)


def _read(f: Path, root: Path) -> dict[str, Any]:
    try:
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(root, f"{f} is not valid JSON ({exc})", "re-run LEAF's preprocess.sh or remove the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("user_data"), dict):
        raise _bad(root, f"{f} is not a LEAF file (no \"user_data\" object)", "point data.path at LEAF's data/ "
                                                                              "directory")
    return data


def _build(root: Path, files: dict[str, list[Path]], out: Path) -> None:
    """Stream every JSON file once into ``out``: {split}_x.npy, {split}_y.npy and index.npz."""
    kind, dim, max_label = "", -1, -1
    rows: dict[str, dict[str, tuple[int, int]]] = {}
    for split in SPLITS:
        xw = yw = None
        rows[split] = {}
        for f in files[split]:
            data = _read(f, root)
            for user, sample in data["user_data"].items():
                if not isinstance(sample, dict):
                    raise _bad(root, f"{f}: user {user!r} is not an object with x and y", "fix the file")
                k, xa, ya = _encode(sample.get("x"), sample.get("y"), f, root, str(user))
                if user in rows[split]:
                    raise _bad(root, f"{f}: user {user!r} appears twice in {split}/", "remove the duplicate")
                if k:
                    if (kind and k != kind) or (dim >= 0 and xa.shape[1] != dim):
                        raise _bad(root, f"{f}: user {user!r} has x of another kind or length than earlier users "
                                         f"({xa.shape[1]} vs {dim})", "every sample's x must have one length")
                    kind, dim, max_label = k, xa.shape[1], max(max_label, int(ya.max()))
                    if xw is None:
                        xw = ColumnWriter(out / f"{split}_x.npy", np.uint8 if k == "text" else np.float32, dim)
                        yw = ColumnWriter(out / f"{split}_y.npy", np.int64)
                    rows[split][user] = (xw.rows, len(ya))
                    xw.append(xa)
                    yw.append(ya)
                else:
                    rows[split][user] = (0, 0)
            del data
        if xw is None:
            raise _bad(root, f"{split}/ holds no samples", "run LEAF's preprocess.sh to completion")
        xw.finish()
        yw.finish()
    for a, b in (("train", "test"), ("test", "train")):
        missing = sorted(rows[a].keys() - rows[b].keys())
        if missing:
            raise _bad(root, f"user {missing[0]!r} (and {len(missing) - 1} more) is in {a}/ but not in {b}/",
                       "LEAF must split each user's samples (preprocess.sh -t sample, not -t user)")
    users = sorted(rows["train"])
    arrays = {f"{s}_{w}": np.array([rows[s][u][i] for u in users], np.int64)
              for s in SPLITS for i, w in enumerate(("start", "count"))}
    np.savez(out / "index.npz", users=np.array(users, dtype=str), kind=np.array(kind), input_dim=np.array(dim),
             max_label=np.array(max_label), version=np.array(CACHE_VERSION), **arrays)


def _classes(kind: str, dim: int, max_label: int) -> tuple[str, int]:
    """(dataset kind, number of classes) of a cached LEAF dataset."""
    if kind == "text":
        return "shakespeare", len(VOCAB)
    if dim == FEMNIST_DIM and 10 <= max_label < FEMNIST_CLASSES:
        return "femnist", FEMNIST_CLASSES
    return "numeric", max_label + 1


def _open(cfg: DataConfig) -> tuple[Path, Path]:
    """(the LEAF directory, its parsed cache), building the cache on first use."""
    root = Path(cfg.path).expanduser().resolve()
    files = _json_files(root)
    listed = [p for split in SPLITS for p in files[split]]
    cache = find_or_build(cache_candidates(root, "leaf-" + fingerprint(listed, root)),
                          lambda out: _build(root, files, out), f"data.path = {str(root)!r}")
    return root, cache


def available_clients(cfg: DataConfig) -> int:
    """How many clients the directory holds: its users with a train and a test sample (an unset
    ``data.num_clients`` is this less ``data.eval_clients``)."""
    _, cache = _open(cfg)
    with np.load(cache / "index.npz") as index:
        return int(((index["train_count"] >= 1) & (index["test_count"] >= 1)).sum())


class LeafDataset:
    """A LEAF dataset directory (Caldas et al. 2018), one user per client; see the module docstring."""

    task = "classification"

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        root, self.cache = _open(cfg)
        with np.load(self.cache / "index.npz") as index:
            self.input_dim = int(index["input_dim"])
            self.kind, self.output_dim = _classes(str(index["kind"]), self.input_dim, int(index["max_label"]))
            users = index["users"]
            counts = {s: (index[f"{s}_start"], index[f"{s}_count"]) for s in SPLITS}
        self.input_dtype = torch.int64 if self.kind == "shakespeare" else torch.float32
        keep = np.flatnonzero((counts["train"][1] >= 1) & (counts["test"][1] >= 1))
        self.available, self.skipped_users = keep.size, len(users) - keep.size
        if self.skipped_users:
            log.info("LEAF %s: skipped %d of %d users with no train or no test sample", root, self.skipped_users,
                     len(users))
        without = f" ({self.skipped_users} more without)" if self.skipped_users else ""
        rows = pick_clients(keep, cfg, seed, "leaf_users",
                            f"data.path = {str(root)!r} has {keep.size} users with train and test samples{without}")
        self.users: np.ndarray = users[rows]  # client id -> LEAF user name
        self._rows = {s: (start[rows], count[rows]) for s, (start, count) in counts.items()}
        self._arrays: dict[str, np.ndarray] = {}

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.cache / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    def _check(self, client_id: int) -> int:
        if not 0 <= client_id < len(self.users):
            raise IndexError(f"client id {client_id} out of range 0 .. {len(self.users) - 1}")
        return int(client_id)

    def _split(self, split: str, c: int) -> Split:
        start, count = int(self._rows[split][0][c]), int(self._rows[split][1][c])
        x = np.array(self._array(f"{split}_x")[start:start + count])
        y = np.array(self._array(f"{split}_y")[start:start + count])
        xt = torch.from_numpy(x.astype(np.int64 if self.kind == "shakespeare" else np.float32, copy=False))
        return Split(xt, torch.from_numpy(y.astype(np.int64, copy=False)))

    def shard(self, client_id: int) -> ClientShard:
        c = self._check(client_id)
        return ClientShard(c, self._split("train", c), self._split("test", c))

    def split_sizes(self, client_id: int) -> tuple[int, int]:
        c = self._check(client_id)
        return int(self._rows["train"][1][c]), int(self._rows["test"][1][c])

    def num_samples(self, client_id: int) -> int:
        return sum(self.split_sizes(client_id))

    def client_keys(self) -> tuple[str, np.ndarray]:
        """("user", the LEAF user name of each client id): ``RUN_DIR/client_ids.parquet``."""
        return "user", self.users

    def label_histogram(self) -> np.ndarray:
        """Label counts (train and test samples) of every client, int64 (clients x classes); reads labels only."""
        hist = np.zeros((len(self.users), self.output_dim), dtype=np.int64)
        for split in SPLITS:
            y = self._array(f"{split}_y")
            for c, (start, count) in enumerate(zip(*self._rows[split], strict=True)):
                hist[c] += np.bincount(y[start:start + count], minlength=self.output_dim)
        return hist
