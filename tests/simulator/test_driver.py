"""Driver bookkeeping: result reordering, steady throughput, Ctrl-C mid-round, and the process settings of a run
(glibc's allocator thresholds, Python's collector)."""

from __future__ import annotations

import functools
import gc
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pandas as pd
import pytest
from conftest import small_overrides

from actors.inline import InlineBackend
from simulator.algorithms.registry import resolve
from simulator.contract import EvalResult, WorkerSpec
from simulator.experiment import load_config
from simulator.rounds.context import ClientPlans, plan_clients, prepare
from simulator.rounds.rows import ordered
from simulator.rounds.run import run
from simulator.rundir.summary import steady_throughput, steady_updates_per_s


def _chunk(worker: int, ids: list[int]) -> EvalResult:
    a = np.array(ids, dtype=np.float64)
    return EvalResult(worker, np.array(ids), a * 10, a * 100, a, a)


def test_ordered_puts_results_back_in_cohort_order():
    cohort = np.array([2, 5, 7, 9])
    col, workers = ordered([_chunk(1, [9, 5]), _chunk(0, [7, 2])], cohort)
    assert col("loss_pre").tolist() == [20, 50, 70, 90]
    assert workers.tolist() == [0, 1, 0, 1]


def test_ordered_rejects_missing_or_extra_clients():
    with pytest.raises(RuntimeError, match="exactly one result per client"):
        ordered([_chunk(0, [2, 5])], np.array([2, 5, 7]))
    with pytest.raises(RuntimeError, match="exactly one result per client"):
        ordered([_chunk(0, [2, 5, 8])], np.array([2, 5, 7]))
    with pytest.raises(RuntimeError, match="exactly one result per client"):
        ordered([_chunk(0, [1, 2, 3])], np.array([1, 2, 9]))


def test_steady_updates_per_s_skips_the_first_round():
    # round durations 1.0, 0.5, 1.0, 0.5: from the second round on the median is 0.5 s for 10 clients
    history = [{"wall_time_s": t, "num_completed": 10} for t in (1.0, 1.5, 2.5, 3.0)]
    assert steady_updates_per_s(history) == pytest.approx(20.0)
    assert steady_updates_per_s(history[:1]) is None


def test_steady_throughput_is_the_shared_definition():
    # from the second round on: median clients 10, median duration 1.0 s; the slow first round is ignored
    assert steady_throughput([5, 10, 10, 20], [9.0, 1.0, 0.5, 2.0]) == pytest.approx(10.0)
    assert steady_throughput([100], [1.0]) is None


class InterruptAt(InlineBackend):
    """Raises KeyboardInterrupt (as Ctrl-C would) when round ``stop`` starts training."""

    stop = 2

    def train(self, theta, round_idx, client_ids, reduce=None):
        if round_idx == self.stop:
            raise KeyboardInterrupt
        yield from super().train(theta, round_idx, client_ids, reduce)


def test_ctrl_c_keeps_what_was_measured(tmp_path):
    cfg = load_config(None, small_overrides(**{"system.backend": "inline", "metrics.flush_every": 10}))
    with InterruptAt(WorkerSpec.from_config(cfg), cfg.system) as backend:
        summary = run(cfg, backend, tmp_path)
    assert summary["status"] == "interrupted"
    assert summary["rounds_completed"] == 2 and summary["client_updates"] == 2 * 6
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == "interrupted"
    assert pd.read_parquet(tmp_path / "rounds.parquet")["round"].tolist() == [0, 1]  # flushed on the way out
    assert len(pd.read_parquet(tmp_path / "clients.parquet")) == 12


#: run in a fresh interpreter: in a long-lived one a freed chunk of the heap may serve the block without any mapping
FREED_PROBE = """
from pathlib import Path
import numpy as np
from simulator.client.worker import MMAP_THRESHOLD, return_large_frees

def anon():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024

big = np.ones(24 * 2**20 // 8)  # freed: glibc's own threshold rises to 24 MiB
del big
fixed = {fixed}
if fixed:
    assert return_large_frees()
size = 2 * MMAP_THRESHOLD  # 16 MiB: below the risen threshold, above the fixed one
before = anon()
block = np.ones(size // 8)
held = anon()
del block
print(held - before >= 0.9 * size, held - anon() >= 0.9 * size)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ,
                    reason="glibc's mallopt, unless the user set the threshold")
def test_a_freed_model_sized_array_goes_back_to_the_os():
    """After ``return_large_frees`` a block of the threshold or more is unmapped when freed, however large the
    blocks freed before it; without it, glibc keeps it resident (its threshold rose to the earlier block's size)."""
    def probe(fixed: bool) -> str:
        out = subprocess.run([sys.executable, "-c", FREED_PROBE.format(fixed=fixed)], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        return out.stdout.split()

    assert probe(True) == ["True", "True"]
    assert probe(False) == ["True", "False"]  # the same block, held and then kept: what the call changes


class Cycle:
    """An object that refers to itself: only the cyclic collector can free it."""

    def __init__(self) -> None:
        self.me = self


def test_a_run_freezes_what_survives_its_first_full_collection_and_gives_it_back(tmp_path):
    """``frozen_heap``: garbage left before the run is still collected (by the rounds' first full collection, here
    the one round 0 asks for), what survives it is frozen (``gc.freeze``) for the rest of the rounds, cycles made
    later are collected, and the run unfreezes everything when it ends."""
    before = weakref.ref(Cycle())  # garbage from before the run, for the collector only
    gc.freeze()
    gc.unfreeze()  # now in the oldest generation: only a full collection frees it
    frozen, collected = [], []

    def on_round(row: dict) -> None:
        if row["round"] == 0:
            gc.collect()
            collected.append(before() is None)
        frozen.append(gc.get_freeze_count())
        made = weakref.ref(Cycle())
        gc.collect(1)  # a young collection: the frozen objects are not walked, the new cycle is freed
        collected.append(made() is None)

    cfg = load_config(None, small_overrides(**{"system.backend": "inline"}))
    with InlineBackend(WorkerSpec.from_config(cfg), cfg.system) as backend:
        assert run(cfg, backend, tmp_path / "run", on_round=on_round)["status"] == "completed"
    assert len(frozen) == cfg.rounds and min(frozen) > 0 and all(collected)
    assert gc.get_freeze_count() == 0 and not any(getattr(c, "__qualname__", "").startswith("frozen_heap")
                                                  for c in gc.callbacks)


@pytest.mark.parametrize("devices", [[], ['devices.speed={dist="lognormal", median=100.0, sigma=1.0}',
                                         'devices.bandwidth={dist="pareto", median=20.0, shape=1.5}']])
def test_a_clients_plan_is_remembered_with_the_same_numbers(devices, monkeypatch):
    """``ClientPlans`` plans each client once and answers every request from its table: the same profiles, sizes and
    durations, bit for bit, as ``plan_clients`` planning the whole batch at once, in the order asked, repeats and
    the empty request included; only new clients are planned, and past ``PLAN_CACHE`` the table starts over (a
    request with more new clients than that is planned alone)."""
    cfg = load_config(None, small_overrides(**{"data.name": "synthetic", "data.samples_per_client": 0}) + devices)
    prep = prepare(cfg)
    algo = resolve(cfg.algorithm)
    plan = functools.partial(plan_clients, cfg, algo, prep.dataset, prep.devices, model_bytes=4000, update_bytes=900)
    asked: list[list[int]] = []

    def counted(ids: np.ndarray):
        asked.append(ids.tolist())
        return plan(ids)

    monkeypatch.setattr("simulator.rounds.context.PLAN_CACHE", 12)
    plans = ClientPlans(counted)
    requests = ([3], [7, 3], [3, 3, 11], [], [5, 1, 2, 9, 0, 4, 8, 6, 10], [2], [12, 13, 3], list(range(20)), [4, 0])
    for ids in requests:
        got, want = plans(np.array(ids, np.int64)), plan(np.array(ids, np.int64))
        np.testing.assert_array_equal(got[0].client_ids, ids)
        for a, b in zip([got[0].compute_speed, got[0].up_bw, got[0].down_bw, *got[1:]],
                        [want[0].compute_speed, want[0].up_bw, want[0].down_bw, *want[1:]], strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
    # 1 + 1 + 1 + 9 = 12 remembered; [2] is known; [12, 13] would pass 12: the table starts over with
    # them and 3; 20 new clients are more than the table holds: planned alone; then 4 and 0 anew
    assert asked == [[3], [7], [11], [5, 1, 2, 9, 0, 4, 8, 6, 10], [12, 13, 3], list(range(20)), [4, 0]]
