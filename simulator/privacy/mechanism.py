"""The run's DP mechanism: what the rounds call to turn the cohort's uploads into the released mean.

``Privacy`` holds the mechanism's state (the current clip C, adaptive under Andrew et al. 2021, and the
``Ledger`` of releases) and is checkpointed with the server. Per release (a synchronous round, or a server update
in async mode) the driver calls ``check`` first (the budget stop: ``BudgetExhausted`` before a release that would
take epsilon past ``privacy.target_epsilon``), then ``mean``, which clips every upload to C, adds the seeded
Gaussian noise (central: once on the sum; local: each client's own), divides by the fixed denominator m, updates
an adaptive clip and records the release. With ``privacy.mode = "off"`` nothing here runs and the columns are NaN.

Every algorithm is served the same way: what is clipped is the vector the algorithm uploads (a model delta for
FedAvg, Reptile, Per-FedAvg and Personalized FedAvg, a meta-gradient for (FO)MAML, [meta-gradient ; rate
gradient] for Meta-SGD). Under DP every upload counts with weight 1 (FedAvg's n_i weights would let one client's
sample count scale its contribution past C; McMahan et al. 2018 bound them, w_i = 1 is that bound).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import torch

from simulator.config.schema import ExperimentConfig
from simulator.privacy.accounting import Ledger, count_noise
from simulator.privacy.clipping import adaptive_clip, clip_factors, unclipped_count, update_norms
from simulator.privacy.noise import gaussian, local_noise_sum, private_mean


class BudgetExhausted(RuntimeError):
    """The next release would take epsilon past ``privacy.target_epsilon``: the run stops before it."""


class Privacy:
    """The DP mechanism of a run (see the module docstring); ``state`` comes from a checkpoint."""

    def __init__(self, cfg: ExperimentConfig, state: dict[str, Any] | None = None) -> None:
        self.cfg, self.p = cfg, cfg.privacy
        self.on = self.p.mode != "off"
        self.clip = float(state["clip"]) if state else self.p.clip
        self.ledger = Ledger(cfg, {int(k): int(c) for k, c in state["releases"]} if state else None)
        self.epsilon = self.ledger.epsilon() if self.on else math.nan

    def check(self, multiplicity: int = 1) -> None:
        """Raise ``BudgetExhausted`` when one more release of ``multiplicity`` would exceed the target."""
        target = self.p.target_epsilon
        if self.on and target > 0 and self.ledger.epsilon(multiplicity) > target:
            raise BudgetExhausted(f"privacy budget: one more release would take epsilon past "
                                  f"privacy.target_epsilon = {target:g} at delta = {self.p.delta:g} "
                                  f"(spent so far: {self.epsilon:.4g})")

    def mean(self, vectors: np.ndarray, ok: np.ndarray, client_ids: np.ndarray, keys: int | np.ndarray,
             release: int, denominator: int, weights: np.ndarray | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The released mean of one release: (sum_i w_i (f_i v_i [+ N_i]) [+ N]) / m over the finite uploads
        (``ok``; a non-finite one contributes zero, so whether a release happens never depends on the data).
        ``keys``: the round (or one refill key per client) of the clients' local noise; ``release``: the index of
        the release (the round, or the server update) keying the central and the count noise; ``weights``:
        FedBuff's staleness weights s(tau_i) <= 1 (default 1)."""
        p, seed = self.p, self.cfg.seed
        k = len(vectors)
        w = np.ones(k) if weights is None else np.asarray(weights, np.float64)
        norms = update_norms(vectors[ok]) if ok.any() else np.zeros(0)
        f = np.zeros(k)
        f[ok] = clip_factors(norms, self.clip)
        safe = vectors if ok.all() else np.where(ok[:, None], vectors, 0).astype(vectors.dtype)
        size, std = vectors.shape[1], p.noise_multiplier * self.clip
        noise = None
        if std > 0 and p.mode == "central":
            noise = gaussian(seed, "dp_noise", release, size, std)
        elif std > 0:  # local: each client noised its own upload, weighted like it by the server
            kk = np.broadcast_to(np.asarray(keys, np.int64), (k,))
            noise = np.zeros(size)
            for key, cid, wi in zip(kk[ok].tolist(), client_ids[ok].tolist(), w[ok].tolist(), strict=True):
                noise += wi * local_noise_sum(seed, key, np.array([cid]), size, std)
        out = private_mean(safe, f, w, denominator, noise, dtype)
        if p.adaptive_quantile > 0:
            draw = float(gaussian(seed, "dp_clip", release, 1, count_noise(self.cfg))[0])
            self.clip = adaptive_clip(self.clip, unclipped_count(norms, self.clip), draw, denominator,
                                      p.adaptive_quantile, p.adaptive_lr)
        self.ledger.record(max(Counter(np.asarray(client_ids).tolist()).values()))
        self.epsilon = self.ledger.epsilon()
        return out

    def columns(self) -> dict[str, float]:
        """The rounds-table columns: ``dp_epsilon`` (spent so far, at ``privacy.delta``) and ``dp_clip`` (the C the
        next release clips to); NaN with privacy off, as every other column stores a missing value."""
        if not self.on:
            return {"dp_epsilon": math.nan, "dp_clip": math.nan}
        return {"dp_epsilon": self.epsilon, "dp_clip": self.clip}

    def state(self) -> dict[str, Any] | None:
        return {"clip": self.clip, "releases": self.ledger.state()} if self.on else None
