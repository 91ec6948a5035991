"""Throughput on the anchor workload: metafleet against a plain single-process PyTorch loop.

Workload (shared/anchors.md): FedAvg on FedProx's Synthetic(1,1), 60 features, 10 classes,
50 samples per client, MLP 60-64-10 (ReLU), 5 local SGD steps of batch 10 at lr 0.05, 1,000
registered clients, 100 per round, 20 rounds. "Steady" = clients per round divided by the
median round time from the second round on.

    python -m benchmarks.throughput            # plain loop; metafleet sequential and vectorized, inline and ray
    python -m benchmarks.throughput --rounds 5 # quicker

Prints one markdown table (the one in benchmarks/README.md) and writes it, with the raw
numbers, to benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from simulator.data.registry import make_dataset
from simulator.experiment import load_config
from simulator.models import build_model
from simulator.rounds.run import run
from simulator.rundir.summary import steady_throughput
from simulator.scheduling import sample_cohort

ANCHOR = [
    "name=\"throughput\"", "data.name=\"synthetic\"", "data.alpha=1.0", "data.beta=1.0",
    "data.samples_per_client=50", "data.num_clients=1000", "data.eval_clients=0", "eval.clients=0",
    "model.hidden=[64]", "algorithm.name=\"fedavg\"", "algorithm.local_steps=5", "algorithm.batch_size=10",
    "algorithm.local_lr=0.05", "algorithm.server_lr=1.0", "clients.per_round=100", "metrics.flush_every=100",
]


def plain_loop(rounds: int, seed: int = 0, config: Sequence[str] = ANCHOR, device: str = "cpu") -> float:
    """What a researcher writes by hand: one process, one thread, nn.Module + torch.optim per client, every client's
    data on ``device`` up front; ``config``: the workload's keys (the anchor's, or another model and data, as
    ``benchmarks.gpu`` runs it). On a GPU each round ends with a synchronize, so its time is the GPU's work."""
    torch.set_num_threads(1)
    cfg = load_config(None, [*config, f"rounds={rounds}", f"seed={seed}"])
    data = make_dataset(cfg.data, seed)
    shards = {c: data.shard(c).to(torch.device(device)) for c in range(cfg.data.num_clients)}
    model = build_model(cfg.model, data.input_dim, data.output_dim, seed).to(device)
    gen = torch.Generator().manual_seed(seed)
    times = []
    for r in range(rounds):
        start = time.perf_counter()
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        total, acc = 0, {k: torch.zeros_like(v) for k, v in global_state.items()}
        for c in sample_cohort(seed, r, cfg.data.num_clients, cfg.clients.per_round):
            shard = shards[int(c)]
            x = torch.cat([shard.support.x, shard.query.x])
            y = torch.cat([shard.support.y, shard.query.y])
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.algorithm.local_lr)
            for _ in range(cfg.algorithm.local_steps):
                idx = torch.randperm(len(x), generator=gen)[:cfg.algorithm.batch_size]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            for k, v in model.state_dict().items():
                acc[k] += len(x) * v
            total += len(x)
        model.load_state_dict({k: v / total for k, v in acc.items()})
        if device != "cpu":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return steady_throughput([cfg.clients.per_round] * len(times), times)


def metafleet(rounds: int, backend: str, actors: int, vectorize: bool, seed: int = 0) -> float:
    from actors.backends import make_backend

    cfg = load_config(None, ANCHOR + [f"rounds={rounds}", f"seed={seed}", f"system.backend=\"{backend}\"",
                                      f"system.actors={actors}", f"system.vectorize={str(vectorize).lower()}"])
    with make_backend(cfg) as pool:
        with tempfile.TemporaryDirectory() as tmp:
            summary = run(cfg, pool, Path(tmp) / "run")
    return float(summary["steady_updates_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system; the median is reported")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    systems = {
        "plain PyTorch loop (1 process, 1 thread)": lambda: plain_loop(args.rounds),
        "metafleet sequential, inline (1 process, 1 thread)": lambda: metafleet(args.rounds, "inline", 1, False),
        "metafleet sequential, ray, 2 actors": lambda: metafleet(args.rounds, "ray", 2, False),
        "metafleet vectorized, inline (1 process, 1 thread)": lambda: metafleet(args.rounds, "inline", 1, True),
        "metafleet vectorized, ray, 2 actors": lambda: metafleet(args.rounds, "ray", 2, True),
    }
    results: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(args.repeats):  # repeats outside: a shared machine's drifting load spreads over every system
        for name, fn in systems.items():
            results[name].append(fn())
    base = float(np.median(next(iter(results.values()))))
    lines = [f"| system | steady client updates/s (median of {args.repeats}; range) | vs plain loop |", "|---|---|---|"]
    for name, values in results.items():
        med = float(np.median(values))
        lines.append(f"| {name} | {med:,.0f} ({min(values):,.0f}-{max(values):,.0f}) | {med / base:.2f}x |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rounds": args.rounds, "repeats": args.repeats, "machine": platform.machine(),
                               "cpus": os.cpu_count(), "torch": torch.__version__,
                               "results": results, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
