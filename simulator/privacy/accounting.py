"""Privacy accounting with Google's ``dp-accounting`` library: the DpEvent of each release, and epsilon.

What is accounted is what metafleet does (README "Differential privacy"):

- **Sampling.** A synchronous round samples a fixed-size cohort of m' clients *without replacement* from the
  ``data.num_clients`` training clients (held-out clients are never sampled; m' = ``clients.per_round``, or
  ceil(overselect x per_round) in overselect mode, since any sampled client may be kept). Offline clients,
  drop-outs, deadline and over-selection cuts are decided from seeded device profiles, not from data, and only
  remove contributions. Fixed-size sampling is defined for *replace-one* adjacency (one client's data swapped for
  any other), the only relation ``dp-accounting`` accepts for ``SampledWithoutReplacementDpEvent`` (RDP of Wang,
  Balle & Kasiviswanathan 2019, Thm. 27). Under replace-one, a sum of vectors of norm <= C moves by up to 2C, so
  the Gaussian's noise multiplier relative to the sensitivity is sigma / 2.
- **Async** (FedBuff, FedAsync): no amplification by sampling is claimed; each server update is a Gaussian
  mechanism, and a client present k times in one buffer has sensitivity 2kC (multiplier sigma / (2k)).
- **Local DP**: each upload is a Gaussian mechanism on its own client (multiplier sigma / 2), no amplification;
  a release with k uploads of one client composes k of them, and the run's epsilon is that of a client taking
  part in every release (an upper bound over clients).
- **Adaptive clipping** (Andrew et al. 2021, Sec. 3.1) releases a noised count too: composed with the update's
  Gaussian as a second Gaussian of multiplier sigma_b / k (a count moves by at most k under replace-one).

Epsilon at ``privacy.delta`` is computed with RDP (``RdpAccountant``, the library's default orders and its
conversion to (epsilon, delta), Canonne, Kamath & Steinke 2020 Prop. 12). Rounds compose linearly in RDP, so
the RDP curve of each distinct release is computed once and scaled by its count. PLD accounting
(``PLDAccountant``) supports Poisson sampling only, not the fixed-size cohorts metafleet draws; it is not used.
"""

from __future__ import annotations

import dataclasses
import math

import dp_accounting as dpa
import numpy as np
from dp_accounting import mechanism_calibration
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from simulator.config.schema import ExperimentConfig
from simulator.scheduling.policies import cohort_size

#: RDP orders: the library's defaults (1.1 ... 10.9, 11 ... 63, 128 ... 1024) with 128 and 256, whose
#: sampled-without-replacement terms cost 0.23 s of a curve's 0.3 s, replaced by 72, 80 and 96 (orders that
#: high are optimal only for epsilon below about 0.2 at delta = 1e-5)
ORDERS = tuple(o for o in rdp.DEFAULT_RDP_ORDERS if o not in (128, 256)) + (72, 80, 96)
REPLACE_ONE = dpa.NeighboringRelation.REPLACE_ONE


def count_noise(cfg: ExperimentConfig) -> float:
    """sigma_b of adaptive clipping's count: ``privacy.adaptive_noise``, or m / 20 (Andrew et al. 2021, Sec. 4)."""
    return cfg.privacy.adaptive_noise or cfg.clients.per_round / 20.0


def release_event(cfg: ExperimentConfig, multiplicity: int = 1) -> dpa.DpEvent:
    """The DpEvent of one release (a round, or a server update in async mode) in which no client contributes
    more than ``multiplicity`` uploads (see the module docstring)."""
    p, k = cfg.privacy, multiplicity
    if p.mode == "local":
        return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(p.noise_multiplier / 2.0), k)
    parts: list[dpa.DpEvent] = [dpa.GaussianDpEvent(p.noise_multiplier / (2.0 * k))]
    if p.adaptive_quantile > 0:
        parts.append(dpa.GaussianDpEvent(count_noise(cfg) / k))
    inner = parts[0] if len(parts) == 1 else dpa.ComposedDpEvent(parts)
    if cfg.system.mode == "async":
        return inner
    n = cfg.data.num_clients
    m = cohort_size(cfg.system.mode, cfg.clients.per_round, cfg.system.overselect)
    return inner if m >= n else dpa.SampledWithoutReplacementDpEvent(n, m, inner)


def event_rdp(event: dpa.DpEvent) -> np.ndarray:
    """The RDP curve of one event at ``ORDERS`` under replace-one adjacency, from ``RdpAccountant``."""
    acc = rdp.RdpAccountant(list(ORDERS), REPLACE_ONE)
    acc.compose(event)
    return np.array(acc._rdp, np.float64)  # the accountant's own curve: no public getter; composition is additive


class Ledger:
    """The releases of a run: multiplicity k -> how many releases had k (1 for every synchronous round).
    ``epsilon`` composes them (RDP adds up) and converts at ``privacy.delta``; its state is checkpointed."""

    def __init__(self, cfg: ExperimentConfig, counts: dict[int, int] | None = None) -> None:
        self.cfg = cfg
        self.counts: dict[int, int] = dict(counts or {})
        self._curves: dict[int, np.ndarray] = {}

    def curve(self, k: int) -> np.ndarray:
        if k not in self._curves:
            self._curves[k] = event_rdp(release_event(self.cfg, k))
        return self._curves[k]

    def epsilon(self, extra: int = 0) -> float:
        """Epsilon at delta after the releases so far, plus one of multiplicity ``extra`` if > 0."""
        counts = dict(self.counts)
        if extra:
            counts[extra] = counts.get(extra, 0) + 1
        if not counts:
            return 0.0
        if self.cfg.privacy.noise_multiplier == 0:
            return math.inf
        total = sum(c * self.curve(k) for k, c in sorted(counts.items()))
        return float(rdp.compute_epsilon(list(ORDERS), total, self.cfg.privacy.delta)[0])

    def record(self, k: int) -> None:
        self.counts[k] = self.counts.get(k, 0) + 1

    def state(self) -> list[list[int]]:
        return [[k, c] for k, c in sorted(self.counts.items())]


def planned_epsilon(cfg: ExperimentConfig, releases: int) -> float:
    """Epsilon after ``releases`` releases of multiplicity 1 (a synchronous run's ``rounds``)."""
    return Ledger(cfg, {1: releases}).epsilon() if releases else 0.0


def calibrate_noise(cfg: ExperimentConfig, rel_tol: float = 2e-3) -> float:
    """The smallest sigma (to a relative ``rel_tol``, rounded up to 3 significant digits) with which
    ``cfg.rounds`` synchronous releases stay within ``privacy.target_epsilon`` at ``privacy.delta``
    (``dp_accounting.mechanism_calibration``: Brent's method, here on log sigma)."""
    p = cfg.privacy

    def event(log_sigma: float) -> dpa.DpEvent:
        c = dataclasses.replace(cfg, privacy=dataclasses.replace(p, noise_multiplier=math.exp(log_sigma)))
        return dpa.SelfComposedDpEvent(release_event(c, 1), cfg.rounds)

    x = mechanism_calibration.calibrate_dp_mechanism(
        lambda: rdp.RdpAccountant(list(ORDERS), REPLACE_ONE), event, p.target_epsilon, p.delta,
        mechanism_calibration.ExplicitBracketInterval(math.log(0.05), math.log(1e3)), tol=rel_tol)
    sigma = math.exp(x + rel_tol)  # Brent's root is within tol of the optimum, on either side
    digits = 2 - math.floor(math.log10(sigma))
    return float(math.ceil(sigma * 10**digits) / 10**digits)
