"""The Python API (``actors.api``) as a notebook uses it: a config from a dict or keywords, a run, its
frames, callbacks per round, a resume; the directory it writes is one ``metafleet`` accepts."""

from __future__ import annotations

import pandas as pd
import pytest
import ray

from actors import api
from actors.cli import main
from simulator.config.schema import ConfigError
from simulator.rundir.metrics import WALL_CLOCK_COLUMNS

SMALL = {"rounds": 4, "data": {"num_clients": 24, "eval_clients": 4}, "clients": {"per_round": 6},
         "eval": {"every": 2, "clients": 4, "adapt_steps": 2}, "algorithm": {"local_steps": 2},
         "system": {"backend": "inline"}}


def _frames(result: api.Result) -> dict[str, pd.DataFrame]:
    return {"rounds": result.rounds.drop(columns=list(WALL_CLOCK_COLUMNS["rounds"])),
            "clients": result.clients.drop(columns=list(WALL_CLOCK_COLUMNS["clients"])),
            "evals": result.evals.drop(columns=list(WALL_CLOCK_COLUMNS["evals"]))}


def test_configs_come_from_dicts_keywords_and_dotted_overrides(tmp_path):
    cfg = api.experiment(SMALL, {"algorithm.name": "fomaml"}, rounds=7, clients={"per_round": 5})
    assert (cfg.rounds, cfg.algorithm.name, cfg.clients.per_round, cfg.data.num_clients) == (7, "fomaml", 5, 24)
    assert cfg.name == "fomaml-sinusoid"  # the default name says what runs
    toml = tmp_path / "exp.toml"
    toml.write_text('rounds = 3\n[algorithm]\nname = "maml"\n')
    assert api.experiment(toml, ["rounds=9"]).rounds == 9
    assert api.experiment(api.experiment(toml), name="mine").name == "mine"
    with pytest.raises(ConfigError, match="unknown key 'algorithm.nmae'"):
        api.experiment(SMALL, {"algorithm.nmae": "maml"})
    with pytest.raises(ConfigError, match="clients.per_round"):
        api.experiment(SMALL, clients={"per_round": 0})


def test_a_run_gives_its_frames_and_a_directory_the_cli_accepts(tmp_path, capsys):
    rows: list[int] = []
    result = api.run(SMALL, tmp_path / "nb", on_round=lambda row: rows.append(row["round"]), plots=False)
    assert result.status == "completed" and rows == [0, 1, 2, 3]
    assert list(result.rounds["round"]) == [0, 1, 2, 3] and len(result.clients) == 4 * 6
    assert set(result.evals["round"]) == {0, 2, 3}  # round 0, every 2nd, the last
    assert result.summary["rounds_completed"] == 4 and (tmp_path / "nb" / "config.toml").is_file()
    assert "4/4 rounds" in repr(result)
    assert main(["report", str(tmp_path / "nb"), "--out", str(tmp_path / "report.html")]) == 0
    assert (tmp_path / "report.html").stat().st_size > 0
    assert main(["compare", str(tmp_path / "nb")]) == 0
    extended = api.resume(tmp_path / "nb", rounds=6, plots=False)
    straight = api.run(api.experiment(SMALL, rounds=6), tmp_path / "six", plots=False)
    # the same training; the 4-round run also evaluated its last round (3), which the 6-round one skips
    pd.testing.assert_frame_equal(_frames(extended)["clients"], _frames(straight)["clients"], check_exact=True)
    train = [c for c in straight.rounds.columns if not c.startswith("eval_") and c != "wall_time_s"]
    pd.testing.assert_frame_equal(extended.rounds[train], straight.rounds[train], check_exact=True)
    with pytest.raises(ConfigError, match="already exists"):
        api.run(SMALL, tmp_path / "nb")


def test_ray_runs_reuse_the_running_ray(ray_session, tmp_path):
    cfg = api.experiment(SMALL, {"system.backend": "ray", "system.actors": 1})
    node = ray.get_runtime_context().get_node_id()
    first = api.run(cfg, tmp_path / "a", plots=False)
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node
    second = api.run(cfg, tmp_path / "b", plots=False)
    assert first.status == second.status == "completed"
    pd.testing.assert_frame_equal(_frames(first)["clients"], _frames(second)["clients"], check_exact=True)
