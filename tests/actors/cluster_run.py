"""Helper for ``test_faults.test_node_removal_mid_run`` (not a test module): runs in its own process
because Ray is initialized once per process and the test session already runs a local Ray.

    python tests/actors/cluster_run.py RUN_DIR '["rounds=6", ...]'

Builds a ``ray.cluster_utils.Cluster`` on this machine (a head node and one worker node, 1 CPU
each, so the pool's two 1-CPU actors land one per node), runs ``simulator.rounds.run.run`` with the
Ray backend joined to it, removes the worker node after round 1, and prints one JSON line: the
summary's status, the actors' nodes before and the pool's description after the run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from ray.cluster_utils import Cluster  # noqa: E402

from actors.backends import make_backend  # noqa: E402
from simulator.experiment import load_config  # noqa: E402
from simulator.rounds.run import run  # noqa: E402

#: object store per node: small, the runs put a few KB per round
STORE = 80 * 1024 * 1024


def main(run_dir: Path, overrides: list[str], remove_after: int = 1) -> dict[str, object]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                            "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, object_store_memory=STORE)
    cluster.wait_for_nodes()
    cfg = load_config(None, overrides + [f'system.address="{cluster.address}"', 'system.backend="ray"',
                                         "system.actors=2"])
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
    print(json.dumps(main(Path(sys.argv[1]), json.loads(sys.argv[2]))))
