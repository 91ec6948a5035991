"""Client sampling, device profiles and the virtual clock, in simulated time.

The simulated clock never sleeps: a client's simulated duration is computed from its device
profile and the work it does, so stragglers cost no real time. This module holds the
synchronous-round schedule; every draw is seeded by (seed, round, purpose).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.rng import generator


def sample_cohort(seed: int, round_idx: int, num_clients: int, per_round: int) -> np.ndarray:
    """``per_round`` distinct client ids out of ``0..num_clients-1``, uniformly, sorted ascending.

    O(per_round) work and memory, whatever the population (numpy's Floyd-style sampling for
    small cohorts), so a 1,000,000-client registry costs the driver nothing per round.
    """
    rng = generator(seed, "sample", round_idx)
    return np.sort(rng.choice(num_clients, size=per_round, replace=False)).astype(np.int64)


def select_eval_clients(seed: int, first_id: int, available: int, count: int) -> np.ndarray:
    """A fixed, seeded subset of the held-out clients, evaluated at every evaluation."""
    rng = generator(seed, "eval_select")
    return np.sort(rng.choice(available, size=count, replace=False)).astype(np.int64) + first_id


@dataclass(frozen=True)
class DeviceProfile:
    """A client device: compute speed in samples per simulated second, bandwidths in bytes per second."""

    compute_speed: float = 100.0
    up_bw: float = 1.25e6     # 10 Mbit/s
    down_bw: float = 2.5e6    # 20 Mbit/s


DEFAULT_PROFILE = DeviceProfile()


def client_duration(profile: DeviceProfile, samples_processed: int, model_bytes: int, update_bytes: int) -> float:
    """Simulated seconds: model download + local compute (samples / speed) + update upload."""
    return (model_bytes / profile.down_bw + samples_processed / profile.compute_speed
            + update_bytes / profile.up_bw)


@dataclass(frozen=True)
class VirtualClock:
    """Simulated time in seconds; a synchronous round lasts as long as its slowest client."""

    now: float = 0.0

    def after_sync_round(self, durations: np.ndarray) -> VirtualClock:
        return VirtualClock(self.now + (float(np.max(durations)) if len(durations) else 0.0))


def split_cohort(client_ids: np.ndarray, workers: int, max_chunk: int = 0) -> list[tuple[int, list[int]]]:
    """Split a cohort into (worker index, client ids) calls: equal sizes, stable placement.

    Clients are ordered by (id mod workers, id) before being cut into equal contiguous chunks,
    so a client mostly lands on the same worker round after round (its cached shard is reused)
    while every worker gets the same number of clients. ``max_chunk`` > 0 caps the clients per
    call (``system.clients_per_actor``); extra chunks go round-robin to the workers.
    """
    ids = np.asarray(client_ids, dtype=np.int64)
    if ids.size == 0:
        return []
    ordered = ids[np.lexsort((ids, ids % workers))]
    chunks = workers if max_chunk <= 0 else max(workers, -(-ids.size // max_chunk))
    chunks = min(chunks, ids.size)
    return [(i % workers, part.tolist()) for i, part in enumerate(np.array_split(ordered, chunks))]
