"""Helper for ``test_faults.test_node_removal_mid_run`` (not a test module): runs in its own process
because Ray is initialized once per process and the test session already runs a local Ray.

    python tests/actors/cluster_run.py RUN_DIR '["rounds=6", ...]'
    python tests/actors/cluster_run.py --lost '["rounds=6", ...]'

Builds a ``ray.cluster_utils.Cluster`` on this machine (a head node and one worker node, 1 CPU
each, so the pool's two 1-CPU actors land one per node), runs ``simulator.rounds.run.run`` with the
Ray backend joined to it, removes the worker node after round 1, and prints one JSON line: the
summary's status, the actors' nodes before and the pool's description after the run. ``--lost``: a reduced
training call and a submitted (FedBuff) cohort with ``system.combine = "actors"``, the worker node removed after
they completed and before their partials or vectors are combined; prints what ``RayPool.release`` and
``RayPool.release_rows`` raised.
"""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from actors.backends import make_backend  # noqa: E402
from actors.calls import PartialLost  # noqa: E402
from simulator.algorithms.exactsum import Grid  # noqa: E402
from simulator.client.worker import ClientWorker  # noqa: E402
from simulator.contract import Reduction, Release, Selection, WorkerSpec  # noqa: E402
from simulator.experiment import load_config  # noqa: E402
from simulator.params import flat_params  # noqa: E402
from simulator.rounds.run import run  # noqa: E402

#: object store per node: small, the runs put a few KB per round
STORE = 80 * 1024 * 1024


def _cluster(overrides: list[str]) -> tuple[Cluster, object, object]:
    """The head and one worker node, 1 CPU each, and the config of a 2-actor pool joined to them."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                            "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, object_store_memory=STORE)
    cluster.wait_for_nodes()
    cfg = load_config(None, overrides + [f'system.address="{cluster.address}"', 'system.backend="ray"',
                                         "system.actors=2"])
    return cluster, worker, cfg


def lost(overrides: list[str]) -> dict[str, object]:
    """On one cluster: a reduced training call whose partials ``RayPool.release`` combines, and a submitted (FedBuff)
    cohort whose vectors stay in the object store for ``RayPool.release_rows``; the worker node is removed after
    both trained and before either is combined. Returns what each combine raised."""
    cluster, worker, cfg = _cluster(overrides + ['system.combine="actors"'])
    theta = flat_params(ClientWorker(WorkerSpec.from_config(cfg)).model).numpy()
    ids = np.arange(6)
    red = Reduction(ids, np.full(6, 1 / 6), Grid.for_bound())
    try:
        with make_backend(cfg) as pool:
            chunks = list(pool.train(theta, 0, ids, red))
            results = [pool.result(p) for p in pool.submit(theta, ids, ids, keep=True)]
            blocks = np.repeat(np.arange(len(results)), [len(r.client_ids) for r in results])
            rows = np.concatenate([np.arange(len(r.client_ids)) for r in results])
            combines = {
                "partial": partial(pool.release, [c.partial for c in chunks], Release(ids), theta.size),
                "rows": partial(pool.release_rows, [r.kept for r in results], Selection(blocks, rows, red, ids),
                                Release(np.arange(6)), theta.size)}
            cluster.remove_node(worker)  # what was trained there goes with its object store
            raised = {}
            for what, combine in combines.items():
                try:
                    combine()
                    raised[what] = ""
                except PartialLost as exc:
                    raised[what] = f"PartialLost: {exc}"
            return {"raised": raised, "actors_after": len(pool.describe())}
    finally:
        cluster.shutdown()


def main(run_dir: Path, overrides: list[str], remove_after: int = 1) -> dict[str, object]:
    cluster, worker, cfg = _cluster(overrides)
    removed: list[int] = []

    def on_round(row: dict[str, object]) -> None:
        if row["round"] == remove_after and not removed:
            cluster.remove_node(worker)
            removed.append(int(row["round"]))

    try:
        with make_backend(cfg) as pool:  # joined the cluster itself, so closing it also disconnects
            before = pool.describe()
            summary = run(cfg, pool, run_dir, on_round=on_round)
            after = pool.describe()
    finally:
        cluster.shutdown()
    return {"status": summary["status"], "removed_after": removed, "nodes_before": [d["node"] for d in before],
            "worker_node": worker.node_id, "after": after}


if __name__ == "__main__":
    if sys.argv[1] == "--lost":
        print(json.dumps(lost(json.loads(sys.argv[2]))))
    else:
        print(json.dumps(main(Path(sys.argv[1]), json.loads(sys.argv[2]))))
