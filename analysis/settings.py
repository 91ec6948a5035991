"""Which runs are seeds of one setting, and the labels that tell settings apart.

A *setting* is a set of runs whose resolved configs (``config.toml`` flattened to dotted keys) agree on
every key except the seed and the execution-only keys of ``EXECUTION_ONLY``, which change how a run is
executed (where, on how many actors, how often it writes) but never its numbers. ``group_settings`` is a
pure function of the configs: it returns the settings in the order of their first run, the *base* (every
key with one value in all runs) and the keys on which settings differ. A label names every one of those
keys (``algorithm.name=maml, algorithm.server_optimizer=adam, algorithm.server_lr=0.003``); the short
form writes a key as the shortest dotted suffix that names no other key of the configs
(``server_optimizer=adam``), and keeps the whole key where the suffix would be ambiguous
(``algorithm.name``, as ``name``, ``data.name`` and ``model.name`` exist too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from simulator.config.toml import flatten_dict
from simulator.rundir.checkpoint import RESUMABLE_KEYS

#: the key whose runs are aggregated over
SEED_KEY = "seed"

#: keys that never make a setting: the run's name and the keys that ``simulator.rundir.checkpoint``'s
#: RESUMABLE_KEYS lets a resume change because they "change how the run executes, never its numbers"
#: (all of them but ``rounds``: a run's length changes its final numbers, and Personalized FedAvg's
#: switch round). Every other key counts, ``system.*`` included: ``system.mode`` and its ``deadline_s``,
#: ``overselect``, ``max_concurrency``, ``max_staleness`` change which updates are aggregated, and
#: ``system.threads`` and ``system.vectorize`` change floating-point results (README "Determinism").
EXECUTION_ONLY: tuple[str, ...] = ("name", *sorted(RESUMABLE_KEYS - {"rounds"}))

#: keys named first in a label, when they differ
PRIORITY: tuple[str, ...] = ("algorithm.name", "system.mode", "async.rule", "data.name", "data.partition",
                             "data.dirichlet_alpha")

#: the value of a key that a config does not have (hand-written or older configs)
UNSET = "(unset)"


def _normal(value: Any) -> Any:
    """A comparable, hashable value: lists become tuples, integral floats equal their ints (TOML 1 vs 1.0)."""
    if isinstance(value, list | tuple):
        return tuple(_normal(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's config as dotted keys (``devices.speed.median``), lists as tuples so that they compare."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flatten_dict(dict(config)).items()}


def is_setting_key(key: str) -> bool:
    """Whether a dotted key can make two runs different settings (not the seed, not execution-only)."""
    return key != SEED_KEY and key not in EXECUTION_ONLY


def format_value(value: Any) -> str:
    """A config value as a label writes it: TOML booleans, lists in brackets, ``""`` for an empty string,
    floats as Python prints them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return '""' if value == "" else str(value)


@dataclass(frozen=True)
class Setting:
    """One setting: its runs (indices into the configs given to ``group_settings``) and what sets it apart."""

    number: int                     # 1, 2, ... in the order of each setting's first run
    runs: tuple[int, ...]
    values: tuple[tuple[str, Any], ...]   # (key, value) of every key on which settings differ, in label order
    label: str
    short_label: str

    @property
    def n(self) -> int:
        return len(self.runs)


@dataclass(frozen=True)
class Grouping:
    """Settings of a set of runs, the base they share and the keys that differ."""

    settings: tuple[Setting, ...]
    base: tuple[tuple[str, Any], ...]   # (key, value) of every key with one value in all runs, in config order
    differing: tuple[str, ...]          # the setting keys on which settings differ, in label order
    varying: tuple[str, ...]            # keys that differ between runs without making settings (seed, execution)

    def setting_of(self, run: int) -> Setting:
        return next(s for s in self.settings if run in s.runs)

    def run_labels(self) -> list[str]:
        """The label of every run, in the order of the configs given."""
        labels: dict[int, str] = {r: s.label for s in self.settings for r in s.runs}
        return [labels[i] for i in range(len(labels))]


def _ordered(keys: Iterable[str], order: Sequence[str]) -> list[str]:
    wanted = set(keys)
    return [k for k in PRIORITY if k in wanted] + [k for k in order if k in wanted and k not in PRIORITY]


def short_keys(keys: Sequence[str], every_key: Iterable[str]) -> dict[str, str]:
    """Each key as its shortest dotted suffix that is the suffix of no other key in ``every_key``."""
    others = set(every_key) | set(keys)
    out = {}
    for key in keys:
        parts = key.split(".")
        out[key] = key
        for start in range(len(parts) - 1, 0, -1):
            suffix = ".".join(parts[start:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in others):
                out[key] = suffix
                break
    return out


def group_settings(configs: Sequence[Mapping[str, Any]]) -> Grouping:
    """Group runs (their configs, nested as in ``config.toml``) into settings that differ in more than
    the seed and ``EXECUTION_ONLY`` keys.

    When every run is one setting its label is the algorithm's name (``"run"`` without one)."""
    flats = [flat_config(c) for c in configs]
    order: list[str] = list(dict.fromkeys(k for f in flats for k in f))
    values = [{k: _normal(f.get(k, UNSET)) for k in order} for f in flats]
    base_keys = [k for k in order if len({repr(v[k]) for v in values}) == 1 and all(k in f for f in flats)]
    setting_keys = [k for k in order if is_setting_key(k)]
    members: dict[tuple[str, ...], list[int]] = {}
    for i, v in enumerate(values):
        members.setdefault(tuple(repr(v[k]) for k in setting_keys), []).append(i)
    firsts = [runs[0] for runs in members.values()]
    differing = _ordered([k for k in setting_keys if len({repr(values[i][k]) for i in firsts}) > 1], order)
    short = short_keys(differing, order)
    settings = []
    for number, runs in enumerate(members.values(), start=1):
        own = flats[runs[0]]
        pairs = tuple((k, own.get(k, UNSET)) for k in differing)
        if pairs:
            label = ", ".join(f"{k}={format_value(v)}" for k, v in pairs)
            short_label = ", ".join(f"{short[k]}={format_value(v)}" for k, v in pairs)
        else:
            label = short_label = format_value(own.get("algorithm.name", "run"))
        settings.append(Setting(number, tuple(runs), pairs, label, short_label))
    varying = tuple(k for k in order if not is_setting_key(k) and k not in base_keys)
    base = tuple((k, flats[0][k]) for k in base_keys)
    return Grouping(tuple(settings), base, tuple(differing), varying)
