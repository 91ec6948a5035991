"""System heterogeneity: device profiles, availability and dropout, all in simulated time.

A client's device (compute speed in samples per simulated second, download and upload
bandwidth in Mbit/s) is a pure function of (seed, client id): drawn from the ``[devices]``
distributions, or read from a FedScale-style trace file (Lai et al. 2022, "FedScale", Sec. 3:
client_id, compute_speed, up_bw, down_bw). A client's simulated duration is

    download (model bytes / down_bw) + compute (samples processed / speed) + upload (update bytes / up_bw),

so stragglers cost simulated time only, never real time. Availability is a probability of being
online when sampled, or an on/off trace of intervals; a client may also drop out part-way through
an update with probability ``dropout`` (at a uniformly drawn fraction of its duration).

Nothing here is O(population) per call: profiles are drawn per sampled client, and traces are
indexed arrays looked up by ``client_id mod rows`` (FedScale reuses its device traces the same way
when a population has more clients than the trace).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from simulator.config.schema import ConfigError, DevicesConfig, Distribution
from simulator.rng import generators

#: bytes per second in one Mbit/s
MBIT = 125_000.0

#: drawn device profiles kept per run (LRU; 16 bytes of values each): bounded for 1M-client populations
PROFILE_CACHE = 65_536


@dataclass(frozen=True)
class Profiles:
    """Device profiles of some clients, row i for ``client_ids[i]``."""
    client_ids: np.ndarray
    compute_speed: np.ndarray  # samples per simulated second
    up_bw: np.ndarray          # Mbit/s
    down_bw: np.ndarray        # Mbit/s


def draw(dist: Distribution, rng: np.random.Generator) -> float:
    """One positive value from a ``Distribution`` (see its docstring); always two uniforms consumed
    from ``rng`` so that adding a distribution never shifts the other draws of the stream."""
    u, z = rng.random(), rng.standard_normal()
    if dist.dist == "constant":
        return dist.median
    if dist.dist == "lognormal":
        return dist.median * float(np.exp(dist.sigma * z))
    if dist.dist == "pareto":
        # slowness X = (1 - u)^(-1/shape) >= 1 is Pareto(shape) with median 2^(1/shape); rate = median * 2^(1/shape) / X
        return dist.median * 2.0 ** (1.0 / dist.shape) * (1.0 - u) ** (1.0 / dist.shape)
    raise ValueError(f"unknown distribution {dist.dist!r}")  # config validation rejects this earlier


def client_durations(profiles: Profiles, samples: np.ndarray, model_bytes: int, update_bytes: int) -> np.ndarray:
    """Simulated seconds per client: download + local compute + upload."""
    return (model_bytes / (profiles.down_bw * MBIT) + np.asarray(samples, np.float64) / profiles.compute_speed
            + update_bytes / (profiles.up_bw * MBIT))


def _read_table(path: str, key: str, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A CSV or Parquet file's named columns as float64 arrays (client_id as int64); ConfigError if unusable."""
    p = Path(path)
    is_parquet = p.suffix.lower() in (".parquet", ".pq")
    if not p.is_file():
        raise ConfigError(f"{key} = {path!r} does not exist; give the path of a CSV or Parquet file")
    try:
        table = pq.read_table(p) if is_parquet else pacsv.read_csv(p)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{key} = {path!r} cannot be read as {'Parquet' if is_parquet else 'CSV'} "
                          f"({exc}); fix or regenerate the file") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ConfigError(f"{key} = {path!r} lacks the column(s) {', '.join(missing)}; it needs "
                          f"{', '.join(columns)}")
    if table.num_rows == 0:
        raise ConfigError(f"{key} = {path!r} has no rows")
    out = {}
    for c in columns:
        col = table.column(c)
        if col.null_count:
            raise ConfigError(f"{key} = {path!r}: column {c} has empty values; fill them in")
        try:
            values = col.to_numpy().astype(np.float64)
        except (ValueError, TypeError, pa.ArrowException):
            raise ConfigError(f"{key} = {path!r}: column {c} must be numeric") from None
        if not np.all(np.isfinite(values)):
            raise ConfigError(f"{key} = {path!r}: column {c} has non-finite values")
        if c == "client_id":
            if not np.array_equal(values, np.round(values)):
                raise ConfigError(f"{key} = {path!r}: client_id must hold whole numbers")
            values = values.astype(np.int64)
        out[c] = values
    return out


def _check_ids(ids: np.ndarray, key: str, path: str, unique: bool) -> int:
    """Trace client ids must be 0..M-1 (each at least once); returns M."""
    present = np.unique(ids)
    m = int(present.size)
    if present[0] != 0 or present[-1] != m - 1 or (unique and ids.size != m):
        raise ConfigError(f"{key} = {path!r}: client_id must be {'each of ' if unique else ''}0 .. M-1 "
                          f"{'exactly once' if unique else 'with at least one row each'} (client c of the run "
                          "uses row c mod M); renumber the trace's clients")
    return m


class DeviceTrace:
    """FedScale-style device trace: one row per device, client c uses row ``c mod rows``."""
    COLUMNS = ("client_id", "compute_speed", "up_bw", "down_bw")

    def __init__(self, path: str) -> None:
        cols = _read_table(path, "devices.trace", self.COLUMNS)
        _check_ids(cols["client_id"], "devices.trace", path, unique=True)
        for c in self.COLUMNS[1:]:
            if np.any(cols[c] <= 0):
                raise ConfigError(f"devices.trace = {path!r}: {c} must be > 0 in every row")
        order = np.argsort(cols["client_id"])
        self.speed, self.up, self.down = (cols[c][order] for c in self.COLUMNS[1:])

    def profiles(self, client_ids: np.ndarray) -> Profiles:
        rows = np.asarray(client_ids, np.int64) % self.speed.size
        return Profiles(np.asarray(client_ids, np.int64), self.speed[rows], self.up[rows], self.down[rows])


class AvailabilityTrace:
    """On/off trace: rows (client_id, start, end) are intervals [start, end) of simulated seconds in
    which the client is online; client c follows trace client ``c mod M``."""
    COLUMNS = ("client_id", "start", "end")

    def __init__(self, path: str) -> None:
        cols = _read_table(path, "devices.availability_trace", self.COLUMNS)
        self.m = _check_ids(cols["client_id"], "devices.availability_trace", path, unique=False)
        if np.any(cols["end"] <= cols["start"]) or np.any(cols["start"] < 0):
            raise ConfigError(f"devices.availability_trace = {path!r}: every interval needs 0 <= start < end")
        order = np.lexsort((cols["start"], cols["client_id"]))
        self.starts, self.ends = cols["start"][order], cols["end"][order]
        self.offsets = np.searchsorted(cols["client_id"][order], np.arange(self.m + 1))
        self.sorted_starts = np.sort(self.starts)

    def online(self, client_ids: np.ndarray, time: float) -> np.ndarray:
        out = np.zeros(len(client_ids), bool)
        for i, cid in enumerate(np.asarray(client_ids, np.int64) % self.m):
            lo, hi = self.offsets[cid], self.offsets[cid + 1]
            out[i] = bool(np.any((self.starts[lo:hi] <= time) & (time < self.ends[lo:hi])))
        return out

    def next_start(self, time: float) -> float | None:
        """The first interval start after ``time`` (when a client may next come online), or None."""
        i = int(np.searchsorted(self.sorted_starts, time, side="right"))
        return float(self.sorted_starts[i]) if i < self.sorted_starts.size else None


class Devices:
    """The ``[devices]`` section made concrete for one run seed (traces are read once, here)."""
    def __init__(self, cfg: DevicesConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.trace = DeviceTrace(cfg.trace) if cfg.trace else None
        self.availability_trace = AvailabilityTrace(cfg.availability_trace) if cfg.availability_trace else None
        self._cache: OrderedDict[int, tuple[float, float]] = OrderedDict()

    def profiles(self, client_ids: np.ndarray) -> Profiles:
        if self.trace is not None:
            return self.trace.profiles(client_ids)
        ids = np.asarray(client_ids, np.int64)
        speed, down = np.empty(ids.size), np.empty(ids.size)
        # a seeded generator per client costs microseconds: draw once, keep the recent ones
        missing = list(dict.fromkeys(c for c in ids.tolist() if c not in self._cache))
        for cid, rng in zip(missing, generators(self.seed, "device", 0, missing), strict=True):
            self._cache[cid] = (draw(self.cfg.speed, rng), draw(self.cfg.bandwidth, rng))
        for i, cid in enumerate(ids.tolist()):
            self._cache.move_to_end(cid)
            speed[i], down[i] = self._cache[cid]
        while len(self._cache) > PROFILE_CACHE:
            self._cache.popitem(last=False)
        return Profiles(ids, speed, down * self.cfg.uplink_ratio, down)

    def online(self, client_ids: np.ndarray, time: float, key: int) -> np.ndarray:
        """Which sampled clients are online at simulated ``time`` (``key``: the round or refill group)."""
        ids = np.asarray(client_ids, np.int64)
        up = np.ones(ids.size, bool) if self.availability_trace is None else self.availability_trace.online(ids, time)
        if self.cfg.availability < 1.0:
            draws = np.array([g.random() for g in generators(self.seed, "availability", key, ids.tolist())])
            up &= draws < self.cfg.availability
        return up

    def dropout_fraction(self, client_ids: np.ndarray, key: int) -> np.ndarray:
        """For each client, the fraction of its duration after which it drops out, or NaN if it completes."""
        ids = np.asarray(client_ids, np.int64)
        out = np.full(ids.size, np.nan)
        if self.cfg.dropout > 0:
            for i, rng in enumerate(generators(self.seed, "dropout", key, ids.tolist())):
                drop, frac = rng.random(), rng.random()
                if drop < self.cfg.dropout:
                    out[i] = frac
        return out

    def next_online_time(self, time: float) -> float | None:
        """When a client may next be online if none is now: the next trace interval start, or ``time``
        itself when availability is a probability (a new draw may succeed); None if never."""
        if self.availability_trace is None:
            return time
        return self.availability_trace.next_start(time)
