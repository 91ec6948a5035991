"""Configuration: defaults, ``--set`` parsing, TOML round trips and rejected inputs."""

from __future__ import annotations

import tomllib

import pytest

from simulator.config import (
    ConfigError,
    ExperimentConfig,
    dumps_toml,
    flatten,
    from_dict,
    load_config,
    parse_value,
    to_dict,
)


def test_defaults_equal_dataclass_defaults():
    cfg = load_config(None)
    assert cfg == ExperimentConfig()
    assert cfg.data.name == "sinusoid"
    assert cfg.algorithm.name == "reptile"
    assert cfg.model.hidden == (40, 40)
    assert load_config(None, []) == cfg
    assert from_dict({}) == cfg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[64]", [64]),
        ("[64, 32]", [64, 32]),
        ("0.25", 0.25),
        ("3", 3),
        ("true", True),
        ('"maml"', "maml"),
        ("maml", "maml"),          # bare word: a string
        ("ray://host:10001", "ray://host:10001"),
        ("a=b", "a=b"),
    ],
)
def test_parse_value(text, expected):
    value = parse_value(text)
    assert value == expected
    assert type(value) is type(expected)


def test_set_overrides_are_typed():
    cfg = load_config(None, ["model.hidden=[64]", "algorithm.name=maml", "system.gpus_per_actor=0.25",
                             "rounds=7", "data.num_clients=50", "algorithm.server_lr=2"])
    assert cfg.model.hidden == (64,)
    assert isinstance(cfg.model.hidden, tuple)
    assert cfg.algorithm.name == "maml"
    assert cfg.system.gpus_per_actor == 0.25
    assert cfg.rounds == 7
    assert cfg.data.num_clients == 50
    # an int is accepted where a float is expected, and stored as a float
    assert cfg.algorithm.server_lr == 2.0
    assert isinstance(cfg.algorithm.server_lr, float)


def test_set_overrides_win_over_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('name = "from-file"\nrounds = 3\n\n[data]\nnum_clients = 50\n', encoding="utf-8")
    cfg = load_config(path, ["data.num_clients=60"])
    assert cfg.name == "from-file"
    assert cfg.rounds == 3
    assert cfg.data.num_clients == 60
    assert cfg.data.eval_clients == ExperimentConfig().data.eval_clients


@pytest.mark.parametrize(
    "overrides",
    [
        ["rounds=12", "seed=3", "model.hidden=[16, 8]", "algorithm.name=fomaml", "algorithm.batch_size=0",
         "data.shots=5", "data.query=15", "system.gpus_per_actor=0.5", "system.address=\"ray://h:1\"",
         'name="run \\"q\\" back\\\\slash"'],
        ["data.name=synthetic", "data.alpha=0.5", "data.beta=0.25", "data.iid=true", "data.samples_per_client=30",
         "data.test_fraction=0.25", "algorithm.name=maml", "algorithm.server_optimizer=adam",
         "algorithm.server_lr=0.001", "algorithm.local_lr=1e-05", "model.hidden=[]", "metrics.flush_every=3"],
    ],
    ids=["sinusoid", "synthetic"],
)
def test_toml_round_trip(tmp_path, overrides):
    cfg = load_config(None, overrides)
    assert cfg != ExperimentConfig()
    path = tmp_path / "config.toml"
    path.write_text(dumps_toml(to_dict(cfg)), encoding="utf-8")
    again = load_config(path)
    assert again == cfg
    # and the written TOML parses to exactly the dict it came from
    assert tomllib.loads(path.read_text(encoding="utf-8")) == to_dict(cfg)


def test_to_dict_keeps_only_the_chosen_datasets_keys():
    sin = to_dict(load_config(None))
    assert "shots" in sin["data"] and "alpha" not in sin["data"]
    syn = to_dict(load_config(None, ["data.name=synthetic"]))
    assert "alpha" in syn["data"] and "shots" not in syn["data"]
    assert syn["model"]["hidden"] == [40, 40]


def test_flatten_and_replace():
    cfg = load_config(None)
    flat = flatten(cfg)
    assert flat["algorithm.local_lr"] == cfg.algorithm.local_lr
    assert flat["rounds"] == cfg.rounds
    assert flat["model.hidden"] == list(cfg.model.hidden)
    assert not any(isinstance(v, dict) for v in flat.values())
    assert "data.alpha" not in flat
    changed = cfg.replace(**{"system.actors": 2, "rounds": 5})
    assert changed.system.actors == 2 and changed.rounds == 5
    assert cfg.system.actors == 0  # frozen original unchanged
    with pytest.raises(ConfigError, match="clients.per_round"):
        cfg.replace(**{"clients.per_round": 5000})


def test_toml_round_trip_with_newline_in_name(tmp_path):
    cfg = load_config(None, ['name="line1\\nline2"'])
    assert cfg.name == "line1\nline2"
    path = tmp_path / "config.toml"
    path.write_text(dumps_toml(to_dict(cfg)), encoding="utf-8")
    assert load_config(path) == cfg


BAD_OVERRIDES = [
    # (overrides, substrings the message must contain)
    (["algorithm.local_lrr=0.1"], ["algorithm.local_lrr", "did you mean 'algorithm.local_lr'"]),
    (["roundz=3"], ["roundz", "did you mean 'rounds'"]),
    (["algo.name=maml"], ["algo.name", "did you mean 'algorithm.name'"]),
    (["data.foo.bar=1"], ["data.foo.bar"]),
    (["data.num_clients=\"ten\""], ["data.num_clients", "integer"]),
    (["data.num_clients=ten"], ["data.num_clients", "integer"]),
    (["rounds=2.5"], ["rounds", "integer"]),
    (["seed=true"], ["seed", "integer"]),
    (["model.hidden=[64, \"a\"]"], ["model.hidden", "list of integers"]),
    (["model.hidden=64"], ["model.hidden", "list of integers"]),
    (["data.iid=1", "data.name=synthetic"], ["data.iid", "true or false"]),
    (["algorithm.local_lr=\"fast\""], ["algorithm.local_lr", "number"]),
    (["system.cpus_per_actor=inf"], ["system.cpus_per_actor", "finite"]),
    (["name=5"], ["name", "string"]),
    (["data=5"], ["'data'", "table"]),
    (["data.num_clients=20", "clients.per_round=21"], ["clients.per_round", "data.num_clients"]),
    (["system.gpus_per_actor=1.5"], ["system.gpus_per_actor"]),
    (["system.gpus_per_actor=-0.1"], ["system.gpus_per_actor"]),
    (["algorithm.local_lr=-0.01"], ["algorithm.local_lr"]),
    (["algorithm.local_lr=0"], ["algorithm.local_lr"]),
    (["algorithm.server_lr=-1.0"], ["algorithm.server_lr"]),
    (["algorithm.server_momentum=1.0"], ["algorithm.server_momentum"]),
    (["eval.clients=101"], ["eval.clients", "data.eval_clients"]),
    (["data.eval_clients=5", "eval.clients=6"], ["eval.clients", "data.eval_clients"]),
    (["data.alpha=0.5"], ["data.alpha", "sinusoid"]),
    (["data.name=synthetic", "data.shots=5"], ["data.shots", "synthetic"]),
    (["data.name=mnist"], ["data.name", "mnist"]),
    (["algorithm.name=sgd"], ["algorithm.name"]),
    (["algorithm.server_optimizer=rmsprop"], ["algorithm.server_optimizer"]),
    (["data.name=synthetic", "data.test_fraction=1.0"], ["data.test_fraction"]),
    (["data.name=synthetic", "data.samples_per_client=1"], ["data.samples_per_client"]),
    (["model.hidden=[0]"], ["model.hidden"]),
    (["model.factory=nocolon"], ["model.factory"]),
    (["name=a/b"], ["name"]),
    (["rounds=0"], ["rounds"]),
    (["rounds"], ["'rounds'", "key.sub=value"]),
    (["=5"], ["'=5'", "key.sub=value"]),
]


@pytest.mark.parametrize(("overrides", "fragments"), BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_overrides_raise_config_error_naming_the_key(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_bad_file_key_is_reported(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("[algorithm]\nlocal_stepz = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="did you mean 'algorithm.local_steps'"):
        load_config(path)


def test_dataset_key_for_other_dataset_in_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("[data]\nname = \"sinusoid\"\nbeta = 0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="data.beta"):
        load_config(path)


def test_malformed_toml_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("rounds = = 3\n[data\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "broken.toml" in str(info.value)
    assert "TOML" in str(info.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="latin.toml"):
        load_config(path)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "nope.toml" in str(info.value)
    assert "does not exist" in str(info.value)


def test_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)
