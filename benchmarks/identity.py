"""Behaviour-identity check for refactors: the same matrix of small runs, before and after, must give equal metrics.

What it checks. A matrix of seconds-long experiments: every algorithm (fedavg, reptile, fomaml, maml, perfedavg_fo,
perfedavg_hf, metasgd, pfedavg) x every mode (sync; deadline; overselect at 1.5, plus 2.5, the setting where the
cut-off actually drops clients; async FedBuff; async FedAsync) x ``system.vectorize`` true/false, on the in-process
``inline`` backend with heterogeneous devices (Pareto speeds, dropout, availability), plus a few cells on a 2-actor
local Ray. The dataset rotates with the mode so that every algorithm runs on regression (sinusoid) and
classification (synthetic, gaussian with a Dirichlet partition); the meta-gradient algorithms use a server Adam
(Kingma & Ba's) except under FedAsync, which only allows server SGD. pfedavg x fedasync is rejected by the config rules
and recorded as skipped. Each cell is one CLI run in a subprocess (``python -m actors.cli run`` when the tree has
``actors/cli.py``, else ``simulator.cli``), so the script imports nothing of the project and works on the old and
the new package layout alike.

``compare`` reads each cell's ``rounds``, ``clients`` and ``evals`` Parquet tables, drops the wall-clock columns,
sorts the rows, and requires the same columns, dtypes and bit-identical values (``assert_frame_equal`` with
``check_exact=True``); it also requires every key of the BEFORE ``config.toml`` to have the same value
AFTER (keys AFTER adds, new options written at their defaults, are listed but allowed) and the same
``summary.json`` less its wall-clock fields, and checks each Ray cell against its inline twin (same
config, the backend aside). Exit code 0 only when everything is identical.

    python -m benchmarks.identity record --tree /tmp/before --out /tmp/identity/before [--jobs 2]
    python -m benchmarks.identity record --tree . --out /tmp/identity/after
    python -m benchmarks.identity compare /tmp/identity/before /tmp/identity/after
    python -m benchmarks.identity --before 6cf75da      # worktree of the commit, both records, compare, clean up

A full record of the matrix takes about 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
ALGORITHMS = ("fedavg", "reptile", "fomaml", "maml", "perfedavg_fo", "perfedavg_hf", "metasgd", "pfedavg")
META_GRADIENT = ("fomaml", "maml", "metasgd")
BASE = ["rounds=6", "data.num_clients=24", "data.eval_clients=4", "clients.per_round=6", "eval.every=2",
        "eval.clients=4", "eval.adapt_steps=2", "algorithm.local_steps=2", "metrics.flush_every=2",
        'devices.speed={dist="pareto", median=100.0, shape=1.0}', "devices.dropout=0.3", "devices.availability=0.7"]
DATASETS = {
    "sinusoid": ['data.name="sinusoid"'],
    "synthetic": ['data.name="synthetic"', "data.samples_per_client=30"],
    "gaussian": ['data.name="gaussian"', 'data.partition="dirichlet"'],
}
MODES = {
    "sync": ['system.mode="sync"'],
    "deadline": ['system.mode="deadline"', "system.deadline_s=0.5"],
    "overselect": ['system.mode="overselect"', "system.overselect=1.5"],
    "fedbuff": ['system.mode="async"', "async.buffer_size=3", "system.max_concurrency=8", "system.max_staleness=3"],
    "fedasync": ['system.mode="async"', 'async.rule="fedasync"', "system.max_concurrency=5",
                 'async.staleness="polynomial"', "seed=1"],  # seed 0's first 10 async clients never drop
    # 1.5 x 6 sampled clients rarely finish more than 6 at this dropout and availability: cut-offs need more
    "overselect_hi": ['system.mode="overselect"', "system.overselect=2.5"],
}
SHORT = {"sync": "sync", "deadline": "dl", "overselect": "os", "fedbuff": "buff", "fedasync": "async",
         "overselect_hi": "os_hi"}
RAY_CELLS = [(a, m) for a in ("reptile", "maml", "pfedavg") for m in ("sync", "fedbuff")]
WALL_CLOCK = {"rounds": ("wall_time_s",), "clients": ("compute_time_s", "actor_id"), "evals": ("actor_id",)}
SORT_KEYS = {"rounds": ["round"], "clients": ["round", "client_id"], "evals": ["round", "client_id"]}
SUMMARY_WALL_CLOCK = ("wall_time_s", "updates_per_s", "steady_updates_per_s", "workers")
CELL_TIMEOUT_S = 600


@dataclass
class Cell:
    name: str
    algorithm: str
    mode: str
    vectorize: bool
    backend: str
    dataset: str
    overrides: list[str]
    skip: str = ""  # why the cell is not run (a combination the config rules reject)

    @property
    def column(self) -> str:
        return f"{'ray-' if self.backend == 'ray' else ''}{SHORT[self.mode]}:{'v' if self.vectorize else 'l'}"


def algorithm_overrides(algorithm: str, mode: str) -> list[str]:
    out = [f'algorithm.name="{algorithm}"']
    if algorithm in META_GRADIENT:  # SGD at server_lr 1.0 diverges; FedAsync allows only plain server SGD
        out += (['algorithm.server_lr=0.05'] if mode == "fedasync"
                else ['algorithm.server_optimizer="adam"', "algorithm.server_lr=0.01"])
    elif algorithm == "pfedavg":
        out.append("algorithm.server_momentum=0.9")
    return out


def matrix() -> list[Cell]:
    """Every algorithm x mode x vectorize on the inline backend, then the Ray cells (inline twins' configs)."""
    cells: list[Cell] = []
    for i, algorithm in enumerate(ALGORITHMS):
        for j, mode in enumerate(MODES):
            dataset = list(DATASETS)[(i + j) % len(DATASETS)]  # 3 consecutive modes cover all 3 datasets
            for vec in (True, False):
                overrides = [*BASE, *DATASETS[dataset], *MODES[mode], *algorithm_overrides(algorithm, mode),
                             f"system.vectorize={'true' if vec else 'false'}", 'system.backend="inline"']
                skip = ("pfedavg needs a server optimizer to switch phases; async.rule=\"fedasync\" has none "
                        "(config validation rejects it)") if algorithm == "pfedavg" and mode == "fedasync" else ""
                cells.append(Cell(f"{algorithm}-{mode}-{'vec' if vec else 'loop'}", algorithm, mode, vec, "inline",
                                  dataset, overrides, skip))
    by_name = {c.name: c for c in cells}
    for algorithm, mode in RAY_CELLS:
        twin = by_name[f"{algorithm}-{mode}-vec"]
        overrides = [o for o in twin.overrides if not o.startswith("system.backend=")]
        cells.append(Cell(f"ray-{twin.name}", algorithm, mode, True, "ray", twin.dataset,
                          [*overrides, 'system.backend="ray"', "system.actors=2"]))
    return cells


def cli_module(tree: Path) -> str:
    return "actors.cli" if (tree / "actors" / "cli.py").exists() else "simulator.cli"


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0"}


def _check_imports(tree: Path, module: str) -> None:
    """The subprocesses must import the tree's code, not the installed (editable) package."""
    code = f"import importlib.util as u; print(u.find_spec({module!r}).origin)"
    origin = subprocess.run([sys.executable, "-c", code], cwd=tree, env=_env(tree), capture_output=True, text=True,
                            check=True).stdout.strip()
    if not Path(origin).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"identity: {module} resolves to {origin}, outside {tree}")


def run_cell(tree: Path, module: str, cell: Cell, out: Path) -> dict[str, Any]:
    entry: dict[str, Any] = asdict(cell) | {"column": cell.column}
    if cell.skip:
        return entry | {"status": "skipped", "exit_code": None, "seconds": 0.0}
    cmd = [sys.executable, "-m", module, "run", *(a for o in cell.overrides for a in ("--set", o)),
           "--out", str(out / cell.name), "--no-progress", "--no-plots"]
    start = time.perf_counter()
    with open(out / "_logs" / f"{cell.name}.log", "w") as log:
        try:
            rc: int | None = subprocess.run(cmd, cwd=tree, env=_env(tree), stdout=log, stderr=subprocess.STDOUT,
                                            timeout=CELL_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = None
    entry |= {"exit_code": rc, "seconds": round(time.perf_counter() - start, 2)}
    summary_path = out / cell.name / "summary.json"
    if rc == 2:
        lines = (out / "_logs" / f"{cell.name}.log").read_text().strip().splitlines()
        return entry | {"status": "rejected", "reason": lines[-1] if lines else "exit code 2"}
    if not summary_path.exists():
        return entry | {"status": "failed" if rc is not None else "timeout"}
    summary = json.loads(summary_path.read_text())
    return entry | {"status": summary["status"], "client_updates": summary["client_updates"],
                    "dropped": summary["dropped"], "final_eval_loss_post": (summary["final_eval"] or {}).get(
                        "eval_loss_post")}


def record(tree: Path, out: Path, jobs: int) -> int:
    tree = tree.resolve()
    if out.exists() and any(out.iterdir()):
        print(f"identity: --out {out} is not empty; choose a new directory", file=sys.stderr)
        return 2
    (out / "_logs").mkdir(parents=True, exist_ok=True)
    module = cli_module(tree)
    _check_imports(tree, module)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
    cells = matrix()
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}

    def one(cell: Cell) -> None:
        res = results[cell.name] = run_cell(tree, module, cell, out)
        print(f"  {cell.name:34s} {res['status']:9s} {res['seconds']:6.1f} s  ({len(results)}/{len(cells)})",
              flush=True)

    print(f"identity: recording {len(cells)} cells of {tree} ({module}, commit {commit[:10]}) into {out}")
    with ThreadPoolExecutor(max(1, jobs)) as pool:  # inline cells are one process each
        list(pool.map(one, [c for c in cells if c.backend == "inline"]))
    for cell in cells:  # each Ray cell starts its own local Ray with 2 actors: one at a time
        if cell.backend == "ray":
            one(cell)
    wall = time.perf_counter() - start
    entries = [results[c.name] for c in cells]
    doc = {"tree": str(tree), "commit": commit, "cli_module": module, "jobs": jobs, "wall_s": round(wall, 1),
           "cells": entries}
    (out / "matrix.json").write_text(json.dumps(doc, indent=1))
    bad = [e for e in entries if e["status"] not in ("completed", "skipped")]
    for e in entries:
        if e["status"] == "skipped":
            print(f"skipped {e['name']}: {e['skip']}")
        elif e["status"] != "completed":
            print(f"{e['status']} {e['name']} (exit code {e['exit_code']}): {e.get('reason', 'see _logs/')}")
        elif not e["client_updates"]:
            print(f"warning: {e['name']} aggregated no client update")
    print(f"identity: {len(entries)} cells in {wall:.0f} s wall, {len(bad)} not completed; {out / 'matrix.json'}")
    return 1 if bad else 0


def load_tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name, wall in WALL_CLOCK.items():
        df = pd.read_parquet(run_dir / f"{name}.parquet").drop(columns=list(wall), errors="ignore")
        keys = [k for k in SORT_KEYS[name] if k in df.columns]  # the other columns break ties, deterministically
        out[name] = df.sort_values([*keys, *(c for c in df.columns if c not in keys)], ignore_index=True,
                                   kind="mergesort")
    return out


def diff_frames(table: str, a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    """Human-readable differences of two sorted tables; empty when they are identical."""
    if set(a.columns) != set(b.columns):
        return [f"{table}: columns only before {sorted(set(a.columns) - set(b.columns))}, "
                f"only after {sorted(set(b.columns) - set(a.columns))}"]
    diffs = [f"{table}.{c}: dtype {a[c].dtype} vs {b[c].dtype}" for c in a.columns if a[c].dtype != b[c].dtype]
    if len(a) != len(b):
        return [*diffs, f"{table}: {len(a)} rows vs {len(b)}"]
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if pd.api.types.is_numeric_dtype(a[c]) and pd.api.types.is_numeric_dtype(b[c]):
            x, y = x.astype(np.float64), y.astype(np.float64)
            nan_x, nan_y = np.isnan(x), np.isnan(y)
            both = ~nan_x & ~nan_y
            if (nan_x != nan_y).any() or (x[both] != y[both]).any():
                gap = float(np.max(np.abs(x[both] - y[both]), initial=0.0))
                diffs.append(f"{table}.{c}: max abs difference {gap:.3g}, {int((nan_x != nan_y).sum())} NaN "
                             "mismatches")
        elif not pd.Series(x).equals(pd.Series(y)):
            diffs.append(f"{table}.{c}: {int((pd.Series(x) != pd.Series(y)).sum())} rows differ")
    if list(a.columns) != list(b.columns):
        diffs.append(f"{table}: column order differs")
    if not diffs:
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        except AssertionError as exc:
            diffs.append(f"{table}: {str(exc).splitlines()[0]}")
    return diffs


def _summary(run_dir: Path) -> str:
    summary = json.loads((run_dir / "summary.json").read_text())
    return json.dumps({k: v for k, v in summary.items() if k not in SUMMARY_WALL_CLOCK}, sort_keys=True)


def _flat_config(run_dir: Path) -> dict[str, object]:
    def flat(d: dict[str, object], prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    return flat(tomllib.loads((run_dir / "config.toml").read_text()))


def config_diffs(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """(differences, keys only AFTER has): a key AFTER adds (a new option, written with its default) is
    reported but allowed; a key that changed value or disappeared is a difference."""
    ca, cb = _flat_config(a), _flat_config(b)
    diffs = [f"config.toml: {k} = {ca[k]!r} before, {cb.get(k, '(missing)')!r} after" for k in ca if cb.get(k) != ca[k]
             or k not in cb]
    return diffs, sorted(cb.keys() - ca.keys())


def compare_runs(a: Path, b: Path, files: bool = True) -> list[str]:
    ta, tb = load_tables(a), load_tables(b)
    diffs = [d for name in ta for d in diff_frames(name, ta[name], tb[name])]
    if files:
        diffs += config_diffs(a, b)[0]
    if files and _summary(a) != _summary(b):
        diffs.append("summary.json differs (wall-clock fields aside)")
    return diffs


def compare(before: Path, after: Path) -> int:
    cells_a = {e["name"]: e for e in json.loads((before / "matrix.json").read_text())["cells"]}
    cells_b = {e["name"]: e for e in json.loads((after / "matrix.json").read_text())["cells"]}
    marks: dict[str, str] = {}
    failures = backend_failures = 0
    added: set[str] = set()
    for name, ea in cells_a.items():
        eb = cells_b.get(name)
        if eb is None:
            line, mark = "DIFFERENT: missing from AFTER", "X"
        elif ea["status"] in ("skipped", "rejected") and eb["status"] == ea["status"]:
            line, mark = f"{ea['status']}: {ea.get('reason') or ea['skip']}", "-"
        elif ea["status"] != "completed" or eb["status"] != "completed":
            line, mark = f"DIFFERENT: status {ea['status']} before, {eb['status']} after", "X"
        else:
            diffs = compare_runs(before / name, after / name)
            line, mark = ("DIFFERENT: " + "; ".join(diffs), "X") if diffs else ("identical", "=")
            added.update(config_diffs(before / name, after / name)[1])
        failures += mark == "X"
        marks[name] = mark
        print(f"{name:34s} {line}")
    for name in sorted(set(cells_b) - set(cells_a)):
        print(f"{name:34s} (only in AFTER, not compared)")
    for label, root, cells in (("BEFORE", before, cells_a), ("AFTER", after, cells_b)):
        for name, e in cells.items():  # backends must agree too: each Ray cell against its inline twin
            twin = name.removeprefix("ray-")
            if e["backend"] == "ray" and e["status"] == "completed" and cells.get(twin, {}).get("status") == \
                    "completed":
                diffs = compare_runs(root / twin, root / name, files=False)
                backend_failures += bool(diffs)
                print(f"{name:34s} vs {twin} in {label}: {'DIFFERENT: ' + '; '.join(diffs) if diffs else 'identical'}")
    columns = list(dict.fromkeys(e["column"] for e in cells_a.values()))
    print("\n" + ", ".join(f"{v} = {k}" for k, v in SHORT.items()) + "; :v vectorize, :l loop; "
          "= identical, X different, - skipped")
    print(" " * 13 + " ".join(f"{c:>10s}" for c in columns))
    for algorithm in ALGORITHMS:
        row = {e["column"]: marks[n] for n, e in cells_a.items() if e["algorithm"] == algorithm}
        print(f"{algorithm:13s}" + " ".join(f"{row.get(c, ''):>10s}" for c in columns))
    if added:
        print(f"\nkeys AFTER's config.toml adds (new options at their defaults, allowed): {', '.join(sorted(added))}")
    print(f"\n{len(marks)} cells: {sum(m == '=' for m in marks.values())} identical, "
          f"{sum(m == '-' for m in marks.values())} skipped, {failures} different; "
          f"{backend_failures} Ray cells differ from their inline twins")
    return 1 if failures or backend_failures else 0


def convenience(commit: str, jobs: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="identity-"))
    tree = work / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=REPO, check=True)
    try:
        rc = record(tree, work / "before", jobs)
        rc = max(rc, record(REPO, work / "after", jobs))
        return max(rc, compare(work / "before", work / "after"))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
        print(f"identity: run directories kept in {work}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.identity", description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="COMMIT", help="record COMMIT (in a temporary worktree) and the current "
                        "tree, then compare")
    parser.add_argument("--jobs", type=int, default=2, help="cells run at once (default 2)")
    sub = parser.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="run the matrix with one source tree")
    rec.add_argument("--tree", type=Path, required=True, help="source tree to run (its CLI module in a subprocess)")
    rec.add_argument("--out", type=Path, required=True, help="new directory: one run directory per cell")
    rec.add_argument("--jobs", type=int, default=2, help="cells run at once (default 2)")
    cmp = sub.add_parser("compare", help="compare two recordings")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.command == "record":
        return record(args.tree, args.out, args.jobs)
    if args.command == "compare":
        return compare(args.before, args.after)
    if args.before:
        return convenience(args.before, args.jobs)
    parser.error("give a command (record, compare) or --before COMMIT")
    return 2


if __name__ == "__main__":
    sys.exit(main())
