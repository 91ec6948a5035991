"""LEAF datasets (simulator.data.leaf): exact per-user shards, seeded client ids, a cache read by shard, bad input."""

from __future__ import annotations

import builtins
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_with_backend, small_overrides

from simulator.config.schema import ConfigError, DataConfig
from simulator.data import leaf
from simulator.data.base import eval_client_ids
from simulator.data.filecache import find_or_build, write_manifest
from simulator.data.leaf import VOCAB, LeafDataset
from simulator.data.registry import make_dataset
from simulator.experiment import load_config
from simulator.rng import generator

Users = dict[str, tuple[list, list, list, list]]  # user -> (train x, train y, test x, test y)


def write_leaf(root: Path, users: Users, files: int = 2) -> Path:
    """A LEAF directory: train/ and test/, the users spread over ``files`` JSON files."""
    names = list(users)
    for s, split in enumerate(("train", "test")):
        (root / split).mkdir(parents=True, exist_ok=True)
        for f in range(files):
            mine = names[f::files]
            data = {"users": mine, "num_samples": [len(users[u][2 * s + 1]) for u in mine],
                    "user_data": {u: {"x": users[u][2 * s], "y": users[u][2 * s + 1]} for u in mine}}
            (root / split / f"part_{f}.json").write_text(json.dumps(data))
    return root


def femnist_users(n: int = 10, seed: int = 0) -> Users:
    rng = np.random.default_rng(seed)
    out: Users = {}
    for u in range(n):
        k, q = int(rng.integers(2, 5)), int(rng.integers(1, 3))
        x = rng.random((k + q, 784)).astype(np.float32).round(3).tolist()
        y = rng.integers(0, 62, k + q).tolist()
        out[f"f{u:04d}_{u % 3}"] = (x[:k], y[:k], x[k:], y[k:])
    out["f0000_0"] = (out["f0000_0"][0], [61] * len(out["f0000_0"][1]), *out["f0000_0"][2:])  # a letter class
    return out


def shakespeare_users(n: int = 6) -> Users:
    rng = np.random.default_rng(1)
    out: Users = {}
    for u in range(n):
        text = "".join(rng.choice(list(VOCAB), 84 + u))
        xs = [text[i:i + 80] for i in range(len(text) - 80)]
        ys = [text[i + 80] for i in range(len(text) - 80)]
        out[f"THE_TEMPEST_{chr(65 + u)}"] = (xs[:-1], ys[:-1], xs[-1:], ys[-1:])
    return out


def _cfg(root: Path, clients: int, held_out: int) -> DataConfig:
    return DataConfig(name="leaf", path=str(root), num_clients=clients, eval_clients=held_out)


@pytest.fixture(autouse=True)
def _user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def test_femnist_shards_are_the_users_samples_in_a_seeded_order(tmp_path):
    users = femnist_users()
    cfg = _cfg(write_leaf(tmp_path / "femnist", users), 6, 3)
    ds = make_dataset(cfg, seed=4)
    assert isinstance(ds, LeafDataset) and ds.kind == "femnist"
    assert (ds.task, ds.input_dim, ds.output_dim, ds.input_dtype) == ("classification", 784, 62, torch.float32)
    expected_order = np.array(sorted(users))[generator(4, "leaf_users").permutation(len(users))][:9]
    assert ds.users.tolist() == expected_order.tolist()
    for c in range(9):
        sx, sy, qx, qy = users[str(ds.users[c])]
        shard = ds.shard(c)
        assert shard.client_id == c and shard.support.x.dtype == torch.float32 and shard.support.y.dtype == torch.int64
        assert torch.equal(shard.support.x, torch.tensor(sx, dtype=torch.float32))
        assert torch.equal(shard.support.y, torch.tensor(sy)) and torch.equal(shard.query.y, torch.tensor(qy))
        assert torch.equal(shard.query.x, torch.tensor(qx, dtype=torch.float32))
        assert ds.split_sizes(c) == (len(sy), len(qy)) and ds.num_samples(c) == len(sy) + len(qy)
    held_out = {str(ds.users[c]) for c in eval_client_ids(cfg)}
    assert len(held_out) == 3 and not held_out & {str(u) for u in ds.users[:6]}
    assert make_dataset(cfg, seed=5).users.tolist() != ds.users.tolist()
    hist = ds.label_histogram()
    assert hist.shape == (9, 62) and hist[c].sum() == ds.num_samples(c)
    with pytest.raises(IndexError):
        ds.shard(9)


def test_shakespeare_is_encoded_with_leafs_vocabulary(tmp_path):
    users = shakespeare_users()
    ds = make_dataset(_cfg(write_leaf(tmp_path / "shakespeare", users, files=1), 4, 2), seed=0)
    assert (ds.kind, ds.input_dim, ds.output_dim, ds.input_dtype) == ("shakespeare", 80, 80, torch.int64)
    shard = ds.shard(1)
    sx, sy, qx, qy = users[str(ds.users[1])]
    assert shard.support.x.dtype == torch.int64 and shard.support.x.shape == (len(sx), 80)
    assert shard.support.x[0].tolist() == [VOCAB.index(ch) for ch in sx[0]]
    assert shard.support.y.tolist() == [VOCAB.index(ch) for ch in sy]
    assert shard.query.x[0].tolist() == [VOCAB.index(ch) for ch in qx[0]]
    assert VOCAB.index("\n") == 0 and VOCAB.index("}") == 79


def test_generic_numeric_dataset_and_skipped_users(tmp_path, caplog):
    users: Users = {f"u{i}": ([[float(i), 1.0, 2.0]] * 3, [i % 4] * 3, [[0.5, 0.5, 0.5]], [1]) for i in range(5)}
    users["empty_test"] = ([[1.0, 1.0, 1.0]], [0], [], [])
    with caplog.at_level(logging.INFO, logger="metafleet.data"):
        ds = make_dataset(_cfg(write_leaf(tmp_path / "generic", users), 4, 1), seed=0)
    assert (ds.kind, ds.input_dim, ds.output_dim) == ("numeric", 3, 4)
    assert ds.skipped_users == 1 and "empty_test" not in ds.users.tolist()
    assert "skipped 1 of 6 users" in caplog.text
    with pytest.raises(ConfigError, match=r"data\.num_clients.*data\.eval_clients.*5 users.*1 more without"):
        make_dataset(_cfg(tmp_path / "generic", 5, 1), seed=0)


def test_split_sizes_come_from_the_index_without_building_shards(tmp_path, monkeypatch):
    ds = make_dataset(_cfg(write_leaf(tmp_path / "f", femnist_users()), 6, 2), seed=0)

    def no_arrays(name):
        raise AssertionError(f"read {name}")

    monkeypatch.setattr(ds, "_array", no_arrays)
    assert all(s >= 2 and q >= 1 for s, q in (ds.split_sizes(c) for c in range(8)))


def test_cache_is_built_once_and_workers_read_only_the_npy_rows(tmp_path, monkeypatch):
    root = write_leaf(tmp_path / "f", femnist_users())
    cfg = _cfg(root, 6, 2)
    first = LeafDataset(cfg, 0)  # the driver: builds the cache
    assert first.cache.parent == root / ".metafleet-cache" and (first.cache / "index.npz").is_file()
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("parsed JSON or rebuilt the cache")

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(json, "load", forbidden)
    monkeypatch.setattr(json, "loads", forbidden)
    monkeypatch.setattr(leaf, "_build", forbidden)
    worker = LeafDataset(cfg, 0)  # a worker: finds the cache
    shards = [worker.shard(c) for c in (5, 0, 5)]
    assert torch.equal(shards[0].support.x, first.shard(5).support.x)
    assert opened and not [p for p in opened if p.endswith(".json")]
    assert {Path(p).name for p in opened} <= {"index.npz", "train_x.npy", "train_y.npy", "test_x.npy", "test_y.npy",
                                              "manifest.txt"}
    monkeypatch.undo()
    (root / "train" / "part_0.json").write_text((root / "train" / "part_0.json").read_text() + "\n")
    assert LeafDataset(cfg, 0).cache != first.cache  # a changed file is a new cache


def test_read_only_data_directory_caches_in_the_user_cache(tmp_path):
    root = write_leaf(tmp_path / "f", femnist_users())
    (root / ".metafleet-cache").write_text("not a directory")  # cannot create the cache beside the data
    ds = LeafDataset(_cfg(root, 6, 2), 0)
    assert ds.cache.parent == tmp_path / "user-cache" / "metafleet" and ds.cache.name.startswith("leaf-")


def test_concurrent_builder_wins_and_failed_builds_leave_nothing(tmp_path):
    final = tmp_path / "cache" / "leaf-x"

    def racing_build(out: Path) -> None:  # another process renames its finished cache first
        final.mkdir(parents=True)
        (final / "index.npz").write_bytes(b"theirs")
        write_manifest(final)
        (out / "index.npz").write_bytes(b"ours")

    assert find_or_build([final], racing_build, "data.path") == final
    assert (final / "index.npz").read_bytes() == b"theirs" and [p.name for p in final.parent.iterdir()] == ["leaf-x"]

    def failing_build(out: Path) -> None:
        (out / "train_x.npy").write_bytes(b"half")
        raise ConfigError("data.path: bad")

    with pytest.raises(ConfigError):
        find_or_build([tmp_path / "c2" / "leaf-y"], failing_build, "data.path")
    assert list((tmp_path / "c2").iterdir()) == []
    killed, recent = tmp_path / "c2" / ".tmp-leaf-y-old", tmp_path / "c2" / ".tmp-leaf-y-new"
    killed.mkdir()
    recent.mkdir()  # possibly another process building right now
    os.utime(killed, (time.time() - 2 * 86400, time.time() - 2 * 86400))
    find_or_build([tmp_path / "c2" / "leaf-y"], lambda out: (out / "index.npz").write_bytes(b"x"), "data.path")
    assert sorted(p.name for p in (tmp_path / "c2").iterdir()) == [".tmp-leaf-y-new", "leaf-y"]


def _json(root: Path, split: str, name: str, data: object) -> None:
    (root / split / name).write_text(data if isinstance(data, str) else json.dumps(data))


def _ragged(root: Path) -> None:
    _json(root, "train", "part_0.json", {"users": ["a"], "user_data": {"a": {"x": [[1.0] * 784, [1.0] * 5],
                                                                            "y": [1, 2]}}})


def _user_missing(root: Path) -> None:
    _json(root, "train", "part_9.json", {"users": ["zz"], "user_data": {"zz": {"x": [[1.0] * 784], "y": [3]}}})


BAD = {
    "missing directory": (lambda root: None, "no such directory"),
    "no test/": (lambda root: (root / "train").mkdir(parents=True), "has no test/"),
    "no JSON files": (lambda root: [(root / s).mkdir(parents=True) for s in ("train", "test")], "no .json files"),
    "malformed JSON": (lambda root: _json(root, "train", "part_0.json", "{\"users\": ["), "part_0.json is not valid"),
    "not LEAF": (lambda root: _json(root, "test", "part_1.json", {"users": []}), "not a LEAF file"),
    "user missing from test": (_user_missing, "'zz'.*in train/ but not in test/"),
    "inconsistent x lengths": (_ragged, "inconsistent x lengths"),
    "unknown character": (lambda root: _json(root, "train", "part_0.json", {"users": ["a"], "user_data": {
        "a": {"x": ["é" * 80], "y": ["a"]}}}), "not in LEAF's 80-symbol"),
    "NaN in x": (lambda root: _json(root, "train", "part_0.json", {"users": ["a"], "user_data": {
        "a": {"x": [[0.5] * 784, [0.5] * 783 + [float("nan")]], "y": [1, 2]}}}),
        r"user 'a', sample 1: x holds a non-finite value \(nan\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_config_error_naming_data_path(tmp_path, case):
    make, message = BAD[case]
    root = tmp_path / "bad"
    if case not in ("missing directory", "no test/", "no JSON files"):
        write_leaf(root, femnist_users(4))
    make(root)
    with pytest.raises(ConfigError, match="data.path") as err:
        LeafDataset(_cfg(root, 2, 1), 0)
    assert err.match(message)
    if (root / ".metafleet-cache").is_dir():  # a failed build leaves no (half) cache behind
        assert list((root / ".metafleet-cache").iterdir()) == []


@pytest.mark.parametrize("dataset", ["leaf", "table"])
def test_a_tiny_run_end_to_end_on_files(tmp_path, dataset):
    from simulator.rounds.context import prepare

    if dataset == "leaf":
        path = write_leaf(tmp_path / "leaf", femnist_users(12))
    else:
        rng = np.random.default_rng(0)
        path = tmp_path / "table.csv"
        rows = ["client_id,f1,f2,f3,label"] + [f"c{i % 12},{rng.random():.3f},{rng.random():.3f},{i % 5},"
                                                f"{'abc'[i % 3]}" for i in range(150)]
        path.write_text("\n".join(rows) + "\n")
    cfg = load_config(None, small_overrides(**{
        "data.name": dataset, "data.path": str(path), "data.num_clients": 8, "data.eval_clients": 2,
        "clients.per_round": 4, "eval.clients": 2, "system.backend": "inline", "algorithm.local_lr": 0.05}))
    prepared = prepare(cfg)
    summary = run_with_backend(cfg, tmp_path / "run", prepared)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    assert np.isfinite(summary["final_eval"]["eval_loss_post"])
    assert (tmp_path / "run" / "label_histogram.parquet").exists()
    ids = pd.read_parquet(tmp_path / "run" / "client_ids.parquet")  # metafleet's client id -> the user's key
    # a table whose client_column is itself named client_id keeps the user's values beside metafleet's ids
    key, expected = ("user", prepared.dataset.users) if dataset == "leaf" else \
        ("client_id_in_data", prepared.dataset.client_names)
    assert list(ids.columns) == ["client_id", key] and ids["client_id"].tolist() == list(range(10))
    assert ids[key].tolist() == expected.tolist() and len(set(expected.tolist())) == 10


@pytest.mark.parametrize("damage", ["index replaced", "array truncated", "manifest lost"])
def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, caplog, damage):
    root = write_leaf(tmp_path / "f", femnist_users())
    cfg = _cfg(root, 6, 2)
    first = LeafDataset(cfg, 0)
    expected = [first.shard(c) for c in range(8)]
    if damage == "index replaced":  # e.g. by arrays of Python objects, which np.load refuses to unpickle
        np.savez(first.cache / "index.npz", users=np.array([object()], dtype=object))
    elif damage == "array truncated":
        (first.cache / "train_x.npy").write_bytes((first.cache / "train_x.npy").read_bytes()[:-7])
    else:
        (first.cache / "manifest.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="metafleet.data"):
        again = LeafDataset(cfg, 0)
    assert "is damaged" in caplog.text and "rebuilding it" in caplog.text and again.cache == first.cache
    for c, shard in enumerate(expected):
        assert torch.equal(again.shard(c).support.x, shard.support.x)
        assert torch.equal(again.shard(c).query.y, shard.query.y)
