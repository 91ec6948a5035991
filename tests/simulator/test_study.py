"""A study's expansion into trials (``simulator.study``): order, zip, seeds, names and validation."""

from __future__ import annotations

import pytest

from simulator.config.schema import ConfigError
from simulator.study import expand, read_study, trial_name

BASE = {"rounds": 3, "data": {"num_clients": 30}, "system": {"backend": "inline"}}


def test_the_grid_is_a_cross_product_with_the_seed_fastest():
    base = {**BASE, "data": {"name": "gaussian", "partition": "dirichlet", "num_clients": 30}}
    study = expand(base, {"grid": {"algorithm.name": ["reptile", "maml"], "data.dirichlet_alpha": [0.1, 1.0]},
                          "seeds": [0, 1, 2]})
    assert len(study.trials) == 12
    got = [(t.keys["algorithm.name"], t.keys["data.dirichlet_alpha"], t.seed) for t in study.trials]
    assert got[:4] == [("reptile", 0.1, 0), ("reptile", 0.1, 1), ("reptile", 0.1, 2), ("reptile", 1.0, 0)]
    assert got[-1] == ("maml", 1.0, 2)
    assert [t.index for t in study.trials] == list(range(12))
    t = study.trials[5]
    assert t.config.algorithm.name == "reptile" and t.config.data.dirichlet_alpha == 1.0 and t.config.seed == 2
    assert t.config.rounds == 3 and t.config.data.num_clients == 30
    assert len({t.name for t in study.trials}) == 12


def test_zip_lists_vary_together_and_times_the_grid():
    study = expand(BASE, {"grid": {"algorithm.name": ["reptile", "fomaml"]},
                          "zip": {"algorithm.local_lr": [0.01, 0.02, 0.04], "algorithm.local_steps": [5, 10, 20]}})
    assert len(study.trials) == 6  # 2 x 3 x one seed (the base's)
    pairs = {(t.config.algorithm.local_lr, t.config.algorithm.local_steps) for t in study.trials}
    assert pairs == {(0.01, 5), (0.02, 10), (0.04, 20)}
    assert {t.seed for t in study.trials} == {0}


def test_ray_trials_reserve_a_fixed_pool():
    study = expand({"system": {"backend": "ray"}}, {"seeds": [0]})
    assert study.trials[0].config.system.actors == 1  # never "as many as the cluster holds" inside a sweep
    study = expand({"system": {"backend": "ray", "actors": 3}}, {"seeds": [0]})
    assert study.trials[0].config.system.actors == 3


def test_names_are_directory_names():
    name = trial_name(7, {"algorithm.name": "maml", "data.dirichlet_alpha": 0.1, "model.hidden": [64, 64]}, 2)
    assert name == "t0007-algorithm=maml,dirichlet_alpha=0.1,hidden=_64,_64_-seed=2"
    assert "/" not in trial_name(0, {"data.path": "/etc/passwd"}, 0)


@pytest.mark.parametrize("sweep, needle", [
    ({"grid": {"algorithm.nmae": ["maml"]}}, "unknown key 'algorithm.nmae'"),
    ({"grid": {"algorithm.name": ["maml", "nope"]}}, "sweep trial 1 (algorithm.name='nope', seed=0)"),
    ({"grid": {"algorithm.local_lr": [0.1, -1.0]}}, "algorithm.local_lr"),
    ({"grid": {"algorithm.name": "maml"}}, "must be a non-empty list"),
    ({"grid": {"algorithm.name": []}}, "must be a non-empty list"),
    ({"zip": {"algorithm.local_lr": [0.1, 0.2], "algorithm.local_steps": [1]}}, "must have one length"),
    ({"grid": {"seed": [1, 2]}}, "sweep.seeds"),
    ({"seeds": [1, 1]}, "distinct integers"),
    ({"seeds": "0"}, "distinct integers"),
    ({"grids": {}}, "sweep.grids is not a sweep key"),
    ({"max_concurrent": -1}, "sweep.max_concurrent"),
    ({"driver_cpus": 0}, "sweep.driver_cpus"),
    ({"grid": {"data.num_clients": list(range(30, 530))}, "zip": {"algorithm.local_steps": list(range(1, 501))},
      "seeds": list(range(1000))}, "more than 100,000"),
])
def test_bad_sweeps_are_one_clear_error(sweep, needle):
    with pytest.raises(ConfigError) as err:
        expand(BASE, sweep)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_study_file_needs_a_sweep_table_and_takes_overrides(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('rounds = 3\n[system]\nbackend = "inline"\n')
    with pytest.raises(ConfigError, match="no \\[sweep\\] table"):
        read_study(path)
    path.write_text('rounds = 3\n[sweep]\nseeds = [4, 5]\n')
    study = read_study(path, ["rounds=7"])
    assert [t.config.rounds for t in study.trials] == [7, 7] and [t.seed for t in study.trials] == [4, 5]
    stored = study.as_toml_dict()
    sweep = stored.pop("sweep")
    assert [t.config for t in expand(stored, sweep).trials] == [t.config for t in study.trials]
