"""``metafleet data``: the printed client counts, sizes and label skew, the figure, and bad config (exit 2)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import tomllib  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from actors.cli import main  # noqa: E402
from analysis.datasets import DatasetSummary  # noqa: E402
from tests.simulator.test_leaf import femnist_users, write_leaf  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return str(path)


def test_data_prints_counts_and_writes_the_figure(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    rows = 400
    pd.DataFrame({"client_id": rng.integers(0, 25, rows), "x1": rng.random(rows), "x2": rng.random(rows),
                  "label": rng.integers(0, 4, rows)}).to_parquet(tmp_path / "t.parquet")
    cfg = _config(tmp_path, f'name = "mine"\n[data]\nname = "table"\npath = "{tmp_path / "t.parquet"}"\n'
                            "num_clients = 20\neval_clients = 5\n[clients]\nper_round = 5\n[eval]\nclients = 5\n")
    out = tmp_path / "figs" / "d.png"
    assert main(["data", cfg, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # 20 + 5 are all 25 clients of the table: said so (an unset data.num_clients would have meant the same)
    assert "clients: 20 training (all 25 clients of data.path but the 5 held out), 5 held-out" in printed
    assert "4 classes" in printed
    assert "support (train) per client:" in printed and "query (test) per client:" in printed
    assert "mean total-variation distance" in printed and "distinct labels per client" in printed
    assert out.read_bytes().startswith(PNG)
    monkeypatch.chdir(tmp_path)  # default figure name: data-<config name>.png in the current directory
    assert main(["data", cfg, "--set", "data.eval_clients=2", "--set", "eval.clients=2"]) == 0
    assert "20 training, 2 held-out" in capsys.readouterr().out and (tmp_path / "data-mine.png").is_file()


def test_data_on_a_regression_dataset_without_labels(tmp_path, capsys):
    out = tmp_path / "sin.png"
    assert main(["data", "--set", "data.num_clients=50", "--set", "data.eval_clients=10", "--set", "eval.clients=10",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clients: 50 training, 10 held-out" in printed and "label skew: n/a" in printed
    assert "per client (min / median / max): 20 / 20 / 20" in printed and out.read_bytes().startswith(PNG)


def test_label_skew_of_iid_and_one_class_clients():
    def summary(hist: list[list[int]]) -> DatasetSummary:
        h = np.array(hist)
        return DatasetSummary("x", "classification", 1, h.shape[1], len(h), 0, h.sum(1) - 1, np.ones(len(h), int), h)

    assert summary([[5, 5], [5, 5]]).label_skew() == (0.0, 2.0)
    assert summary([[4, 0], [0, 4]]).label_skew() == (0.5, 1.0)


def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "d.png"
    missing = _config(tmp_path, f'[data]\nname = "leaf"\npath = "{tmp_path / "nowhere"}"\n')
    assert main(["data", missing, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metafleet: error: data.path") and len(err.strip().splitlines()) == 1
    assert main(["data", "--set", "data.nme=3", "--out", str(out)]) == 2
    assert "unknown key 'data.nme'" in capsys.readouterr().err
    assert main(["data", str(tmp_path / "absent.toml"), "--out", str(out)]) == 2
    assert not out.exists()


def test_a_40_user_leaf_directory_without_num_clients_uses_every_user_but_the_held_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = write_leaf(tmp_path / "leaf", femnist_users(40))
    cfg = _config(tmp_path, '[data]\nname = "leaf"\npath = "leaf"\neval_clients = 10\n[eval]\nclients = 10\n')
    monkeypatch.chdir(tmp_path)  # data.path is relative to the working directory
    assert main(["data", cfg, "--out", str(tmp_path / "d.png")]) == 0
    printed = capsys.readouterr().out
    assert "clients: 30 training (all 40 users of data.path but the 10 held out), 10 held-out" in printed
    assert "samples:" in printed and root.is_dir()
    # a run says it too, and its config.toml records the number (a resumed run keeps it)
    run_dir = tmp_path / "run"
    assert main(["run", cfg, "--out", str(run_dir), "--no-progress", "--no-plots", "--set", "rounds=2",
                 "--set", 'system.backend="inline"', "--set", "clients.per_round=5"]) == 0
    err = capsys.readouterr().err
    assert "reptile on leaf, 30 clients (all 40 users of data.path but the 10 held out; 5 per round)" in err
    assert tomllib.loads((run_dir / "config.toml").read_text())["data"]["num_clients"] == 30
    # held-out clients that leave nobody to train: one line naming data.eval_clients, exit 2
    assert main(["data", cfg, "--set", "data.eval_clients=40"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds 40 clients and data.eval_clients = 40" in err and "lower data.eval_clients below 40" in err
    assert "\n" not in err
