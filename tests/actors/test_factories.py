"""A user's model and algorithm factories in files next to the config, run by ``metafleet run`` from another
directory without ``PYTHONPATH`` pointing at them, on the inline backend and on a Ray of the run's own (whose
actors load the files by path), with files named ``simulator.py``, ``analysis.py`` and ``actors.py`` beside them
and in the working directory that must shadow nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # this checkout: the only entry of PYTHONPATH in the subprocess
SHADOW = 'raise ImportError("a user file shadowed metafleet")\n'
MODELS = """import torch.nn as nn


def small(input_dim, output_dim):
    return nn.Sequential(nn.Linear(input_dim, 9), nn.Tanh(), nn.Linear(9, output_dim))
"""
ALGORITHMS = """import dataclasses

from simulator.algorithms.fedavg import FEDAVG


def fedavg_local():
    return dataclasses.replace(FEDAVG, name="fedavg_local")
"""
CONFIG = """rounds = 3
[data]
num_clients = 20
eval_clients = 4
[model]
factory = "my_models:small"
[algorithm]
factory = "my_algorithms:fedavg_local"
local_steps = 2
[clients]
per_round = 4
[eval]
every = 2
clients = 4
adapt_steps = 2
[system]
backend = "{backend}"
actors = 1
"""


@pytest.mark.parametrize("backend", ["inline", "ray"])
def test_factories_next_to_the_config_run_without_pythonpath(tmp_path, backend):
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    for d in (conf, elsewhere):
        d.mkdir()
        for name in ("simulator", "analysis", "actors"):
            (d / f"{name}.py").write_text(SHADOW)
    (conf / "my_models.py").write_text(MODELS)
    (conf / "my_algorithms.py").write_text(ALGORITHMS)
    (conf / "exp.toml").write_text(CONFIG.format(backend=backend))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(ROOT)
    # -P: the working directory is not put on sys.path, as for the `metafleet` console script
    proc = subprocess.run([sys.executable, "-P", "-m", "actors.cli", "run", "../conf/exp.toml", "--out", "../run",
                           "--no-progress", "--no-plots"], cwd=elsewhere, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["algorithm"] == "fedavg_local"
    assert summary["workers"] and len(summary["workers"]) == 1
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config["model"]["factory"] == f"{(conf / 'my_models.py').resolve()}:small"
    assert config["algorithm"]["factory"] == f"{(conf / 'my_algorithms.py').resolve()}:fedavg_local"
    assert "shadowed" not in proc.stderr
