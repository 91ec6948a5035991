"""Configuration: defaults, ``--set`` parsing, TOML round trips and rejected inputs."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest

from simulator.config.schema import ConfigError, ExperimentConfig, TrackingConfig
from simulator.config.toml import dumps_toml, flatten, parse_value, to_dict
from simulator.experiment import from_dict, load_config, replace
from simulator.rundir import checkpoint


def replace_name(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    return dataclasses.replace(cfg, name=name)


def test_defaults_equal_dataclass_defaults():
    cfg = load_config(None)
    assert cfg == replace_name(ExperimentConfig(), "reptile-sinusoid")  # "" = ALGORITHM-DATASET
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
    changed = replace(cfg, **{"system.actors": 2, "rounds": 5})
    assert changed.system.actors == 2 and changed.rounds == 5
    assert cfg.system.actors == 0  # frozen original unchanged
    with pytest.raises(ConfigError, match="clients.per_round"):
        replace(cfg, **{"clients.per_round": 5000})


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


# ---------------------------------------------------------------- devices, async and round-policy keys

SYSTEM_TOML = """\
[system]
mode = "async"
max_concurrency = 30
max_staleness = 4

[devices]
uplink_ratio = 0.25
availability = 0.9
dropout = 0.1

[devices.speed]
dist = "pareto"
median = 50.0
shape = 1.2

[devices.bandwidth]
dist = "constant"
median = 10

[async]
rule = "fedasync"
staleness = "polynomial"
mixing = 0.5
"""


def test_devices_and_async_sections_load_from_a_file(tmp_path):
    from simulator.config.schema import Distribution

    path = tmp_path / "exp.toml"
    path.write_text(SYSTEM_TOML, encoding="utf-8")
    cfg = load_config(path)
    assert cfg.system.mode == "async"
    assert (cfg.system.max_concurrency, cfg.system.max_staleness) == (30, 4)
    assert cfg.devices.speed == Distribution("pareto", 50.0, sigma=1.0, shape=1.2)
    assert cfg.devices.bandwidth == Distribution("constant", 10.0, sigma=1.0, shape=1.5)
    assert isinstance(cfg.devices.bandwidth.median, float)
    assert (cfg.devices.uplink_ratio, cfg.devices.availability, cfg.devices.dropout) == (0.25, 0.9, 0.1)
    assert (cfg.async_.rule, cfg.async_.staleness, cfg.async_.mixing) == ("fedasync", "polynomial", 0.5)
    assert cfg.async_.buffer_size == ExperimentConfig().async_.buffer_size
    # a three-part override merges into the file's sub-table
    merged = load_config(path, ["devices.speed.sigma=2.0", "async.buffer_size=3"])
    assert merged.devices.speed == Distribution("pareto", 50.0, sigma=2.0, shape=1.2)
    assert merged.async_.buffer_size == 3


def test_devices_and_async_overrides():
    from simulator.config.schema import Distribution

    cfg = load_config(None, ['system.mode="deadline"', "system.deadline_s=30", "system.overselect=1.5",
                             'devices.speed={dist="constant", median=50.0}', "devices.speed.sigma=2.0",
                             "devices.bandwidth.median=5", 'devices.trace="/tmp/x.csv"', "devices.availability=0.5",
                             "async.staleness=hinge", "async.staleness_b=2"])
    assert cfg.system.mode == "deadline" and cfg.system.deadline_s == 30.0 and cfg.system.overselect == 1.5
    assert cfg.devices.speed == Distribution("constant", 50.0, sigma=2.0)
    assert cfg.devices.bandwidth.median == 5.0
    assert cfg.devices.trace == "/tmp/x.csv" and cfg.devices.availability == 0.5
    assert cfg.async_.staleness == "hinge" and cfg.async_.staleness_b == 2.0


def test_devices_defaults():
    cfg = load_config(None)
    assert cfg.system.mode == "sync"
    assert (cfg.devices.speed.dist, cfg.devices.speed.median) == ("lognormal", 100.0)
    assert (cfg.devices.bandwidth.dist, cfg.devices.bandwidth.median) == ("lognormal", 20.0)
    assert (cfg.devices.availability, cfg.devices.dropout, cfg.devices.trace) == (1.0, 0.0, "")
    assert cfg.async_.rule == "fedbuff"


def test_three_part_override_keeps_the_default_median():
    cfg = load_config(None, ["devices.speed.sigma=2.0"])
    assert cfg.devices.speed.sigma == 2.0
    assert cfg.devices.speed.median == 100.0


@pytest.mark.parametrize(
    "overrides",
    [
        ['system.mode="overselect"', "system.overselect=1.25", 'devices.speed={dist="pareto", median=3.5, shape=0.8}',
         'devices.bandwidth={dist="constant", median=1.0}', "devices.uplink_ratio=1.0", "devices.dropout=0.2"],
        ['system.mode="async"', "system.max_concurrency=40", "system.max_staleness=3", "async.rule=fedasync",
         "async.staleness=constant", "async.mixing=1", 'devices.availability_trace="/data/a \\"q\\".parquet"'],
        ["data.name=gaussian", "data.partition=dirichlet", "data.dirichlet_alpha=0.1", "data.pool_size=5000",
         "data.num_classes=4", "data.features=8", "data.separation=1.5"],
    ],
    ids=["overselect", "async", "gaussian"],
)
def test_toml_round_trip_with_nested_tables(tmp_path, overrides):
    cfg = load_config(None, overrides)
    data = to_dict(cfg)
    assert "async" in data and "async_" not in data
    assert data["devices"]["speed"] == {"dist": cfg.devices.speed.dist, "median": cfg.devices.speed.median,
                                        "sigma": cfg.devices.speed.sigma, "shape": cfg.devices.speed.shape}
    text = dumps_toml(data)
    assert tomllib.loads(text) == data
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path) == cfg


def test_flatten_has_nested_and_async_keys():
    flat = flatten(load_config(None, ["async.rule=fedasync", "devices.speed.median=7"]))
    assert flat["devices.speed.median"] == 7.0
    assert flat["devices.bandwidth.dist"] == "lognormal"
    assert flat["async.rule"] == "fedasync"
    assert flat["system.mode"] == "sync"
    assert not any(k.startswith("async_") for k in flat)
    assert not any(isinstance(v, dict) for v in flat.values())


def test_pooled_keys_kept_only_for_pooled_datasets():
    gauss = to_dict(load_config(None, ["data.name=gaussian", "data.pool_size=100"]))["data"]
    assert gauss["pool_size"] == 100 and "partition" in gauss and "shots" not in gauss
    digits = to_dict(load_config(None, ["data.name=digits"]))["data"]
    assert "partition" in digits and "pool_size" not in digits
    assert "partition" not in to_dict(load_config(None))["data"]


def test_overselect_may_sample_the_whole_population():
    # ceil(1.3 * 20) = 26 clients out of 26
    cfg = load_config(None, ['system.mode="overselect"', "clients.per_round=20", "data.num_clients=26"])
    assert cfg.system.overselect == 1.3


def test_overselect_validation_agrees_with_cohort_size():
    from simulator.scheduling import cohort_size

    assert cohort_size("overselect", 50, 1.1) == 55
    load_config(None, ['system.mode="overselect"', "system.overselect=1.1", "clients.per_round=50",
                       "data.num_clients=55"])


def test_nested_unknown_key_in_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("[devices.speed]\nmedain = 3.0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="devices.speed.medain.*did you mean 'devices.speed.median'"):
        load_config(path)


BAD_SYSTEM_OVERRIDES = [
    # (overrides, substrings the message must contain)
    (["system.mode=fifo"], ["system.mode", "fifo"]),
    (['system.mode="deadline"'], ["system.deadline_s"]),
    (['system.mode="deadline"', "system.deadline_s=0"], ["system.deadline_s", "> 0"]),
    (["system.deadline_s=-1"], ["system.deadline_s"]),
    (["system.overselect=0.9"], ["system.overselect", ">= 1"]),
    (['system.mode="overselect"', "system.overselect=2.0", "data.num_clients=30", "clients.per_round=20"],
     ["system.overselect", "40", "data.num_clients = 30"]),
    (["system.max_concurrency=1001"], ["system.max_concurrency", "data.num_clients"]),
    (["system.max_concurrency=-1"], ["system.max_concurrency"]),
    (["system.max_staleness=-1"], ["system.max_staleness"]),
    (["devices.availability=0"], ["devices.availability"]),
    (["devices.availability=1.5"], ["devices.availability"]),
    (["devices.dropout=1.0"], ["devices.dropout"]),
    (["devices.dropout=-0.1"], ["devices.dropout"]),
    (["devices.uplink_ratio=0"], ["devices.uplink_ratio"]),
    (["devices.speed.median=0"], ["devices.speed.median"]),
    (["devices.bandwidth.median=-2"], ["devices.bandwidth.median"]),
    (["devices.speed.sigma=-1"], ["devices.speed.sigma"]),
    (["devices.bandwidth.shape=0"], ["devices.bandwidth.shape"]),
    (["devices.speed.dist=weibull"], ["devices.speed.dist", "weibull"]),
    (['devices.bandwidth={dist="uniform"}'], ["devices.bandwidth.dist", "uniform"]),
    (["devices.speed=3"], ["devices.speed", "table"]),
    (["devices.speed.foo=1"], ["devices.speed.foo"]),
    (["devices.speed={foo=1}"], ["devices.speed.foo"]),
    (["devices.speed.median=fast"], ["devices.speed.median", "number"]),
    (["devices.trace=3"], ["devices.trace", "string"]),
    (["async.rule=sync"], ["async.rule", "sync"]),
    (["async.staleness=exp"], ["async.staleness", "exp"]),
    (["async.buffer_size=0"], ["async.buffer_size"]),
    (["async.mixing=0"], ["async.mixing"]),
    (["async.mixing=1.5"], ["async.mixing"]),
    (["async.staleness_a=-1"], ["async.staleness_a"]),
    (["async_.rule=fedbuff"], ["async_.rule", "did you mean 'async.rule'"]),
    (['system.mode="async"', "async.rule=fedasync", "algorithm.server_optimizer=adam"],
     ["async.rule", "algorithm.server_optimizer"]),
    (['system.mode="async"', "async.rule=fedasync", "algorithm.server_momentum=0.9"],
     ["async.rule", "algorithm.server_momentum"]),
    (["data.name=gaussian", "data.partition=random"], ["data.partition", "random"]),
    (["data.name=gaussian", "data.dirichlet_alpha=0"], ["data.dirichlet_alpha"]),
    (["data.name=gaussian", "data.shards_per_client=0"], ["data.shards_per_client"]),
    (["data.name=gaussian", "data.num_classes=1"], ["data.num_classes"]),
    (["data.name=gaussian", "data.shots=5"], ["data.shots", "'sinusoid'", "'gaussian'"]),
    (["data.name=digits", "data.pool_size=100"], ["data.pool_size", "'gaussian'", "'digits'"]),
    (["data.partition=iid"], ["data.partition", "'sinusoid'"]),
]


@pytest.mark.parametrize(("overrides", "fragments"), BAD_SYSTEM_OVERRIDES,
                         ids=[" ".join(o) for o, _ in BAD_SYSTEM_OVERRIDES])
def test_bad_system_overrides_raise_config_error_naming_the_key(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message


def test_fedasync_with_adam_is_fine_outside_async_mode():
    # the rule only matters in async mode; fedbuff accepts any server optimizer
    assert load_config(None, ["async.rule=fedasync", "algorithm.server_optimizer=adam"]).async_.rule == "fedasync"
    cfg = load_config(None, ['system.mode="async"', "algorithm.server_optimizer=adam"])
    assert cfg.async_.rule == "fedbuff"


def test_tracking_locations_become_absolute_so_a_resume_logs_to_the_same_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ['tracking.tensorboard="tb"', 'tracking.mlflow_uri="file:./mlruns"'])
    assert cfg.tracking.tensorboard == str(tmp_path / "tb")
    assert cfg.tracking.mlflow_uri == (tmp_path / "mlruns").as_uri()
    assert load_config(None, ['tracking.mlflow_uri="mlruns"']).tracking.mlflow_uri == (tmp_path / "mlruns").as_uri()
    kept = load_config(None, ['tracking.tensorboard="run"', 'tracking.mlflow_uri="http://127.0.0.1:5000"'])
    assert (kept.tracking.tensorboard, kept.tracking.mlflow_uri) == ("run", "http://127.0.0.1:5000")
    assert from_dict(to_dict(cfg)) == cfg  # config.toml records the resolved values; reading them changes nothing
    assert load_config(None).tracking == TrackingConfig("", "", "metafleet")


@pytest.mark.parametrize(("overrides", "key"), [
    (['tracking.tensorboard=" tb"'], "tracking.tensorboard"),
    (['tracking.mlflow_uri="file:./mlruns "'], "tracking.mlflow_uri"),
    (['tracking.mlflow_uri="file:./mlruns"', 'tracking.mlflow_experiment=""'], "tracking.mlflow_experiment"),
    (['tracking.tensorbord="run"'], "did you mean 'tracking.tensorboard'"),
])
def test_bad_tracking_keys_are_one_config_error_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, overrides)


def test_tracking_keys_may_change_on_resume(tmp_path):
    cfg = load_config(None)
    changed = replace(cfg, **{"tracking.tensorboard": "run", "tracking.mlflow_uri": "http://127.0.0.1:5000",
                              "tracking.mlflow_experiment": "other"})
    checkpoint.check_compatible(cfg, changed, tmp_path)
    assert {f"tracking.{f}" for f in ("tensorboard", "mlflow_uri", "mlflow_experiment")} <= checkpoint.RESUMABLE_KEYS
