"""The command line: a small run end to end, and bad input rejected cleanly (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pandas as pd
import pytest
from conftest import small_overrides

from simulator.cli import main
from simulator.config import from_dict

INLINE = ["system.backend=\"inline\""]


def _args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_run_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--no-progress", *_args(small_overrides() + INLINE)])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"config.toml", "rounds.parquet", "clients.parquet",
                                               "evals.parquet", "summary.json", "figures"}
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"loss_by_round.png", "loss_by_sim_time.png", "personalization_gain.png", "client_cdf.png"} <= figures
    assert "accuracy_by_round.png" not in figures  # sinusoid is regression
    cfg = from_dict(tomllib.loads((out / "config.toml").read_text()))  # the resolved config reloads
    assert cfg.rounds == 4 and cfg.system.backend == "inline"
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert list(rounds["round"]) == [0, 1, 2, 3]
    assert (rounds["sim_time"].diff().dropna() > 0).all()
    assert rounds["eval_loss_post"].notna().tolist() == [True, False, True, True]  # every 2 and the last
    clients = pd.read_parquet(out / "clients.parquet")
    assert len(clients) == 4 * 6 and clients.groupby("round")["client_id"].nunique().eq(6).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    printed = capsys.readouterr().out
    assert "held-out clients" in printed and str(out) in printed


def test_quickstart_meta_learning_works(tmp_path):
    """A shortened quickstart (Reptile, sinusoid): adaptation helps, and more so after training."""
    out = tmp_path / "q"
    overrides = INLINE + ["rounds=60", "clients.per_round=10", "eval.clients=30", "eval.every=59"]
    assert main(["run", "--out", str(out), "--no-progress", "--no-plots", *_args(overrides)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    first, final = summary["first_eval"], summary["final_eval"]
    assert final["round"] == 59 and first["round"] == 0
    assert final["eval_loss_post"] < 0.75 * final["eval_loss_pre"]
    assert final["eval_loss_post"] < 0.75 * first["eval_loss_post"]


BAD = [
    (["--set", "clients.per_round=5000"], "clients.per_round"),
    (["--set", "algoritm.name=\"maml\""], "did you mean 'algorithm.name'"),
    (["--set", "algorithm.name=\"sgd\""], "algorithm.name"),
    (["--set", "algorithm.local_lr=-0.1"], "algorithm.local_lr"),
    (["--set", "system.gpus_per_actor=1.5"], "system.gpus_per_actor"),
    (["--set", "model.hidden=[64, \"x\"]"], "model.hidden"),
    (["--set", "rounds=2.5"], "rounds"),
    (["--set", "data.alpha=0.5"], "data.alpha"),
    (["--set", "nonsense"], "--set"),
    (["--set", "model.factory=\"no_such_module_xyz:make\""], "model.factory"),
    (["--set", "model.factory=\"collections:OrderedDict\""], "model.factory"),
    (["--set", "model.factory=\"torch.nn:Identity\"", "--set", "data.name=\"synthetic\""], "model outputs"),
    (["--set", "model.factory=\"torch.nn:Identity\""], "no trainable parameters"),
    (["/nonexistent/config.toml"], "does not exist"),
    (["--address", "127.0.0.1:1"], "system.address"),
    (["--set", "devices.trace=\"/nonexistent/trace.csv\""], "devices.trace"),
    (["--set", "devices.availability_trace=\"/nonexistent/on_off.parquet\""], "devices.availability_trace"),
    (["--set", "system.mode=\"deadline\""], "system.deadline_s"),
    (["--set", "devices.speed.dist=\"weibull\""], "devices.speed.dist"),
    (["--set", "data.name=\"digits\"", "--set", "data.num_clients=5000"], "data.num_clients"),
]


@pytest.mark.parametrize(("argv", "needle"), BAD, ids=[b[1] for b in BAD])
def test_bad_input_exits_2_with_one_message(tmp_path, capsys, argv, needle):
    out = tmp_path / "never"
    code = main(["run", "--out", str(out), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert err.startswith("metafleet: error:") and err.count("\n") == 1
    assert "Traceback" not in err
    assert not out.exists()


def test_malformed_toml_and_existing_out_dir(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "summary.json").write_text("{}")
    assert main(["run", "--out", str(taken), *_args(INLINE)]) == 2
    assert "--out" in capsys.readouterr().err


def test_console_script_bad_flag_and_bad_key_no_traceback(tmp_path):
    for argv in (["run", "--bogus-flag"], ["run", "--set", "rounds=-1", "--out", str(tmp_path / "r")]):
        proc = subprocess.run([sys.executable, "-m", "simulator.cli", *argv], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()
