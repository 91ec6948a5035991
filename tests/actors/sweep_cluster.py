"""Helper for ``test_sweep.test_a_sweep_spreads_over_the_nodes_of_a_cluster`` (not a test module): runs in its
own process, because Ray is initialized once per process and the test session already runs a local Ray.

    python tests/actors/sweep_cluster.py SWEEP_DIR

Builds a ``ray.cluster_utils.Cluster`` (a head node and one worker node, 1 CPU each), runs a 4-trial sweep of
1-CPU inline trials joined to it by address, and prints one JSON line: the trials' statuses and nodes and
the cluster's node ids.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from actors import sweep  # noqa: E402
from simulator.study import expand  # noqa: E402

STORE = 80 * 1024 * 1024
BASE = {"rounds": 600, "data": {"num_clients": 24, "eval_clients": 4}, "clients": {"per_round": 6},
        "eval": {"every": 300, "clients": 4, "adapt_steps": 2}, "algorithm": {"local_steps": 2},
        "system": {"backend": "inline"}}


def main(out: Path) -> dict[str, object]:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE,
                                                            "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, object_store_memory=STORE)
    cluster.wait_for_nodes()
    try:
        study = expand(BASE, {"grid": {"algorithm.name": ["reptile", "fomaml"]}, "seeds": [0, 1]})
        result = sweep.run_sweep(study, out, address=cluster.address, progress=False)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"trials": [(t["status"], t["node"]) for t in result.trials], "nodes": nodes,
            "worker": worker.node_id}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
