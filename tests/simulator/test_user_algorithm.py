"""A user's own algorithm from ``algorithm.factory``: exact steps, config resolution, end to end inline and on Ray,
vectorized and sequential, and the logged fall-back of a record without a vectorized step."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch.nn.functional as F
from conftest import run_with_backend, small_overrides
from tiny import cfg, linear, rng, shard, theta

from simulator.algorithms.record import Algorithm, planned_samples
from simulator.algorithms.registry import resolve
from simulator.client.worker import ClientWorker
from simulator.config.schema import ConfigError
from simulator.config.toml import to_dict
from simulator.contract import WorkerSpec
from simulator.experiment import load_config
from simulator.rundir.metrics import WALL_CLOCK_COLUMNS
from tests.simulator.proximal_algorithm import fedprox, fedprox_update

MODULE = "tests.simulator.proximal_algorithm"


def _tables(run_dir) -> dict[str, pd.DataFrame]:
    out = {}
    for name, wall in WALL_CLOCK_COLUMNS.items():
        df = pd.read_parquet(run_dir / f"{name}.parquet").drop(columns=list(wall))
        out[name] = df.sort_values(["round", "client_id"] if name != "rounds" else ["round"], ignore_index=True)
    return out


def _run(tmp_path, tag, **extra) -> dict[str, pd.DataFrame]:
    c = load_config(None, small_overrides(**{"data.name": "synthetic", "data.samples_per_client": 30, **extra}))
    summary = run_with_backend(c, tmp_path / tag)
    assert summary["status"] == "completed" and summary["algorithm"] == c.algorithm.name
    return _tables(tmp_path / tag)


def test_the_proximal_step_in_exact_numbers():
    # all local data x = [1, 1], y = [2, 2]: grad L(w) = 2 (w - 2); lr 0.1, mu 1, two full-batch steps from 0:
    # w1 = 0 - 0.1 * (-4 + 0) = 0.4; w2 = 0.4 - 0.1 * (2 (0.4 - 2) + 1 * (0.4 - 0)) = 0.68
    upd = fedprox_update(linear(), theta(0.0), shard([1], [2], [1], [2]), cfg("fedprox", steps=2), rng(), F.mse_loss,
                         mu=1.0)
    assert upd.vector.tolist() == pytest.approx([0.68], abs=1e-15)
    assert upd.loss_before == 4.0 and upd.loss_after == pytest.approx((0.68 - 2) ** 2, abs=1e-15)
    assert upd.samples_processed == 4 == planned_samples(fedprox(1.0), cfg("fedprox", steps=2), 1, 1)


def test_the_factory_names_the_algorithm_and_bad_factories_are_config_errors():
    c = load_config(None, [f'algorithm.factory="{MODULE}:fedprox"'])
    # a module in the working directory is recorded as its file, which workers load by path
    here = Path(__file__).resolve().parent / "proximal_algorithm.py"
    assert c.algorithm.name == "fedprox" and to_dict(c)["algorithm"]["factory"] == f"{here}:fedprox"
    record = resolve(c.algorithm)
    assert isinstance(record, Algorithm) and record.weighting == "samples" and record.vectorized_step is not None
    for overrides, needle in (
        ([f'algorithm.factory="{MODULE}:fedprox"', 'algorithm.name="maml"'], "drop algorithm.name"),
        ([f'algorithm.factory="{MODULE}:not_a_record"'], "returned str, not an"),
        (['algorithm.factory="no_such_module_xyz:make"'], "cannot import 'no_such_module_xyz'"),
        (['algorithm.factory="nocolon"'], "must look like 'package.module:function'"),
        (['algorithm.name="fedprox"'], "algorithm.name = 'fedprox' is not supported"),
    ):
        with pytest.raises(ConfigError, match=needle):
            load_config(None, overrides)


def test_fedprox_with_mu_zero_is_fedavg(tmp_path):
    for vectorize in (False, True):
        fedavg = _run(tmp_path, f"fedavg-{vectorize}", **{"algorithm.name": "fedavg", "system.backend": "inline",
                                                         "system.vectorize": vectorize})
        prox = _run(tmp_path, f"prox0-{vectorize}", **{"algorithm.factory": f"{MODULE}:fedprox_mu0",
                                                       "system.backend": "inline", "system.vectorize": vectorize})
        if not vectorize:  # the same autograd steps: bit for bit
            for name in fedavg:
                pd.testing.assert_frame_equal(fedavg[name], prox[name], check_exact=True)
            continue
        # vectorized, the built-in FedAvg takes the written-out backward of plain MLPs (simulator.algorithms.mlpsgd)
        # and the user's step autograd: the same maths in another summation order (float32 rounding only)
        for col in ("loss_before", "loss_after", "update_norm"):
            np.testing.assert_allclose(prox["clients"][col], fedavg["clients"][col], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(prox["rounds"]["eval_loss_post"], fedavg["rounds"]["eval_loss_post"], rtol=1e-4)


def test_a_user_algorithm_runs_inline_and_on_ray_sequential_and_vectorized(ray_session, tmp_path):
    factory = {"algorithm.factory": f"{MODULE}:fedprox"}
    seq = _run(tmp_path, "seq", **factory, **{"system.backend": "inline", "system.vectorize": False})
    vec = _run(tmp_path, "vec", **factory, **{"system.backend": "inline"})
    ray2 = _run(tmp_path, "ray2", **factory, **{"system.backend": "ray", "system.actors": 2})
    for name in vec:
        pd.testing.assert_frame_equal(vec[name], ray2[name], check_exact=True)  # identical across backends
    # vectorized against sequential: the same maths in another summation order (float32 rounding only)
    for col in ("loss_before", "loss_after", "update_norm"):
        np.testing.assert_allclose(vec["clients"][col], seq["clients"][col], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(vec["rounds"]["eval_loss_post"], seq["rounds"]["eval_loss_post"], rtol=1e-4)
    assert (vec["clients"]["drop_reason"] == "").all() and len(vec["rounds"]) == 4


def test_a_record_without_a_vectorized_step_falls_back_with_a_logged_reason(caplog):
    c = load_config(None, small_overrides(**{"algorithm.factory": f"{MODULE}:fedprox_sequential"}))
    with caplog.at_level(logging.WARNING, logger="metafleet.worker"):
        worker = ClientWorker(WorkerSpec.from_config(c))
    assert worker.vectorized is None
    assert "sequential client steps instead, because algorithm 'fedprox' has no vectorized client step" in caplog.text
    out = worker.train(np.zeros(worker.vector_size, np.float32) + 0.01, 0, [1, 2])
    assert np.isfinite(out.vectors).all() and out.vectors.shape == (2, worker.vector_size)
