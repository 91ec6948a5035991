"""Experiment tracking against the real libraries: a tiny inline run logs to TensorBoard and an MLflow file store in
a temporary directory, and both are read back (TensorBoard's EventAccumulator, MLflow's MlflowClient) and compared
with rounds.parquet and summary.json.

TensorBoard stores a scalar as a 32-bit float (``simple_value``), so its values equal the Parquet float64 values
rounded to float32, exactly; MLflow's file store writes a metric's ``repr``, which round-trips float64 exactly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import small_overrides
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from actors.backends import make_backend
from actors.tracking import MLFLOW_RUN_ID, ROUND_SCALARS, UPDATES_PER_S, open_trackers, wait_for_a_later_second
from analysis.commands import figures_of_run
from simulator.config.schema import ConfigError
from simulator.config.toml import flatten
from simulator.experiment import load_config
from simulator.rounds.run import run

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 5


def _overrides(store: Path, **extra: object) -> list[str]:
    return small_overrides(**{"system.backend": "inline", "rounds": ROUNDS, "devices.dropout": 0.2,
                              "tracking.tensorboard": "run", "tracking.mlflow_uri": f"file:{store}", **extra})


def _tracked_run(overrides: list[str], run_dir: Path, resume: bool = False, draw: bool = True, on_round=None):
    cfg = load_config(None, overrides)
    with open_trackers(cfg, run_dir) as trackers, make_backend(cfg) as backend:
        def callback(row):
            trackers.on_round(row)
            if on_round is not None:
                on_round(row)

        summary = run(cfg, backend, run_dir, on_round=callback, resume=resume)
        figures = figures_of_run(run_dir) if draw else []
        trackers.finish(summary, figures)
    return cfg, summary, figures


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    base = tmp_path_factory.mktemp("tracked")
    run_dir, store = base / "run", base / "mlruns"
    cfg, summary, figures = _tracked_run(_overrides(store), run_dir)
    rounds = pd.read_parquet(run_dir / "rounds.parquet").sort_values("round").reset_index(drop=True)
    return {"cfg": cfg, "summary": summary, "figures": figures, "run_dir": run_dir, "store": store, "rounds": rounds}


def _board(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _columns(rounds: pd.DataFrame) -> list[str]:
    return [*ROUND_SCALARS, *sorted(c for c in rounds.columns if c.startswith("dropped_"))]


def _expected(rounds: pd.DataFrame, column: str) -> list[tuple[int, float]]:
    return [(int(r), float(v)) for r, v in zip(rounds["round"], rounds[column], strict=True) if np.isfinite(v)]


def _updates_per_s(rounds: pd.DataFrame) -> list[tuple[int, float]]:
    wall, done = rounds["wall_time_s"].tolist(), rounds["num_completed"].tolist()
    previous = [0.0, *wall[:-1]]
    return [(r, done[r] / (wall[r] - previous[r])) for r in range(len(wall))]


def _client(store: Path) -> MlflowClient:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opens a file store only then (as open_trackers)
    return MlflowClient(tracking_uri=store.resolve().as_uri())


def _env() -> dict[str, str]:
    """This process's environment for a subprocess, without MLflow's file-store opt-in (open_trackers sets it)."""
    return {**{k: v for k, v in os.environ.items() if k != "MLFLOW_ALLOW_FILE_STORE"}, "PYTHONPATH": str(ROOT)}


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_tensorboard_scalars_per_round_equal_rounds_parquet(tracked):
    acc, rounds = _board(tracked["run_dir"] / "tensorboard"), tracked["rounds"]
    tags = acc.Tags()["scalars"]
    assert rounds["num_dropped"].sum() > 0 and rounds["eval_loss_post"].isna().sum() == 2  # both paths exercised
    for column in _columns(rounds):
        expected = [(r, np.float32(v)) for r, v in _expected(rounds, column)]
        if not expected:  # sinusoid is a regression task: no accuracy, so no eval_metric_* scalars
            assert column not in tags, column
            continue
        assert [(e.step, np.float32(e.value)) for e in acc.Scalars(column)] == expected, column
    assert "eval_metric_post" not in tags
    assert [(e.step, np.float32(e.value)) for e in acc.Scalars(UPDATES_PER_S)] == [
        (r, np.float32(x)) for r, x in _updates_per_s(rounds)]


def test_tensorboard_holds_the_config_the_summary_and_the_figures(tracked):
    acc, cfg, summary = _board(tracked["run_dir"] / "tensorboard"), tracked["cfg"], tracked["summary"]
    final = acc.Scalars("summary/final_eval.eval_loss_post")
    post = np.float32(summary["final_eval"]["eval_loss_post"])
    assert [(e.step, np.float32(e.value)) for e in final] == [(ROUNDS, post)]
    assert acc.Scalars("summary/client_updates")[0].value == summary["client_updates"]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert set(start.hparams) == set(flatten(cfg))
    assert start.hparams["algorithm.local_lr"].number_value == cfg.algorithm.local_lr
    assert start.hparams["model.hidden"].string_value == "[40, 40]"
    assert start.hparams["system.vectorize"].string_value == "true"
    assert start.hparams["tracking.tensorboard"].string_value == "run"
    assert len(tracked["figures"]) >= 5
    for path in tracked["figures"]:
        image = acc.Images(f"figures/{path.stem}")[0]
        assert image.step == ROUNDS and image.encoded_image_string == path.read_bytes()


def test_mlflow_params_metrics_and_artifacts_read_back(tracked):
    run_dir, rounds, cfg, summary = tracked["run_dir"], tracked["rounds"], tracked["cfg"], tracked["summary"]
    client = _client(tracked["store"])
    run_id = (run_dir / MLFLOW_RUN_ID).read_text().strip()
    got = client.get_run(run_id)
    assert got.info.run_name == run_dir.name and got.info.status == "FINISHED"
    assert got.data.tags["metafleet.status"] == "completed"
    assert client.get_experiment(got.info.experiment_id).name == "metafleet"
    params = got.data.params
    assert set(params) == set(flatten(cfg))
    assert params["rounds"] == str(ROUNDS) and params["algorithm.local_lr"] == "0.02"
    assert params["model.hidden"] == "[40, 40]" and params["system.vectorize"] == "true"
    assert params["data.name"] == "sinusoid" and params["tracking.mlflow_uri"] == tracked["store"].resolve().as_uri()
    for column in _columns(rounds):
        assert _history(client, run_id, column) == _expected(rounds, column), column
    assert _history(client, run_id, UPDATES_PER_S) == _updates_per_s(rounds)
    assert _history(client, run_id, "summary/best_eval_loss_post") == [(ROUNDS, summary["best_eval_loss_post"])]
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.toml", "summary.json", "figures"} <= top
    assert sorted(Path(a.path).name for a in client.list_artifacts(run_id, "figures")) == sorted(
        p.name for p in tracked["figures"])
    stored = Path(client.download_artifacts(run_id, "summary.json", str(run_dir.parent / "download")))
    assert json.loads(stored.read_text()) == json.loads((run_dir / "summary.json").read_text())


def test_resume_after_a_kill_continues_the_same_runs_without_duplicate_steps(tmp_path):
    """Killed right after round 4 was logged, its last checkpoint at round 4 (checkpoint_every = 2): the resumed
    run recomputes round 4 and logs rounds 4-6; each round is in both trackers once."""
    run_dir, store = tmp_path / "run", tmp_path / "mlruns"
    first = _overrides(store, rounds=6, checkpoint_every=2)
    proc = subprocess.run([sys.executable, str(ROOT / "tests/actors/tracked_kill.py"), str(run_dir), "4", *first],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == -9, proc.stderr[-2000:]
    client = _client(store)
    run_id = (run_dir / MLFLOW_RUN_ID).read_text().strip()
    assert client.get_run(run_id).info.status == "RUNNING"
    assert [s for s, _ in _history(client, run_id, "num_completed")] == [0, 1, 2, 3, 4]
    _, summary, _ = _tracked_run(_overrides(store, rounds=7, checkpoint_every=2), run_dir, resume=True, draw=False)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 7
    rounds = pd.read_parquet(run_dir / "rounds.parquet").sort_values("round").reset_index(drop=True)
    assert (run_dir / MLFLOW_RUN_ID).read_text().strip() == run_id
    runs = client.search_runs([client.get_experiment_by_name("metafleet").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["rounds"] == "6" and got.data.tags["resumed_with.rounds"] == "7"
    acc = _board(run_dir / "tensorboard")
    for column in ("num_completed", "train_loss", "num_dropped", "eval_loss_post"):
        assert _history(client, run_id, column) == _expected(rounds, column), column
        assert [(e.step, np.float32(e.value)) for e in acc.Scalars(column)] == [
            (r, np.float32(v)) for r, v in _expected(rounds, column)], column


def test_a_failing_tracker_stops_alone_and_the_run_completes(tmp_path, caplog):
    """The MLflow store deleted mid-run: MLflow stops with one warning, TensorBoard and the run go on."""
    run_dir, store = tmp_path / "run", tmp_path / "mlruns"

    def delete_store(row):
        if row["round"] == 1:
            shutil.rmtree(store)

    with caplog.at_level(logging.WARNING, logger="metafleet.tracking"):
        _, summary, _ = _tracked_run(_overrides(store), run_dir, draw=False, on_round=delete_store)
    assert summary["status"] == "completed"
    warnings = [r.getMessage() for r in caplog.records if r.name == "metafleet.tracking"]
    assert len(warnings) == 1 and warnings[0].startswith("tracking: mlflow stopped logging at round 2"), warnings
    assert [e.step for e in _board(run_dir / "tensorboard").Scalars("num_completed")] == list(range(ROUNDS))


BLOCKED = """
import sys
import time
from pathlib import Path
sys.modules[sys.argv[1]] = None  # as if the extra were not installed
from actors.tracking import open_trackers
from simulator.config.schema import ConfigError
from simulator.experiment import load_config
try:
    open_trackers(load_config(None, [sys.argv[2]]), Path(sys.argv[3]))
except ConfigError as exc:
    print(exc)
"""


@pytest.mark.parametrize(("module", "key", "value"), [("tensorboard", "tracking.tensorboard", '"run"'),
                                                      ("mlflow", "tracking.mlflow_uri", '"file:./mlruns"')])
def test_a_missing_extra_is_one_config_error_naming_it(tmp_path, module, key, value):
    proc = subprocess.run([sys.executable, "-c", BLOCKED, module, f"{key}={value}", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith(f"{key} is set but {module} cannot be imported"), line
    assert line.endswith(f"install it with pip install 'metafleet[{module}]', or set {key} = \"\""), line
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlruns").exists()


def test_nothing_is_imported_or_written_when_tracking_is_off(tmp_path):
    code = ("import sys; from pathlib import Path; from actors.tracking import open_trackers; "
            "from simulator.experiment import load_config; t = open_trackers(load_config(None), Path(sys.argv[1])); "
            "t.on_round({'round': 0, 'wall_time_s': 1.0, 'num_completed': 3}); t.finish({'rounds_completed': 1}); "
            "t.close(); print(bool(t), sorted(m for m in ('mlflow', 'tensorboard') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert proc.stdout.strip() == "False []", proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_whose_mlflow_run_is_not_in_the_store_is_a_config_error(tracked, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(tracked["run_dir"] / MLFLOW_RUN_ID, run_dir / MLFLOW_RUN_ID)
    cfg = load_config(None, _overrides(tmp_path / "other-store"))
    with pytest.raises(ConfigError, match=r"holds no MLflow run '[0-9a-f]+', the one .*mlflow_run_id names"):
        open_trackers(cfg, run_dir)


def test_a_new_event_file_starts_in_a_later_second_than_the_old_ones(tmp_path):
    """TensorBoard orders event files by name (creation second first): the resumed run's must sort last."""
    stamp = int(time.time())
    (tmp_path / f"events.out.tfevents.{stamp}.host.99999.0").write_bytes(b"")
    wait_for_a_later_second(tmp_path)
    assert int(time.time()) > stamp
