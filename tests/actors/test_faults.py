"""Fault tolerance of the Ray pool: actors killed mid-run (SIGKILL, ``ray.kill``, a death inside a
call) and a node removed mid-run cost nothing but time; too many lost calls stop the run with
``WorkerFailure`` naming the fix. Metrics are compared with a fault-free inline run, every column
but the wall-clock ones (``WALL_CLOCK_COLUMNS``: wall_time_s, compute_time_s, actor_id)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import small_overrides

from actors.actor import FAULT_ENV
from actors.backends import make_backend
from actors.calls import KeptPartial
from simulator.algorithms.exactsum import Grid
from simulator.client.worker import ClientWorker
from simulator.config.schema import ConfigError
from simulator.contract import Reduction, Release, WorkerFailure, WorkerSpec
from simulator.experiment import load_config
from simulator.params import flat_params
from simulator.rounds.run import run
from simulator.rundir.metrics import WALL_CLOCK_COLUMNS

HERE = Path(__file__).resolve().parent
SYNC = small_overrides(rounds=4)
FEDBUFF = ["system.mode=\"async\"", "async.buffer_size=3", "system.max_concurrency=8", "algorithm.name=\"fomaml\"",
           "algorithm.server_lr=0.1", 'devices.speed={dist="pareto", median=100.0, shape=1.0}']


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name, wall in WALL_CLOCK_COLUMNS.items():
        df = pd.read_parquet(run_dir / f"{name}.parquet").drop(columns=list(wall))
        out[name] = df.sort_values(["round", "client_id"] if name != "rounds" else ["round"], ignore_index=True)
    return out


def _inline(tmp_path: Path, overrides: list[str]) -> dict[str, pd.DataFrame]:
    cfg = load_config(None, overrides + ["system.backend=\"inline\""])
    with make_backend(cfg) as backend:
        assert run(cfg, backend, tmp_path / "inline")["status"] == "completed"
    return _tables(tmp_path / "inline")


def _assert_same(expected: dict[str, pd.DataFrame], run_dir: Path) -> None:
    got = _tables(run_dir)
    for name in expected:
        pd.testing.assert_frame_equal(expected[name], got[name], check_exact=True)


@pytest.fixture(scope="module")
def sync_expected(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """The fault-free inline run of ``SYNC`` (shared by the actor-kill and the node-removal tests)."""
    return _inline(tmp_path_factory.mktemp("sync"), SYNC)


def _faulty_run(tmp_path: Path, overrides: list[str], kills: dict[int, str]) -> list[dict[str, object]]:
    """A Ray run with 2 actors; after round r, ``kills[r]`` kills an actor: "sigkill" (actor 0's pid, from
    a thread, so it lands while the next round runs), "sigstop" (actor 0 stopped for good: only the
    watchdog can end its call) or "ray.kill" (the last actor). Returns the pool's description at the end."""
    cfg = load_config(None, overrides + ["system.backend=\"ray\"", "system.actors=2"])
    threads: list[threading.Thread] = []

    def on_round(row: dict[str, object]) -> None:
        how = kills.get(int(row["round"]))
        if how in ("sigkill", "sigstop"):
            pid = int(pool.describe()[0]["pid"])
            sig = signal.SIGKILL if how == "sigkill" else signal.SIGSTOP
            threads.append(threading.Thread(target=os.kill, args=(pid, sig)))
            threads[-1].start()
        elif how == "ray.kill":
            import ray

            ray.kill(pool.actors[-1], no_restart=False)

    with make_backend(cfg) as pool:
        assert run(cfg, pool, tmp_path / "ray", on_round=on_round)["status"] == "completed"
        for t in threads:
            t.join()
        return pool.describe()


def test_sync_run_survives_actor_kills(ray_session, sync_expected, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(FAULT_ENV, "die_once_on_call:3:1")  # actor 1 dies inside its 3rd call (round 1's train)
    with caplog.at_level(logging.WARNING, logger="metafleet.pool"):
        info = _faulty_run(tmp_path, SYNC, {1: "sigkill"})
    _assert_same(sync_expected, tmp_path / "ray")
    assert [d["worker_id"] for d in info] == [0, 1]
    assert [d["restarts"] for d in info] == [1, 1]  # every death was replaced
    assert "replaced by pid" in caplog.text and "ActorDiedError" in caplog.text


@pytest.mark.parametrize(("mode", "what"), [("sync", "a round's partials"), ("fedbuff", "a buffer's rows")])
def test_a_combining_actor_that_dies_is_replaced_and_the_run_unchanged(ray_session, sync_expected, tmp_path,
                                                                      monkeypatch, caplog, mode, what):
    # system.combine = "actors": every actor dies at the start of its second combine (replacements are spared);
    # the combine runs again on the replacement, from the partials (FedBuff: the buffer's vectors) still in the
    # object store, and the run is the fault-free inline one
    base = SYNC if mode == "sync" else small_overrides(rounds=5) + FEDBUFF
    expected = sync_expected if mode == "sync" else _inline(tmp_path, base)
    monkeypatch.setenv(FAULT_ENV, "die_once_on_release:2")
    with caplog.at_level(logging.WARNING, logger="metafleet.pool"):
        info = _faulty_run(tmp_path, base + ['system.combine="actors"'], {})
    _assert_same(expected, tmp_path / "ray")
    assert sum(d["restarts"] for d in info) >= 1
    assert f"re-running the combining of {what}" in caplog.text


def test_combining_that_keeps_failing_stops_the_run_naming_the_fix(ray_session, monkeypatch):
    overrides = small_overrides(**{"system.actors": 1, "system.max_failures": 1, "system.combine": "actors"})
    monkeypatch.setenv(FAULT_ENV, "die_on_release:1")  # every actor, replacements too, dies when it combines
    theta = _theta(overrides)
    red = Reduction(np.arange(6), np.full(6, 1 / 6), Grid.for_bound())
    with make_backend(load_config(None, overrides)) as pool:
        chunks = list(pool.train(theta, 0, np.arange(6), red))
        assert all(isinstance(c.partial, KeptPartial) for c in chunks)
        with pytest.raises(WorkerFailure) as err:
            pool.release([c.partial for c in chunks], Release(np.arange(6)), theta.size)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("lost the combining of a round's partials 2 times", "system.max_failures = 1",
                 "metafleet run --resume RUN_DIR"):
        assert part in msg, part


def test_async_fedbuff_run_survives_actor_kills(ray_session, tmp_path):
    base = small_overrides(rounds=5) + FEDBUFF
    expected = _inline(tmp_path, base)
    info = _faulty_run(tmp_path, base, {1: "ray.kill"})
    _assert_same(expected, tmp_path / "ray")
    assert [d["restarts"] for d in info] == [0, 1]


def _theta(overrides: list[str]) -> np.ndarray:
    cfg = load_config(None, overrides)
    return flat_params(ClientWorker(WorkerSpec.from_config(cfg)).model).numpy()


def test_failures_beyond_max_failures_raise_worker_failure(ray_session, monkeypatch):
    overrides = small_overrides(**{"system.actors": 1, "system.max_failures": 1})
    monkeypatch.setenv(FAULT_ENV, "die_on_call:1")  # every actor, replacements too, dies in its first call
    with make_backend(load_config(None, overrides)) as pool:
        with pytest.raises(WorkerFailure) as err:
            list(pool.train(_theta(overrides), 0, np.arange(6)))
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("actor ", "2 calls were lost", "system.max_failures = 1", "ActorDiedError",
                 "raise system.max_failures", "metafleet run --resume RUN_DIR"):
        assert part in msg, part


def test_submit_result_with_no_failures_tolerated(ray_session, monkeypatch):
    overrides = small_overrides(**{"system.actors": 1, "system.max_failures": 0, "system.clients_per_actor": 3})
    monkeypatch.setenv(FAULT_ENV, "die_on_call:2")  # the second chunk's call
    with make_backend(load_config(None, overrides)) as pool:
        pending = pool.submit(_theta(overrides), np.arange(6) % 2, np.arange(6))
        assert len(pending) == 2
        with pytest.raises(WorkerFailure, match="system.max_failures = 0"):
            for p in pending:
                pool.result(p)


@pytest.mark.parametrize("mode", ["sync", "fedbuff-kept"])
def test_node_removal_mid_run(sync_expected, tmp_path, mode):
    """A 2-node cluster on this machine (in a subprocess: the session's Ray is already up); the node of
    one actor is removed after round 1, the run finishes on the other with identical metrics. "fedbuff-kept":
    FedBuff with its clients' vectors in the nodes' object stores (``system.combine``, a model above Ray's 100 KB
    inlining limit): the lost calls run again, and so do the buffered clients whose vectors went with the node."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(FAULT_ENV, None)
    overrides = SYNC
    if mode == "fedbuff-kept":
        overrides = small_overrides(rounds=5) + FEDBUFF + ["model.hidden=[200, 200]"]
        sync_expected = _inline(tmp_path, overrides)
        overrides = overrides + ['system.combine="actors"']
    proc = subprocess.run([sys.executable, str(HERE / "cluster_run.py"), str(tmp_path / "ray"), json.dumps(overrides)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == "completed" and out["removed_after"] == [1]
    assert out["worker_node"] in out["nodes_before"] and len(set(out["nodes_before"])) == 2  # one actor per node
    assert [d["node"] for d in out["after"]] == [n for n in out["nodes_before"] if n != out["worker_node"]]
    assert "not replaced, continuing with 1 actor(s)" in proc.stderr
    _assert_same(sync_expected, tmp_path / "ray")


def test_what_a_combine_needs_lost_with_its_node_is_trained_again():
    """``system.combine = "actors"``: the node holding one chunk's partial, and one submitted (FedBuff) chunk's
    vectors, is removed after the chunks completed; neither combine can read them, and the pool says so with
    ``PartialLost`` (a retried failure: the round, or the buffer's clients, train again). The model is large enough
    (> 100 KB) for Ray to keep the objects in the nodes' object stores."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop(FAULT_ENV, None)
    # 3 clients a call: the 6 submitted clients go out as two calls, one on each node's actor
    overrides = small_overrides(rounds=1) + ["model.hidden=[200, 200]", "system.clients_per_actor=3"]
    proc = subprocess.run([sys.executable, str(HERE / "cluster_run.py"), "--lost", json.dumps(overrides)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raised = json.loads(proc.stdout.strip().splitlines()[-1])["raised"]
    for what, lost, again in (
            ("partial", "a partial sum was lost before it was combined", "the round's training runs again"),
            ("rows", "a buffered client's update was lost before the buffer was summed",
             "the buffer's clients train again")):
        assert raised[what].startswith(f"PartialLost: {lost} (Object"), raised[what]
        assert "\x1b" not in raised[what] and raised[what].endswith(again)


def test_a_worker_that_cannot_start_is_one_config_error(ray_session):
    cfg = load_config(None, small_overrides(**{"model.factory": "tests.actors.actor_only_factory:model",
                                               "system.actors": 1}))
    with pytest.raises(ConfigError) as err:
        make_backend(cfg)
    msg = str(err.value)
    assert msg.startswith("the client actors could not start: ConfigError: model.factory = ") and "\n" not in msg
    assert "raised RuntimeError: only in the actor: no such device (simulated)" in msg and "\x1b" not in msg


def test_client_code_raising_in_an_actor_fails_the_run_with_its_own_one_line_error(ray_session, tmp_path):
    cfg = load_config(None, small_overrides(**{"algorithm.factory": "tests.actors.actor_only_factory:failing_algorithm",
                                               "system.actors": 1, "system.max_failures": 1}))
    with make_backend(cfg) as pool:
        summary = run(cfg, pool, tmp_path / "run")
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
    assert "failed 2 times, last with MemoryError: CUDA out of memory (simulated);" in summary["error"]
    assert "\x1b" not in summary["error"] and "\n" not in summary["error"] and "ray::" not in summary["error"]
    log = (tmp_path / "run" / "errors.log").read_text()  # Ray's remote traceback goes here, colour codes removed
    assert "ray::ClientActor.train()" in log and "CUDA out of memory" in log and "\x1b" not in log


@pytest.mark.parametrize("mode", ["sync", "fedbuff"])
def test_a_stopped_actor_is_caught_by_the_watchdog_and_the_run_is_unchanged(ray_session, tmp_path, caplog, mode):
    base = small_overrides(rounds=4 if mode == "sync" else 5) + ([] if mode == "sync" else FEDBUFF)
    expected = _inline(tmp_path, base)
    with caplog.at_level(logging.WARNING, logger="metafleet.pool"):
        info = _faulty_run(tmp_path, base + ["system.call_timeout_s=6.0"], {1: "sigstop"})
    _assert_same(expected, tmp_path / "ray")
    assert [d["restarts"] for d in info] == [1, 0]  # the stopped actor was killed and replaced
    assert caplog.text.count("ran past its 6 s deadline (system.call_timeout_s); killing it") == 1
    assert caplog.text.count("of the 6 s it is allowed (system.call_timeout_s); at the deadline it is killed") == 1
