"""Client-partitioned tables (simulator.data.tables): CSV and Parquet, label kinds, seeded splits, bad columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from simulator.config.schema import ConfigError, DataConfig
from simulator.data import tables
from simulator.data.registry import make_dataset
from simulator.data.tables import TableDataset
from simulator.rng import generator


@pytest.fixture(autouse=True)
def _user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def frame(n: int = 120, clients: int = 10, label: str = "string", seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"user": [f"writer-{i % clients:02d}" for i in range(n)], "a": rng.random(n).round(4),
                       "b": rng.integers(0, 9, n), "c": rng.random(n) > 0.5})
    if label == "string":
        df["target"] = rng.choice(["cat", "dog", "emu"], n)
    elif label == "int":
        df["target"] = rng.integers(0, 4, n)
    else:
        df["target"] = rng.normal(size=n)
    return df


def _cfg(path: Path, clients: int = 7, held_out: int = 2, **extra: object) -> DataConfig:
    return DataConfig(name="table", path=str(path), num_clients=clients, eval_clients=held_out,
                      client_column="user", label_column="target", test_fraction=0.25, **extra)


def _expected_rows(df: pd.DataFrame, name: str, client: int, seed: int) -> pd.DataFrame:
    rows = df[df["user"] == name]
    return rows.iloc[generator(seed, "table_split", 0, client).permutation(len(rows))]


def test_csv_with_string_labels(tmp_path):
    df = frame()
    df.to_csv(tmp_path / "data.csv", index=False)
    ds = make_dataset(_cfg(tmp_path / "data.csv"), seed=3)
    assert isinstance(ds, TableDataset) and ds.task == "classification" and ds.input_dtype == torch.float32
    assert (ds.input_dim, ds.output_dim, ds.features, ds.classes) == (3, 3, ["a", "b", "c"], ["cat", "dog", "emu"])
    names = sorted(df["user"].unique())
    assert ds.client_names.tolist() == [names[i] for i in generator(3, "table_clients").permutation(10)[:9]]
    for c in (0, 4, 8):
        shard, rows = ds.shard(c), _expected_rows(df, str(ds.client_names[c]), c, 3)
        k, q = ds.split_sizes(c)
        assert (k, q) == (len(shard.support), len(shard.query)) and k + q == len(rows) and q == round(len(rows) / 4)
        x = torch.tensor(rows[["a", "b", "c"]].to_numpy(dtype=np.float32))
        y = torch.tensor(rows["target"].map({"cat": 0, "dog": 1, "emu": 2}).to_numpy())
        assert torch.equal(torch.cat([shard.support.x, shard.query.x]), x)
        assert torch.equal(torch.cat([shard.support.y, shard.query.y]), y) and shard.support.y.dtype == torch.int64
    hist = ds.label_histogram()
    assert hist.shape == (9, 3) and hist.sum(axis=1).tolist() == [ds.num_samples(c) for c in range(9)]


def test_parquet_file_and_directory_with_integer_labels(tmp_path):
    df = frame(label="int")
    df.to_parquet(tmp_path / "one.parquet")
    (tmp_path / "parts").mkdir()
    df.iloc[:50].to_parquet(tmp_path / "parts" / "p0.parquet")
    rest = df.iloc[50:]
    rest.set_axis(pd.Index(rest.index.to_numpy() * 2)).to_parquet(tmp_path / "parts" / "p1.parquet")
    assert "__index_level_0__" in pq.read_schema(tmp_path / "parts" / "p1.parquet").names
    one, parts = make_dataset(_cfg(tmp_path / "one.parquet"), 0), make_dataset(_cfg(tmp_path / "parts"), 0)
    assert one.output_dim == parts.output_dim == int(df["target"].max()) + 1 and one.classes == []
    assert one.features == parts.features == ["a", "b", "c"]
    for c in range(9):
        a, b = one.shard(c), parts.shard(c)
        assert torch.equal(a.support.x, b.support.x) and torch.equal(a.query.y, b.query.y)
    assert (tmp_path / "parts" / ".metafleet-cache").is_dir()


def test_float_labels_are_regression(tmp_path):
    df = frame(label="float")
    df.to_csv(tmp_path / "r.csv", index=False)
    ds = make_dataset(_cfg(tmp_path / "r.csv"), 0)
    assert (ds.task, ds.output_dim, ds.label_histogram()) == ("regression", 1, None)
    shard = ds.shard(2)
    assert shard.support.y.dtype == torch.float32 and shard.support.y.shape == (len(shard.support), 1)
    rows = _expected_rows(df, str(ds.client_names[2]), 2, 0)
    np.testing.assert_allclose(torch.cat([shard.support.y, shard.query.y])[:, 0].numpy(), rows["target"], rtol=1e-6)


def test_small_clients_skipped_and_too_many_clients_rejected(tmp_path):
    df = pd.concat([frame(), pd.DataFrame({"user": ["loner"], "a": [0.1], "b": [1], "c": [True], "target": ["cat"]})])
    df.to_csv(tmp_path / "d.csv", index=False)
    ds = make_dataset(_cfg(tmp_path / "d.csv", 8, 2), 0)
    assert ds.skipped_clients == 1 and "loner" not in ds.client_names.tolist()
    with pytest.raises(ConfigError, match=r"data\.num_clients.*data\.eval_clients.*10 distinct values"):
        make_dataset(_cfg(tmp_path / "d.csv", 9, 2), 0)


def test_workers_read_the_cache_not_the_table(tmp_path, monkeypatch):
    frame().to_csv(tmp_path / "d.csv", index=False)
    first = make_dataset(_cfg(tmp_path / "d.csv"), 0)

    def forbidden(*args, **kwargs):
        raise AssertionError("re-read the table")

    monkeypatch.setattr(tables, "_read", forbidden)
    worker = make_dataset(_cfg(tmp_path / "d.csv"), 0)
    assert worker.cache == first.cache and not hasattr(worker, "table")
    assert torch.equal(worker.shard(3).support.x, first.shard(3).support.x)
    worker._x = worker._y = None
    monkeypatch.setattr(worker, "_arrays", forbidden)
    assert sum(worker.split_sizes(3)) == worker.num_samples(3)  # from the index alone


def _write(tmp_path: Path, df: pd.DataFrame, name: str = "d.csv") -> Path:
    df.to_csv(tmp_path / name, index=False)
    return tmp_path / name


def _nan_parquet(tmp_path: Path) -> Path:
    """A Parquet table whose feature b holds a real NaN in row 1 (CSV readers turn "nan" into a missing value)."""
    table = pa.Table.from_pandas(frame(), preserve_index=False)
    b = pa.array([1.0, float("nan")] + [0.5] * (table.num_rows - 2), type=pa.float64())
    pq.write_table(table.set_column(table.schema.get_field_index("b"), "b", b), tmp_path / "d.parquet")
    return tmp_path / "d.parquet"


BAD = {
    "missing file": (lambda p: p / "nope.parquet", {}, "does not exist"),
    "wrong suffix": (lambda p: (p / "d.json").write_text("{}") and p / "d.json", {}, "neither a .parquet nor a .csv"),
    "unreadable parquet": (lambda p: (p / "d.parquet").write_bytes(b"PAR1garbage") and p / "d.parquet", {},
                           "cannot be read as Parquet"),
    "empty directory": (lambda p: (p / "empty").mkdir() or p / "empty", {}, "without .parquet files"),
    "missing client column": (lambda p: _write(p, frame()), {"client_column": "writer"},
                              r"data\.client_column = 'writer' is not a column.*user, a, b, c, target"),
    "missing label column": (lambda p: _write(p, frame()), {"label_column": "y"},
                             r"data\.label_column = 'y' is not a column.*user, a, b, c, target"),
    "non-numeric feature": (lambda p: _write(p, frame().assign(note="x", when="y")), {},
                            r"note \(string\), when \(string\) are not"),
    "no features": (lambda p: _write(p, frame()[["user", "target"]]), {}, "no other columns"),
    "missing labels": (lambda p: _write(p, frame().assign(target=None)), {}, "rows .* have no value"),
    "NaN feature": (lambda p: _nan_parquet(p), {},
                    r"feature column 'b' holds a non-finite value \(nan\) in row 1 \(client '.*'\) and 0 more"),
    "float32 overflow": (lambda p: _write(p, frame().assign(a=[1e39] * len(frame()))), {},
                         r"feature column 'a' holds a non-finite value \(inf\) in row 0"),
    "infinite target": (lambda p: _write(p, frame().assign(target=[float("inf")] + [0.5] * (len(frame()) - 1))), {},
                        r"data\.label_column = 'target' holds a non-finite value \(inf\) in row 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_config_error_naming_the_key(tmp_path, case):
    make, extra, message = BAD[case]
    cfg = _cfg(make(tmp_path))
    if extra:
        cfg = DataConfig(**{**cfg.__dict__, **extra})
    with pytest.raises(ConfigError, match=r"data\.(path|client_column|label_column)") as err:
        TableDataset(cfg, 0)
    assert err.match(message)


@pytest.mark.parametrize("kind", ["int", "string"])
def test_unset_num_clients_is_every_client_but_the_held_out_and_the_run_maps_ids_back(tmp_path, kind):
    from conftest import run_with_backend, small_overrides

    from simulator.experiment import load_config
    from simulator.rounds.context import prepare

    rng = np.random.default_rng(3)
    n = 200
    owner = rng.integers(0, 14, n)
    df = pd.DataFrame({"device": owner + 1000 if kind == "int" else [f"d{o:02d}" for o in owner],
                       "a": rng.random(n), "label": rng.integers(0, 3, n)})
    df = pd.concat([df, pd.DataFrame({"device": [5000 if kind == "int" else "lonely"], "a": [0.5], "label": [1]})])
    df.to_parquet(tmp_path / "t.parquet")  # 14 clients with >= 2 rows, and one with a single row (left out)
    overrides = [o for o in small_overrides() if not o.startswith("data.num_clients")]
    cfg = load_config(None, overrides + ['data.name="table"', f'data.path="{tmp_path / "t.parquet"}"',
                                         'data.client_column="device"', "data.eval_clients=4", "clients.per_round=5",
                                         'system.backend="inline"'])
    assert cfg.data.num_clients == 14 - 4  # every client with 2 rows but the 4 held out
    prepared = prepare(cfg)
    summary = run_with_backend(cfg, tmp_path / "run", prepared)
    assert summary["status"] == "completed"
    ids = pd.read_parquet(tmp_path / "run" / "client_ids.parquet")
    assert list(ids.columns) == ["client_id", "device"] and ids["client_id"].tolist() == list(range(14))
    assert pq.read_schema(tmp_path / "run" / "client_ids.parquet").field("device").type == (
        pa.int64() if kind == "int" else pa.string())  # the user's own type
    assert sorted(ids["device"].tolist()) == sorted(df["device"].value_counts().loc[lambda c: c >= 2].index.tolist())
    for c, value in zip(ids["client_id"], ids["device"], strict=True):  # the mapping names each client's own rows
        shard = prepared.dataset.shard(int(c))
        got = np.sort(torch.cat([shard.support.x, shard.query.x])[:, 0].numpy())
        np.testing.assert_array_equal(got, np.sort(df.loc[df["device"] == value, "a"].to_numpy(np.float32)))
