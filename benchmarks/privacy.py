"""Central DP on the sinusoid task: held-out post-adaptation loss against the noise multiplier and its epsilon.

Reptile on sinusoid (the quickstart's model and local steps), 10,000 training clients, 100 per round (sampling
rate q = 0.01), 100 rounds, clip C = 1.0, sigma in {0, 0.5, 1, 2}, seeds 0-2, in one process (inline backend,
identical devices: the simulated clock does not matter here). Epsilon is at delta = 1e-5 under replace-one
adjacency (README "Differential privacy"); sigma = 0 is clipping only (epsilon infinite).

    python -m benchmarks.privacy                       # about 5 minutes on 2 cores
    python -m benchmarks.privacy --rounds 50 --sigmas 0 1 --seeds 0

Prints a Markdown table (mean and range over seeds of the held-out loss after adaptation at round 0 and after
the last round) and writes benchmarks/results/privacy.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from actors.inline import InlineBackend
from simulator.contract import WorkerSpec
from simulator.experiment import load_config
from simulator.rounds.run import run

BASE = ["data.num_clients=10000", "clients.per_round=100", "eval.every=1000", 'system.backend="inline"',
        'devices.speed={dist="constant", median=100.0}', 'devices.bandwidth={dist="constant", median=20.0}',
        'privacy.mode="central"', "privacy.clip=1.0", "privacy.delta=1e-5", "checkpoint_every=0"]


def one(sigma: float, seed: int, rounds: int) -> dict[str, float]:
    cfg = load_config(None, BASE + [f"privacy.noise_multiplier={sigma}", f"seed={seed}", f"rounds={rounds}"])
    with tempfile.TemporaryDirectory() as tmp, InlineBackend(WorkerSpec.from_config(cfg), cfg.system) as backend:
        s = run(cfg, backend, Path(tmp) / "run")
    eps = s["dp_epsilon"]  # summary.json's strict JSON: "inf" for sigma = 0
    return {"sigma": sigma, "seed": seed, "epsilon": float(eps), "first": s["first_eval"]["eval_loss_post"],
            "final": s["final_eval"]["eval_loss_post"], "final_pre": s["final_eval"]["eval_loss_pre"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    rows = [one(sigma, seed, args.rounds) for sigma in args.sigmas for seed in args.seeds]
    print(f"| sigma | epsilon (delta 1e-5, {args.rounds} rounds) | post-adaptation loss after round 0 | "
          f"after round {args.rounds - 1} (mean, min-max over {len(args.seeds)} seeds) |")
    print("|---|---|---|---|")
    for sigma in args.sigmas:
        rs = [r for r in rows if r["sigma"] == sigma]
        first, final = np.array([r["first"] for r in rs]), np.array([r["final"] for r in rs])
        eps = rs[0]["epsilon"]
        print(f"| {sigma:g} | {'inf' if eps == float('inf') else f'{eps:.3g}'} | {first.mean():.3f} | "
              f"{final.mean():.3f} ({final.min():.3f}-{final.max():.3f}) |")
    out = Path(__file__).parent / "results" / "privacy.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
