"""Factories named in the config (``simulator.plugins``): found next to the config file or in the working
directory without touching ``sys.path``, loaded by path under a private name, and shipped to workers as source."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.nn as nn
from conftest import small_overrides

import simulator
from simulator.client.worker import ClientWorker
from simulator.config.schema import ConfigError
from simulator.contract import WorkerSpec
from simulator.experiment import load_config
from simulator.plugins import call_factory, locate, provide_sources

MODEL = ("import torch.nn as nn\n\n\ndef small(input_dim, output_dim):\n"
         "    return nn.Sequential(nn.Linear(input_dim, {width}), nn.Tanh(), nn.Linear({width}, output_dim))\n")
SHADOW = 'raise ImportError("a user file shadowed a package")\n'


def _files(directory: Path, width: int = 7, **extra: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "my_models.py").write_text(MODEL.format(width=width))
    for name, text in extra.items():
        (directory / f"{name}.py").write_text(text)
    return directory


def test_a_module_next_to_the_config_file_is_recorded_as_its_absolute_file(tmp_path, monkeypatch):
    conf = _files(tmp_path / "conf")
    monkeypatch.chdir(_files(tmp_path / "cwd", width=3))  # the config's directory comes first
    path = conf / "exp.toml"
    path.write_text('[model]\nfactory = "my_models:small"\n')
    cfg = load_config(path, small_overrides())
    assert cfg.model.factory == f"{conf.resolve() / 'my_models.py'}:small"
    assert load_config(None, ['model.factory="my_models:small"']).model.factory.startswith(
        str((tmp_path / "cwd").resolve()))  # no config file: the working directory
    # a path relative to the config file's directory, and a missing one
    (conf / "nested").mkdir()
    (conf / "nested" / "models_file.py").write_text(MODEL.format(width=5))
    path.write_text('[model]\nfactory = "nested/models_file.py:small"\n')
    assert load_config(path).model.factory == f"{(conf / 'nested' / 'models_file.py').resolve()}:small"
    with pytest.raises(ConfigError, match=r"^model\.factory = 'nope\.py:small': no file 'nope\.py' in "):
        load_config(None, ['model.factory="nope.py:small"'])


def test_installed_modules_are_imported_by_name_and_missing_ones_name_the_places_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert locate("model.factory", "torch.nn:Identity", [tmp_path]) == "torch.nn:Identity"
    assert locate("model.factory", "no_such_module_xyz:make", [tmp_path]) == "no_such_module_xyz:make"
    with pytest.raises(ConfigError, match="put the module next to the config file or in the working directory"):
        call_factory("model.factory", "no_such_module_xyz:make")


def test_local_files_named_like_metafleets_packages_shadow_nothing(tmp_path, monkeypatch):
    conf = _files(tmp_path / "conf", width=11, simulator=SHADOW, analysis=SHADOW, actors=SHADOW)
    monkeypatch.chdir(conf)
    before = list(sys.path)
    model = call_factory("model.factory", locate("model.factory", "my_models:small", [conf]), input_dim=2,
                         output_dim=1)
    assert isinstance(model, nn.Sequential) and model[0].out_features == 11
    assert sys.path == before and sys.modules["simulator"] is simulator  # sys.path untouched, nothing shadowed
    name = next(n for n in sys.modules if n.startswith("_metafleet_factory_my_models_"))
    assert sys.modules[name].__file__ == str((conf / "my_models.py").resolve())


def test_a_worker_without_the_file_loads_the_source_the_driver_shipped(tmp_path, monkeypatch):
    conf = _files(tmp_path / "conf", width=13)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, small_overrides(**{"model.factory": "conf/my_models.py:small"}))
    spec = WorkerSpec.from_config(cfg)  # the driver reads the file's source into the spec
    assert spec.factory_sources == ((str((conf / "my_models.py").resolve()), MODEL.format(width=13)),)
    (conf / "my_models.py").unlink()  # as on another node of a cluster
    worker = ClientWorker(spec)
    assert worker.model[0].out_features == 13
    provide_sources(())  # nothing shipped: a missing file is one ConfigError naming the key
    with pytest.raises(ConfigError, match=r"^model\.factory = .*: cannot read"):
        call_factory("model.factory", f"{tmp_path / 'gone.py'}:small")
