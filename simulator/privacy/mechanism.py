"""The run's DP mechanism: what the rounds call to turn the cohort's uploads into the released mean.

``Privacy`` holds the mechanism's state (the current clip C, adaptive under Andrew et al. 2021, and the
``Ledger`` of releases) and is checkpointed with the server. Per release (a synchronous round, or a server update
in async mode) the driver calls ``check`` first (the budget stop: ``BudgetExhausted`` before a release that would
take epsilon past ``privacy.target_epsilon``). A synchronous round then hands ``reduction`` to the workers, which
clip every upload to C, add local noise (local DP: each client's own, after compression and clipping) and sum
over the fixed denominator m on the exact grid (``simulator.client.reduce``); ``finishing`` says how the combined
sum becomes the mean (the central noise added, wherever ``client.reduce.release_mean`` runs), and ``record``
updates an adaptive clip and records the release. The asynchronous server sums its buffer the same way from the
kept uploads (``client.reduce.selected_mean``: FedBuff) or with ``mean`` on the driver (FedAsync). With
``privacy.mode = "off"`` nothing here runs and the columns are NaN.

Every algorithm is served the same way: what is clipped is the vector the algorithm uploads (a model delta for
FedAvg, Reptile, Per-FedAvg and Personalized FedAvg, a meta-gradient for (FO)MAML, [meta-gradient ; rate
gradient] for Meta-SGD). Under DP every upload counts with weight 1 (FedAvg's n_i weights would let one client's
sample count scale its contribution past C; McMahan et al. 2018 bound them, w_i = 1 is that bound).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np
import torch

from simulator.algorithms.exactsum import Grid
from simulator.client.reduce import release_mean, selected_partial
from simulator.config.schema import ExperimentConfig
from simulator.contract import Reduction, Release, Selection
from simulator.privacy.accounting import Ledger, count_noise
from simulator.privacy.clipping import adaptive_clip, unclipped_count
from simulator.privacy.noise import gaussian


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

    def allows(self, multiplicity: int = 1) -> bool:
        """Whether ``check`` would let one more release through (the driver asks before it dispatches a round ahead)."""
        try:
            self.check(multiplicity)
        except BudgetExhausted:
            return False
        return True

    def reduction(self, client_ids: np.ndarray, denominator: int, weights: np.ndarray | None = None) -> Reduction:
        """How the workers reduce one release's uploads (``simulator.client.reduce``): coefficients w_i / m, the clip
        C, local noise sigma C, on the grid sized from C (|f_i v_ij| <= C; with local noise C (1 + 8 sigma))."""
        k = len(client_ids)
        w = np.ones(k) if weights is None else np.asarray(weights, np.float64)
        coefs = np.ones(k, np.float64) / denominator * w
        std = self.p.noise_multiplier * self.clip
        local = std if self.p.mode == "local" else 0.0
        bound = self.clip * (1.0 + 8.0 * self.p.noise_multiplier) if local > 0 else self.clip
        return Reduction(np.asarray(client_ids, np.int64), coefs, Grid.for_bound(bound, float(np.abs(coefs).sum())),
                         self.clip, local)

    def finishing(self, client_ids: np.ndarray, release: int, denominator: int) -> Release:
        """How release ``release``'s reduced sum sum_i w_i (f_i v_i [+ N_i]) / m becomes its mean: central noise N / m
        (N ~ N(0, sigma^2 C^2 I) from (seed, "dp_noise", release), at the current C), no renormalization (the
        denominator m is fixed). Asked before ``record`` updates C."""
        std = self.p.noise_multiplier * self.clip if self.p.mode == "central" else 0.0
        return Release(np.asarray(client_ids, np.int64), 1.0, std, self.cfg.seed, release, denominator)

    def record(self, clip_norms: np.ndarray, client_ids: np.ndarray, release: int, denominator: int) -> None:
        """After a release: the adaptive clip updated from the accepted uploads' ``clip_norms``, the release
        recorded in the ledger (with its multiplicity: the most uploads one client made to it)."""
        p = self.p
        if p.adaptive_quantile > 0:
            draw = float(gaussian(self.cfg.seed, "dp_clip", release, 1, count_noise(self.cfg))[0])
            self.clip = adaptive_clip(self.clip, unclipped_count(clip_norms, self.clip), draw, denominator,
                                      p.adaptive_quantile, p.adaptive_lr)
        self.ledger.record(max(Counter(np.asarray(client_ids).tolist()).values()))
        self.epsilon = self.ledger.epsilon()

    def mean(self, vectors: np.ndarray, client_ids: np.ndarray, keys: int | np.ndarray, release: int,
             denominator: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The released mean of one release from individual finite uploads on the driver (FedAsync's one update):
        (sum_i (f_i v_i [+ N_i]) [+ N]) / m, reduced exactly as the workers reduce a synchronous round and as a
        FedBuff buffer is reduced (``client.reduce.selected_partial``, with this ``reduction`` and ``finishing``).
        ``keys``: the round (or one refill key per client) of the clients' local noise; ``release``: the index of
        the release (the round, or the server update) keying the central and the count noise."""
        k = len(vectors)
        rows = np.arange(k)
        sel = Selection(np.zeros(k, np.int64), rows, self.reduction(client_ids, denominator),
                        np.broadcast_to(np.asarray(keys, np.int64), (k,)))
        fin = dataclasses.replace(self.finishing(client_ids, release, denominator), order=rows)
        summed, norms = selected_partial([vectors], sel, self.cfg.seed, vectors.shape[1])
        mean = release_mean([summed], fin, vectors.shape[1], torch.empty(0, dtype=dtype).numpy().dtype)
        self.record(norms, client_ids, release, denominator)  # the norms the rows were clipped by
        return torch.from_numpy(mean)

    def columns(self) -> dict[str, float]:
        """The rounds-table columns: ``dp_epsilon`` (spent so far, at ``privacy.delta``) and ``dp_clip`` (the C the
        next release clips to); NaN with privacy off, as every other column stores a missing value."""
        if not self.on:
            return {"dp_epsilon": math.nan, "dp_clip": math.nan}
        return {"dp_epsilon": self.epsilon, "dp_clip": self.clip}

    def state(self) -> dict[str, Any] | None:
        return {"clip": self.clip, "releases": self.ledger.state()} if self.on else None
