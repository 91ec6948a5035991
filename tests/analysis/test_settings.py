"""analysis.settings: which runs are seeds of one setting, the base, and labels that name every difference."""

from __future__ import annotations

import pytest

from analysis import run_labels
from analysis.settings import EXECUTION_ONLY, UNSET, group_settings, is_setting_key, short_keys
from simulator.config.schema import ExperimentConfig
from simulator.config.toml import flatten, to_dict
from simulator.rundir.checkpoint import RESUMABLE_KEYS


def _config(seed: int = 0, **changes: object) -> dict:
    """A whole resolved config (the schema's defaults) with dotted-key ``changes``."""
    config = to_dict(ExperimentConfig())
    config["seed"] = seed
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        assert leaf in node, key  # only keys the schema has
        node[leaf] = value
    return config


MAML_ADAM = {"algorithm.name": "maml", "algorithm.server_optimizer": "adam", "algorithm.server_lr": 0.003}


def test_seed_and_execution_only_differences_make_one_setting():
    configs = [_config(0), _config(1, **{"system.actors": 2, "system.backend": "inline"}),
               _config(2, name="other", **{"metrics.flush_every": 1, "system.address": "auto"})]
    grouping = group_settings(configs)
    assert len(grouping.settings) == 1 and grouping.settings[0].runs == (0, 1, 2) and grouping.settings[0].n == 3
    assert grouping.differing == () and grouping.settings[0].label == "reptile"
    assert grouping.varying == ("name", "seed", "system.backend", "system.actors", "system.address",
                                "metrics.flush_every")
    base = dict(grouping.base)
    assert base["algorithm.local_lr"] == 0.02 and base["model.hidden"] == (40, 40)
    assert not {"seed", "system.actors", "name"} & set(base)


def test_a_differing_optimizer_is_its_own_setting_and_every_differing_key_is_in_the_label():
    # the user's case: reptile against maml with server Adam at 0.003; the label must not hide the optimizer
    configs = [_config(0), _config(1), _config(0, **MAML_ADAM), _config(1, **MAML_ADAM)]
    grouping = group_settings(configs)
    assert [s.runs for s in grouping.settings] == [(0, 1), (2, 3)]
    assert grouping.differing == ("algorithm.name", "algorithm.server_lr", "algorithm.server_optimizer")
    assert [s.label for s in grouping.settings] == [
        "algorithm.name=reptile, algorithm.server_lr=1.0, algorithm.server_optimizer=sgd",
        "algorithm.name=maml, algorithm.server_lr=0.003, algorithm.server_optimizer=adam"]
    # short form: a key loses its section only where the rest names no other key (name, data.name, model.name)
    assert grouping.settings[1].short_label == "algorithm.name=maml, server_lr=0.003, server_optimizer=adam"
    assert dict(grouping.settings[1].values) == {"algorithm.name": "maml", "algorithm.server_lr": 0.003,
                                                 "algorithm.server_optimizer": "adam"}
    assert run_labels(configs) == [grouping.settings[0].label] * 2 + [grouping.settings[1].label] * 2
    assert grouping.setting_of(3).number == 2 and "algorithm.local_lr" in dict(grouping.base)
    # the optimizer alone also makes a setting, named in the label even with the same algorithm name
    maml = {"algorithm.name": "maml"}
    sgd, adam = group_settings([_config(0, **maml),
                                _config(0, **maml, **{"algorithm.server_optimizer": "adam"})]).settings
    assert (sgd.label, adam.label) == ("algorithm.server_optimizer=sgd", "algorithm.server_optimizer=adam")


@pytest.mark.parametrize("key, value", [("rounds", 8), ("system.mode", "async"), ("system.deadline_s", 5.0),
                                        ("system.threads", 2), ("system.vectorize", False), ("eval.every", 5),
                                        ("devices.speed.median", 50.0)])
def test_keys_that_change_results_make_settings(key, value):
    grouping = group_settings([_config(0), _config(1, **{key: value})])
    assert len(grouping.settings) == 2 and grouping.differing == (key,)
    assert grouping.settings[1].label.endswith(f"{key}={value if not isinstance(value, bool) else 'false'}")


def test_execution_only_is_resumes_execution_keys_and_the_name():
    # a resume may change exactly the keys that never change a run's numbers, and `rounds` (its length)
    assert set(EXECUTION_ONLY) == (set(RESUMABLE_KEYS) - {"rounds"}) | {"name"}
    assert set(EXECUTION_ONLY) <= set(flatten(ExperimentConfig()))
    assert not is_setting_key("seed") and not is_setting_key("system.actors") and is_setting_key("system.mode")


def test_short_keys_are_unambiguous_suffixes():
    every = ["name", "data.name", "algorithm.name", "devices.speed.median", "devices.bandwidth.median",
             "algorithm.server_lr", "data.dirichlet_alpha"]
    assert short_keys(["algorithm.name", "devices.speed.median", "algorithm.server_lr", "data.dirichlet_alpha"],
                      every) == {"algorithm.name": "algorithm.name", "devices.speed.median": "speed.median",
                                 "algorithm.server_lr": "server_lr", "data.dirichlet_alpha": "dirichlet_alpha"}


def test_values_compare_as_toml_values_and_missing_keys_are_unset():
    # 1 and 1.0 are one value in TOML terms; a list compares by its items
    one = group_settings([_config(0, **{"algorithm.server_lr": 1}), _config(1, **{"algorithm.server_lr": 1.0})])
    assert len(one.settings) == 1
    hidden = group_settings([_config(0), _config(0, **{"model.hidden": [64]})])
    assert [s.label for s in hidden.settings] == ["model.hidden=[40,40]", "model.hidden=[64]"]
    hand = group_settings([{"seed": 0, "algorithm": {"name": "reptile"}},
                           {"seed": 0, "algorithm": {"name": "reptile", "local_lr": 0.1}}])
    assert [s.label for s in hand.settings] == [f"algorithm.local_lr={UNSET}", "algorithm.local_lr=0.1"]
    assert dict(hand.base) == {"seed": 0, "algorithm.name": "reptile"}
