"""Resources stay flat over a long run: 300 short rounds on the Ray pool (2 actors) must not grow the
driver's memory, the object references it owns, or the objects in Ray's object store."""

from __future__ import annotations

import gc
import re
import time
from pathlib import Path
from typing import Any

from conftest import small_overrides

from actors.backends import make_backend
from simulator.experiment import load_config
from simulator.rounds.run import run

ROUNDS = 300
WARMUP = 50
#: allowed growth of the driver's RSS between round WARMUP and the end: the metrics history, Parquet
#: buffers and allocator noise (measured: 10-25 MiB of fluctuation, no trend). The model is 265 KB
#: (hidden [256, 256]), so leaking one model or one round's updates per round would add 66-260 MiB.
RSS_SLACK_MB = 40.0
#: object references the driver may hold between rounds: round r+1 is already dispatched while round r's row is
#: written (the overlap of ``rounds.sync``), so its model and its reduction, plus round r's two, counted for a
#: moment after their last call returned, plus an evaluation's model, plus round r + 1's prefetch calls, one per
#: actor (``RayPool.prefetch``: kept until seen done); a bound, not a growth (the end holds 0)
MAX_REFS = 6 + 2


def rss_mb() -> float:
    """This process's resident set size in MiB (psutil, else /proc/self/status)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # psutil is optional
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def owned_refs() -> int:
    """Object references this driver process holds (the core worker's reference table)."""
    import ray

    return len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())


def settled_refs(target: int, timeout_s: float = 5.0) -> int:
    """``owned_refs()`` once it is down to ``target`` (or after ``timeout_s``): a model reference stays
    counted as "submitted" for a moment after its last call has returned."""
    deadline = time.monotonic() + timeout_s
    while (n := owned_refs()) > target and time.monotonic() < deadline:
        time.sleep(0.01)
    return n


def store_objects() -> int:
    """Objects in the driver's in-process memory store (small results; ``ray.put``'s models go to the
    shared object store and are counted among the owned references)."""
    import ray

    return int(ray._private.worker.global_worker.core_worker.get_memory_store_size())


def test_long_run_keeps_memory_and_references_flat(ray_session, tmp_path, capsys):
    overrides = small_overrides(**{
        "rounds": ROUNDS, "data.num_clients": 16, "clients.per_round": 4, "model.hidden": [256, 256],
        "algorithm.local_steps": 1, "eval.every": 100, "eval.clients": 2, "eval.adapt_steps": 1,
        "metrics.flush_every": 10, "system.backend": "ray", "system.actors": 2})
    cfg = load_config(None, overrides)
    refs: list[int] = []
    store: list[int] = []
    rss: dict[int, float] = {}

    def on_round(row: dict[str, Any]) -> None:
        r = int(row["round"])
        refs.append(owned_refs())
        store.append(store_objects())
        if r in (WARMUP, ROUNDS - 1):
            rss[r] = rss_mb()

    with make_backend(cfg) as pool:
        summary = run(cfg, pool, tmp_path / "long", on_round=on_round)
    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS
    with capsys.disabled():
        print(f"\n{ROUNDS} rounds in {summary['wall_time_s']:.1f} s: driver RSS {rss[WARMUP]:.1f} MiB at round "
              f"{WARMUP}, {rss[ROUNDS - 1]:.1f} MiB at the end; owned refs {refs[WARMUP]} -> {refs[-1]} (max "
              f"{max(refs)}), memory-store objects {store[WARMUP]} -> {store[-1]} (max {max(store)})")
    assert max(refs) <= MAX_REFS and max(store) <= MAX_REFS
    assert rss[ROUNDS - 1] - rss[WARMUP] < RSS_SLACK_MB


def test_fetched_chunks_release_their_references(ray_session):
    """Once every chunk of a dispatch is fetched (``map``, or ``submit`` then ``result``), neither the
    results nor the model stay referenced (a submitted model: until the next dispatch of another one). The model is
    one too large to travel inside the calls (``model_inline``), so that it is put in the object store."""
    import numpy as np

    from actors.calls import model_inline
    from simulator.client.worker import ClientWorker
    from simulator.contract import WorkerSpec
    from simulator.params import flat_params

    cfg = load_config(None, small_overrides(**{"system.actors": 2, "model.hidden": [256, 256]}))
    theta = flat_params(ClientWorker(WorkerSpec.from_config(cfg)).model).numpy()
    assert not model_inline(theta.nbytes, 1)
    with make_backend(cfg) as pool:
        gc.collect()  # generators and tracebacks of earlier tests may hold references in cycles
        before = owned_refs()
        for r in range(4):
            if r % 2:
                pending = pool.submit(theta, np.full(6, r), np.arange(6))
                assert owned_refs() > before  # the model and the two results
                chunks = [pool.result(p) for p in pending]
                assert all(p.ref is None and p.batch is None for p in pending)
                del pending
            else:
                chunks = list(pool.train(theta, r, np.arange(6)))
            assert sorted(np.concatenate([c.client_ids for c in chunks]).tolist()) == list(range(6))
            # a submitted model stays referenced (once) for the next submit of the same array, until another dispatch
            assert settled_refs(before + r % 2) == before + r % 2


def test_small_submitted_cohorts_share_one_model_put_and_go_to_the_idlest_actor(ray_session):
    """A cohort of fewer than ``MIN_SUBMIT_CALL`` clients per actor is one call, on the actor with the fewest clients
    outstanding; the same array submitted again travels as the same object reference, another array as its own; and
    the results are those of a cohort split as ``train`` splits it."""
    import numpy as np

    from actors.calls import model_inline
    from actors.pool import MIN_SUBMIT_CALL
    from simulator.client.worker import ClientWorker
    from simulator.contract import WorkerSpec
    from simulator.params import flat_params

    cfg = load_config(None, small_overrides(**{"system.actors": 2, "model.hidden": [256, 256]}))
    theta = flat_params(ClientWorker(WorkerSpec.from_config(cfg)).model).numpy()
    assert 6 < MIN_SUBMIT_CALL and not model_inline(theta.nbytes, 1)  # too large to travel inside the calls
    with make_backend(cfg) as pool:
        first, second = pool.submit(theta, 0, np.arange(6)), pool.submit(theta, 1, np.arange(6, 12))
        assert len(first) == len(second) == 1 and first[0].slot is not second[0].slot  # the other actor was idle
        assert first[0].batch.model_ref == second[0].batch.model_ref
        other = pool.submit(theta.copy(), 1, np.arange(3))
        assert other[0].batch.model_ref != first[0].batch.model_ref
        got = [pool.result(p) for p in first + second + other]
        split = {int(r.client_ids[0]): r for r in pool.train(theta, 1, np.arange(6, 12))}
    by_id = {int(c): r.vectors[i] for r in got[1:2] for i, c in enumerate(r.client_ids)}
    for r in split.values():
        for i, c in enumerate(r.client_ids):
            np.testing.assert_array_equal(by_id[int(c)], r.vectors[i])


def test_a_small_model_travels_inside_the_calls_with_the_same_results(ray_session, monkeypatch):
    """A model of at most ``MODEL_INLINE_BYTES`` (and ``MODEL_INLINE_TOTAL`` over a dispatch's calls) is each call's
    argument, not an object reference; a train, a reduced train, a submitted cohort and an evaluation give the same
    numbers, bit for bit, as with the model put in the object store."""
    import numpy as np

    import actors.calls as calls_module
    from actors.calls import MODEL_INLINE_BYTES, MODEL_INLINE_TOTAL, model_inline
    from simulator.algorithms.exactsum import DEFAULT_BOUND, Grid
    from simulator.client.worker import ClientWorker
    from simulator.contract import Reduction, WorkerSpec
    from simulator.params import flat_params

    assert model_inline(MODEL_INLINE_BYTES, MODEL_INLINE_TOTAL // MODEL_INLINE_BYTES)
    assert not model_inline(MODEL_INLINE_BYTES + 1, 1)
    assert not model_inline(MODEL_INLINE_BYTES, MODEL_INLINE_TOTAL // MODEL_INLINE_BYTES + 1)
    cfg = load_config(None, small_overrides(**{"system.actors": 2}))
    theta = flat_params(ClientWorker(WorkerSpec.from_config(cfg)).model).numpy()
    assert model_inline(theta.nbytes, 2)
    ids = np.arange(8)
    red = Reduction(ids, np.full(8, 1 / 8), Grid.for_bound(DEFAULT_BOUND, 1.0))

    def everything(pool):
        train = sorted(pool.train(theta, 3, ids), key=lambda r: int(r.client_ids[0]))
        reduced = sorted(pool.train(theta, 3, ids, red), key=lambda r: int(r.client_ids[0]))
        submitted = [pool.result(p) for p in pool.submit(theta, 4, ids[:5])]
        evals = sorted(pool.evaluate(theta, 2, ids[:4]), key=lambda r: int(r.client_ids[0]))
        return train, reduced, submitted, evals

    with make_backend(cfg) as pool:
        pending = pool.submit(theta, 4, ids[:5])
        assert pending[0].batch.model_ref is theta
        [pool.result(p) for p in pending]
        inline = everything(pool)
    monkeypatch.setattr(calls_module, "MODEL_INLINE_BYTES", 0)  # every model is put in the object store
    with make_backend(cfg) as pool:
        pending = pool.submit(theta, 4, ids[:5])
        assert pending[0].batch.model_ref is not theta
        [pool.result(p) for p in pending]
        stored = everything(pool)
    for a, b in zip(inline, stored, strict=True):
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            for name in ("client_ids", "vectors", "loss_before", "loss_after", "loss_pre", "loss_post"):
                if getattr(x, name, None) is not None:
                    np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
            if getattr(x, "partial", None) is not None:
                np.testing.assert_array_equal(x.partial.total, y.partial.total)
