"""How a FedBuff run reaches its backend: submitted cohorts, their sizes, model puts, and the rate.

The asynchronous server submits the clients dispatched on one model version as cohorts (``AsyncServer._submit``):
the refills gathered until one of those clients is needed by the next completion, or until the model is about to
change. On Ray each cohort costs calls, and each call costs the driver, the actor and the raylet a fixed amount of
CPU (``benchmarks/README.md``, "Third pass"), so their number and size say much of why a Ray FedBuff run is fast or
slow. This runs the anchor FedBuff workload of ``benchmarks.scale`` (``overrides(system, per_round, rounds,
population, mode="fedbuff")``: ``per_round`` clients in flight and a buffer of as many) once, after a 3-update
warm-up on the same backend, and prints the steady updates/s, the cohorts submitted (count, and sizes at the
quartiles), how many of them were sent because a completion needed one of their clients, the clients per backend
call, and the ``ray.put`` calls the driver made (0 on the in-process backend). Used for the seventh pass of
issue 17:

    python -m benchmarks.fedbuff_calls --system ray-2 --rounds 20
    python -m benchmarks.fedbuff_calls --system inline --rounds 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import ray

from actors.backends import make_backend
from benchmarks.scale import SYSTEMS, overrides
from simulator.config.schema import ConfigError
from simulator.experiment import load_config
from simulator.rounds import asynchronous
from simulator.rounds.run import run


def counted_run(system: str, per_round: int, rounds: int, population: int) -> dict[str, Any]:
    """One measured FedBuff run (after a warm-up on the same backend), with its submissions counted."""
    cfgs = [load_config(None, list(overrides(system, per_round, r, population=population, mode="fedbuff")))
            for r in (3, rounds)]
    cohorts: list[int] = []
    needed = [0]
    calls = [0]
    puts = [0]
    submit, fetch, put = asynchronous.AsyncServer._submit, asynchronous.AsyncServer.fetch, ray.put

    def counting_submit(self: Any, flights: list[Any], theta: Any) -> None:
        cohorts.append(len(flights))
        submit(self, flights, theta)
        calls[0] += len({id(f.pending) for f in flights})

    def counting_fetch(self: Any, f: Any) -> dict[str, Any]:
        if f.pending is None:  # held: this completion makes the server send its cohort now
            needed[0] += 1
        return fetch(self, f)

    def counting_put(*args: Any, **kwargs: Any) -> Any:
        puts[0] += 1
        return put(*args, **kwargs)

    with make_backend(cfgs[-1]) as backend, tempfile.TemporaryDirectory() as tmp:
        run(cfgs[0], backend, Path(tmp) / "warm-up")
        asynchronous.AsyncServer._submit, asynchronous.AsyncServer.fetch = counting_submit, counting_fetch
        ray.put = counting_put
        try:
            summary = run(cfgs[1], backend, Path(tmp) / "run")
        finally:
            asynchronous.AsyncServer._submit, asynchronous.AsyncServer.fetch = submit, fetch
            ray.put = put
    return {"steady": summary["steady_updates_per_s"], "cohorts": cohorts, "needed": needed[0], "calls": calls[0],
            "puts": puts[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=list(SYSTEMS), default="ray-2")
    parser.add_argument("--rounds", type=int, default=20, help="server updates measured")
    parser.add_argument("--per-round", type=int, default=100, help="clients in flight (and in the buffer)")
    parser.add_argument("--population", type=int, default=10_000, help="registered clients")
    args = parser.parse_args()
    if args.rounds < 1 or args.per_round < 1 or args.population < args.per_round:
        parser.error(f"need --rounds >= 1, --per-round >= 1 and --population >= --per-round, got {args.rounds}, "
                     f"{args.per_round} and {args.population}")
    try:
        out = counted_run(args.system, args.per_round, args.rounds, args.population)
    except ConfigError as exc:
        print(f"fedbuff_calls: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    sizes = np.array(out["cohorts"])
    quartiles = " / ".join(f"{q:g}" for q in np.percentile(sizes, [0, 25, 50, 75, 100])) if sizes.size else "-"
    print(f"{args.system}, {args.rounds} server updates: steady {out['steady']:,.0f} updates/s; {sizes.size} cohorts "
          f"of {int(sizes.sum())} clients (sizes min / 25% / median / 75% / max {quartiles}), {out['needed']} sent "
          f"because a completion needed them; {out['calls']} backend calls ({sizes.sum() / max(1, out['calls']):.1f} "
          f"clients a call); {out['puts']} ray.put calls")


if __name__ == "__main__":
    main()
