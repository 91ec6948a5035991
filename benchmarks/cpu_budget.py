"""Where a round's CPU goes: CPU seconds per process and per round, the inline backend against Ray actors.

A steady-state throughput figure says how fast a backend is, not why. This runs the anchor workload of
``benchmarks.throughput`` (FedAvg on Synthetic(1,1), MLP 60-64-10, 5 local steps of batch 10) on each backend and
reads, from ``/proc``, the CPU time (user + system) each process of this driver's tree spent during the run's
rounds: the driver itself, every client actor, the raylet, the GCS and Ray's other helpers (the local Ray the pool
starts through ``actors.cluster`` is this process's child). Each backend first runs 2 rounds on the same pool, so
the figures are of warm actors. Reported per round: each role's CPU milliseconds, their sum, the wall time, and
how many cores were busy on average (sum / wall). On a machine with C cores, a backend whose rounds need S CPU ms
cannot finish a round in less than S / C ms, however well its work overlaps.

    python -m benchmarks.cpu_budget --per-round 100 --population 10000 --rounds 200 --systems inline ray-2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from actors.backends import make_backend
from benchmarks.common import markdown
from benchmarks.scale import SYSTEMS, overrides
from simulator.experiment import load_config
from simulator.rounds.run import run

TICK = os.sysconf("SC_CLK_TCK")


def parent_and_cpu(pid: int) -> tuple[int, float]:
    """A process's parent pid and the CPU seconds (user + system) it has used, from ``/proc/PID/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()  # after "(comm) ": state, ppid, ... utime (14th), stime (15th)
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _processes() -> dict[int, tuple[int, str, float]]:
    """Every process: pid -> (parent pid, command line, CPU seconds so far)."""
    out = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent, cpu = parent_and_cpu(int(proc.name))
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it ended meanwhile
            continue
        out[int(proc.name)] = (parent, cmd, cpu)
    return out


def tree_cpu() -> dict[int, tuple[str, float]]:
    """This process and its descendants: pid -> (role, CPU seconds so far)."""
    procs, me = _processes(), os.getpid()
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (ppid, _, _) in procs.items():
        children[ppid].append(pid)
    out, todo = {}, [me]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid in procs:
            out[pid] = (_role(pid, me, procs[pid][1]), procs[pid][2])
    return out


def _role(pid: int, me: int, cmd: str) -> str:
    if pid == me:
        return "driver"
    if cmd.startswith("ray::ClientActor"):
        return "actors"
    return next((name for name in ("raylet", "gcs_server") if name in cmd), "other Ray")


def measure(system: str, rounds: int, population: int, per_round: int, mode: str = "sync") -> dict[str, float]:
    def config(r: int):  # the anchor workload on this execution, as benchmarks.scale runs it
        return load_config(None, list(overrides(system, per_round, r, population=population, mode=mode)))

    with make_backend(config(rounds)) as pool, tempfile.TemporaryDirectory() as tmp:
        run(config(2), pool, Path(tmp) / "warm-up")
        before, start = tree_cpu(), time.perf_counter()
        summary = run(config(rounds), pool, Path(tmp) / "run")
        wall, after = time.perf_counter() - start, tree_cpu()
    ms: dict[str, float] = defaultdict(float)
    for pid, (role, cpu) in after.items():
        ms[role] += 1000 * (cpu - before.get(pid, (role, 0.0))[1]) / rounds
    ms["sum"] = sum(ms.values())
    ms["wall"] = 1000 * wall / rounds
    ms["updates/s"] = summary["steady_updates_per_s"]
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--population", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2, help="the systems alternate within each repeat")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=["inline", "ray-2"])
    parser.add_argument("--mode", choices=["sync", "fedbuff"], default="sync",
                        help="fedbuff: --per-round clients in flight and a buffer of as many (benchmarks.scale)")
    args = parser.parse_args()
    for flag in ("per_round", "population", "rounds", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.per_round > args.population:
        parser.error(f"--per-round {args.per_round} is more than --population {args.population}")
    roles = ["driver", "actors", "raylet", "gcs_server", "other Ray"]
    rows = []
    for i in range(args.repeats):
        for system in args.systems:
            ms = measure(system, args.rounds, args.population, args.per_round, args.mode)
            rows.append([system, str(i), *(f"{ms.get(r, 0.0):.1f}" for r in roles), f"{ms['sum']:.1f}",
                         f"{ms['wall']:.1f}", f"{ms['sum'] / ms['wall']:.2f}", f"{ms['updates/s']:,.0f}"])
            print(f"  done {system} repeat {i}", flush=True)
    print(f"{args.mode}: {args.per_round} clients per round, {args.population:,} registered, {args.rounds} rounds; "
          f"CPU ms per round ({os.cpu_count()} cores)")
    print(markdown(rows, ["system", "repeat", *roles, "sum", "wall ms", "cores busy", "steady updates/s"]))


if __name__ == "__main__":
    main()
