"""Small real run directories laid out as ``metafleet sweep`` writes them, for the analysis tests.

``SWEEP/study.toml``, ``SWEEP/index.json`` and ``SWEEP/trials/<name>/``, one ``metafleet run`` (inline
backend, seconds-long, ``conftest.small_overrides``) per trial: Reptile with seeds 0, 1, 2 and a seed 3 that
was killed (its ``summary.json`` removed, as a killed run has none), MAML with server Adam at 0.003 with
seeds 0 and 1 (different backends and actor counts: execution-only keys), and a trial that has written its
``config.toml`` but no rounds yet.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import small_overrides

from actors.cli import main

MAML_ADAM = {"algorithm.name": "maml", "algorithm.server_optimizer": "adam", "algorithm.server_lr": 0.003}
TRIALS: tuple[tuple[str, dict[str, object]], ...] = (
    *((f"t{s:04d}-reptile-s{s}", {"seed": s}) for s in range(4)),
    ("t0004-maml-s0", {**MAML_ADAM, "seed": 0}),
    ("t0005-maml-s1", {**MAML_ADAM, "seed": 1, "system.actors": 2, "metrics.flush_every": 1}),
)
KILLED = "t0003-reptile-s3"
PENDING = "t0006-reptile-s4"


def run(out: Path, **overrides: object) -> Path:
    """One seconds-long ``metafleet run`` into ``out`` (inline backend unless overridden)."""
    args = small_overrides(**{"system.backend": "inline", **overrides})
    argv = [a for o in args for a in ("--set", o)]
    assert main(["run", "--out", str(out), "--no-progress", "--no-plots", *argv]) == 0
    return out


def make_sweep(root: Path) -> Path:
    """The sweep directory described above, under ``root``."""
    sweep = root / "sweep"
    trials = []
    for name, overrides in TRIALS:
        run(sweep / "trials" / name, **overrides)
        keys = {k: v for k, v in overrides.items() if k.startswith("algorithm.")}
        trials.append({"name": name, "dir": f"trials/{name}", "keys": keys, "seed": overrides["seed"],
                       "status": "completed"})
    (sweep / "trials" / KILLED / "summary.json").unlink()
    pending = sweep / "trials" / PENDING
    pending.mkdir()
    shutil.copy(sweep / "trials" / TRIALS[0][0] / "config.toml", pending / "config.toml")
    (sweep / "study.toml").write_text('name = "study"\n')
    (sweep / "index.json").write_text(json.dumps({"trials": trials}))
    return sweep
