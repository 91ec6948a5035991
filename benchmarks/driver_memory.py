"""Peak driver memory per round with LEAF's FEMNIST CNN (6.6 M parameters, 26 MB a float32 update).

Before metafleet issue 17 every client's full update travelled to the driver, so a round of k clients held
k x 26 MB there; with the updates reduced in the actors (``simulator.client.reduce``) the driver receives one
int64 partial (2 x the model's size) per actor call, or (``system.combine``, the CNN's default) one float32 mean
a round that an actor made of the partials. This runs FedAvg rounds of the CNN on Ray actors and reports
the driver process's peak RSS (``VmHWM``), its RSS just before the first round and the difference, against the
issue's target of 2 x model size x actors; and, sampled in a thread, the peaks of its two parts: private memory
(``RssAnon``, over its value before the first round) and the object store's shared pages mapped into the driver
(``RssShmem``: every partial and model the driver reads or puts is mapped, zero-copy, from the store).

Workload: ``gaussian`` data with 784 features and 62 classes (FEMNIST's shapes; the CNN's cost does not depend
on the pixels), 10 samples per client, 1 local step of batch 10, no evaluation; one fresh Python process per
setting, so each VmHWM is its own.

    python -m benchmarks.driver_memory --clients 100 1000 --rounds 2 --actors 2 --combine auto driver
    python -m benchmarks.driver_memory --mode fedbuff --clients 100 --rounds 2 --combine auto driver

``--combine``: where the partials become the round's mean (``system.combine``): "auto" combines the CNN's in an
actor, so the driver reads one float32 mean a round; "driver" brings every call's int64 partial to the driver.
``--mode fedbuff``: the asynchronous FedBuff server, whose buffer is summed from vectors kept in the object store
("auto": the CNN's) or brought to the driver ("driver").
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Peaks:
    """The highest private (``RssAnon``) and object-store (``RssShmem``: Ray's shared-memory pages this process has
    mapped, which the store owns and every process on the node shares) resident sizes seen, sampled every 2 ms
    in a thread: ``VmHWM`` counts both together and keeps no split."""

    FIELDS = ("RssAnon", "RssShmem")

    def __init__(self) -> None:
        self.peak = {f: 0 for f in self.FIELDS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            for f in self.FIELDS:
                self.peak[f] = max(self.peak[f], _rss_kib(f))

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one(clients: int, rounds: int, actors: int, combine: str = "auto", mode: str = "sync") -> dict[str, float]:
    """Run in this process: ``rounds`` rounds of ``clients`` clients on ``actors`` Ray actors, the partials combined
    where ``combine`` says (``system.combine``). ``mode`` "fedbuff": asynchronous FedBuff with ``clients`` training
    at once and a buffer of as many (on equal devices, the sync rounds' clients), ``rounds`` server updates."""
    import ray

    from actors.backends import make_backend
    from simulator.experiment import load_config
    from simulator.rounds.context import prepare
    from simulator.rounds.run import run

    cfg = load_config(None, [
        'name="driver-memory"', 'data.name="gaussian"', "data.features=784", "data.num_classes=62",
        f"data.num_clients={clients}", f"data.pool_size={clients * 10}", "data.eval_clients=0", "eval.clients=0",
        'model.name="femnist_cnn"', 'algorithm.name="fedavg"', "algorithm.local_steps=1", "algorithm.batch_size=10",
        f"clients.per_round={clients}", f"rounds={rounds}", 'system.backend="ray"', f"system.actors={actors}",
        f'system.combine="{combine}"', "checkpoint_every=0", "metrics.flush_every=100",
        *(['system.mode="async"', f"system.max_concurrency={clients}", f"async.buffer_size={clients}"]
          if mode == "fedbuff" else [])])
    ray.init(address="local", num_cpus=actors, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        with make_backend(cfg) as pool, tempfile.TemporaryDirectory() as tmp:
            prepared = prepare(cfg)  # the model and its initial vector: built before, so not counted
            before, anon_before = _rss_kib("VmRSS"), _rss_kib("RssAnon")
            start = time.perf_counter()
            with Peaks() as peaks:
                summary = run(cfg, pool, Path(tmp) / "run", prepared)
            wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    peak = _rss_kib("VmHWM")
    return {"clients": clients, "rounds": rounds, "actors": actors, "combine": combine, "mode": mode,
            "status": summary["status"],
            "error": summary.get("error", ""),
            "rss_before_mb": before / 1024, "peak_rss_mb": peak / 1024, "peak_minus_before_mb": (peak - before) / 1024,
            "anon_peak_minus_before_mb": (peaks.peak["RssAnon"] - anon_before) / 1024,
            "shmem_peak_mb": peaks.peak["RssShmem"] / 1024, "model_mb": 6_603_710 * 4 / 2**20, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--combine", nargs="+", default=["auto"], choices=["auto", "driver", "actors"],
                        help="where the partials become the mean (system.combine); the CNN's is 'actors' under auto")
    parser.add_argument("--mode", nargs="+", default=["sync"], choices=["sync", "fedbuff"],
                        help="sync rounds, or FedBuff with a buffer of --clients updates and as many in flight")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/driver_memory.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.clients[0], args.rounds, args.actors, args.combine[0], args.mode[0])))
        return
    rows = []
    settings = [(m, k, c) for m in args.mode for k in args.clients for c in args.combine]
    for mode, k, where in settings:  # a fresh process each: VmHWM is its peak
        out = subprocess.run([sys.executable, "-m", "benchmarks.driver_memory", "--one", "--clients", str(k),
                              "--rounds", str(args.rounds), "--actors", str(args.actors), "--combine", where,
                              "--mode", mode], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{mode}, {k} clients/round, combine={where}: driver peak RSS {r['peak_rss_mb']:,.0f} MB "
              f"({r['rss_before_mb']:,.0f} MB before "
              f"the first round, +{r['peak_minus_before_mb']:,.0f} MB; target 2 x {r['model_mb']:.1f} MB x "
              f"{args.actors} = {2 * r['model_mb'] * args.actors:.0f} MB), {r['wall_s']:.0f} s; of it at most "
              f"+{r['anon_peak_minus_before_mb']:,.0f} MB private and {r['shmem_peak_mb']:,.0f} MB of object-store "
              "pages mapped in", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
