"""Client updates/s and GPU memory on CUDA: the anchor MLP and LEAF's FEMNIST CNN (metafleet issue 17, GPU bullet).

    python -m benchmarks.gpu                                  # both workloads, every row
    python -m benchmarks.gpu --workloads mlp --rounds 6       # quicker
    python -m benchmarks.gpu --fractions 0.5 0.25             # the Ray rows to run

Rows per workload, steady client updates/s (clients per round / the median round from the second on):
- the plain PyTorch loop of ``benchmarks.throughput`` (``nn.Module`` + ``torch.optim.SGD`` per client, every
  client's data in device memory up front), on the GPU and on the CPU: what a researcher writes by hand;
- metafleet, vectorized, inline (in the driver's process), on the GPU and on the CPU;
- metafleet, vectorized, Ray with ``gpus_per_actor`` f for each ``--fractions`` f: round(1 / f) actors on one
  GPU, each capped at f of its memory (``simulator.contract.gpu_memory_share``), with every actor's cap and peak
  allocated and reserved GPU memory (``ClientActor.gpu_memory``);
- metafleet, vectorized, Ray with as many CPU actors as the largest GPU pool.

Workloads: ``mlp`` is the anchor (FedAvg on Synthetic(1,1), MLP 60-64-10, 5 local steps of batch 10, 100 of 1,000
clients a round); ``cnn`` is FedAvg with LEAF's FEMNIST CNN (6.6 M parameters) on ``gaussian`` data of FEMNIST's
shapes (784 features, 62 classes; the CNN's cost does not depend on the pixels), 50 samples per client, the same
local steps, 20 of 200 clients a round. On a CPU the CNN's clients train one after another (convolutions are not
vectorized there, README "Vectorized cohorts").

Every row runs in a fresh Python process (its own CUDA context, allocator peaks and Ray), the CPU rows with CUDA
hidden (``CUDA_VISIBLE_DEVICES=""``). On a machine without CUDA the GPU rows are skipped, each with its reason,
and the CPU rows still run. Prints one markdown table per workload and writes every row to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch

from actors.backends import make_backend
from benchmarks.throughput import ANCHOR, plain_loop
from simulator.experiment import load_config
from simulator.rounds.run import run

#: each workload's config keys (the MLP's are the anchor's)
WORKLOADS: dict[str, list[str]] = {
    "mlp": ANCHOR,
    "cnn": ['name="gpu-cnn"', 'data.name="gaussian"', "data.features=784", "data.num_classes=62",
            "data.num_clients=200", "data.pool_size=10000", "data.eval_clients=0", "eval.clients=0",
            'model.name="femnist_cnn"', 'algorithm.name="fedavg"', "algorithm.local_steps=5", "algorithm.batch_size=10",
            "algorithm.local_lr=0.05", "algorithm.server_lr=1.0", "clients.per_round=20", "metrics.flush_every=100"],
}
ROW = "--row"  # the child's flag: one row, as JSON on its last line of output


def metafleet(config: list[str], rounds: int, backend: str, actors: int, gpus: float) -> dict[str, Any]:
    """One vectorized run; with Ray, every actor's GPU memory (cap and peaks) read before the pool closes."""
    cfg = load_config(None, config + [
        f"rounds={rounds}", f'system.backend="{backend}"', f"system.actors={actors}", f"system.gpus_per_actor={gpus}",
        "system.vectorize=true", "checkpoint_every=0"])
    with make_backend(cfg) as pool, tempfile.TemporaryDirectory() as tmp:
        summary = run(cfg, pool, Path(tmp) / "run")
        memory = (ray.get([a.gpu_memory.remote() for a in pool.actors]) if backend == "ray"
                  else [pool.worker.gpu_memory()])
    devices = sorted({str(w["device"]) for w in summary["workers"]})
    return {"updates_per_s": float(summary["steady_updates_per_s"]), "devices": devices, "gpu_memory": memory}


def row(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one row in this process."""
    config, rounds = WORKLOADS[spec["workload"]], spec["rounds"]
    if spec["system"] == "plain":
        return {"updates_per_s": plain_loop(rounds, 0, config, spec["device"]), "devices": [spec["device"]],
                "gpu_memory": [{"peak_allocated": torch.cuda.max_memory_allocated() if spec["device"] != "cpu"
                                else None}]}
    return metafleet(config, rounds, spec["system"], spec["actors"], spec["gpus"])


def specs(workloads: list[str], fractions: list[float], rounds: int) -> list[dict[str, Any]]:
    out = []
    for w in workloads:
        base = {"workload": w, "rounds": rounds}
        for device in ("cuda", "cpu"):
            out.append({**base, "system": "plain", "device": device, "actors": 1, "gpus": 0.0})
            out.append({**base, "system": "inline", "device": device, "actors": 1, "gpus": 0.0})
        for f in fractions:
            out.append({**base, "system": "ray", "device": "cuda", "actors": round(1 / f), "gpus": f})
        out.append({**base, "system": "ray", "device": "cpu", "actors": max(round(1 / f) for f in fractions),
                    "gpus": 0.0})
    return out


def measure(spec: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """One row in a fresh process (CUDA hidden for a CPU row); a GPU row without CUDA is skipped."""
    if spec["device"] == "cuda" and not cuda:
        return {**spec, "skipped": "no CUDA device on this machine"}
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if spec["device"] == "cpu" else {})}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu", ROW, json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**spec, "skipped": f"failed: {last}"}
    return {**spec, **json.loads(done.stdout.strip().splitlines()[-1])}


def label(r: dict[str, Any]) -> str:
    where = "GPU" if r["device"] == "cuda" else "CPU"
    if r["system"] == "plain":
        return f"plain PyTorch loop, {where}"
    if r["system"] == "inline":
        return f"metafleet inline, {where}"
    actors = f"{r['actors']} actor{'s' if r['actors'] > 1 else ''}"
    return (f"metafleet Ray, {actors} x gpus_per_actor {r['gpus']:g}" if r["device"] == "cuda"
            else f"metafleet Ray, {actors} on CPUs")


def rate(value: float) -> str:
    """Updates/s to three significant figures or more: the CNN's CPU rows are single digits."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    """A workload's rows, with each against the plain loop on the same device."""
    plain = {r["device"]: r.get("updates_per_s") for r in rows if r["system"] == "plain"}
    lines = ["| system | updates/s | vs plain loop, same device | GPU memory per actor, MiB: cap / peak allocated / "
             "peak reserved |", "|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {label(r)} | skipped: {r['skipped']} | | |")
            continue
        base = plain.get(r["device"])
        ratio = f"{r['updates_per_s'] / base:.2f}x" if base else "-"
        memory = "; ".join(f"{mib(m.get('cap'))} / {mib(m.get('peak_allocated'))} / {mib(m.get('peak_reserved'))}"
                           for m in r["gpu_memory"]) if r["device"] == "cuda" else "-"
        lines.append(f"| {label(r)} | {rate(r['updates_per_s'])} | {ratio} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == ROW:
        print(json.dumps(row(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["mlp", "cnn"])
    parser.add_argument("--fractions", nargs="+", type=float, default=[1.0, 0.5, 0.25],
                        help="gpus_per_actor of the Ray GPU rows, each in (0, 1]")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/gpu.json")
    args = parser.parse_args()
    if not all(0 < f <= 1 for f in args.fractions):
        parser.error(f"--fractions must each be in (0, 1], got {args.fractions}")
    if args.rounds < 2:
        parser.error(f"--rounds must be >= 2 (the steady figure starts at the second round), got {args.rounds}")
    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'no CUDA device (GPU rows skipped)'}; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    results = []
    for spec in specs(args.workloads, args.fractions, args.rounds):
        results.append(measure(spec, cuda))
        print(f"  {spec['workload']}: {label(spec)}: "
              f"{results[-1].get('skipped') or rate(results[-1]['updates_per_s']) + ' updates/s'}",
              flush=True)
    for w in args.workloads:
        print(f"\n{w}, {args.rounds} rounds:\n{table([r for r in results if r['workload'] == w])}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
