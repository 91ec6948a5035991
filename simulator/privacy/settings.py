"""The ``[privacy]`` table: its checks (one ``ConfigError`` line naming the key and the fix) and the up-front
calibration of sigma for a target epsilon. Called by ``simulator.experiment.from_dict``.

Which keys select which behaviour (README "Differential privacy"):

- ``target_epsilon = 0``: no budget; the run spends whatever ``noise_multiplier`` costs (sigma = 0: clipping
  only, epsilon infinite).
- ``target_epsilon > 0`` and ``noise_multiplier > 0``: the budget stop. Before each release the driver asks
  whether it would take epsilon past the target; if so the run stops there with status ``budget_exhausted``.
- ``target_epsilon > 0`` and ``noise_multiplier = 0``: sigma is calibrated up front so that ``rounds`` rounds
  stay within the target, and written into the resolved config (``config.toml``); since that config then has
  sigma > 0, extending it with ``--resume --set rounds=...`` stops at the budget.
"""

from __future__ import annotations

import dataclasses

from simulator.config.schema import ConfigError, ExperimentConfig
from simulator.privacy.accounting import calibrate_noise

MODES = ("off", "central", "local")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_privacy(cfg: ExperimentConfig) -> ExperimentConfig:
    """Validate ``cfg.privacy``; with a target epsilon and sigma = 0, return ``cfg`` with sigma calibrated."""
    p = cfg.privacy
    _require(p.mode in MODES, f"privacy.mode = {p.mode!r} is not supported; choose one of {', '.join(MODES)}")
    _require(p.clip > 0, f"privacy.clip must be > 0 (the L2 norm C each client's update is clipped to), got {p.clip}")
    _require(p.noise_multiplier >= 0,
             f"privacy.noise_multiplier must be >= 0 (sigma: the noise std is sigma * clip), got {p.noise_multiplier}")
    _require(0 < p.delta < 1, f"privacy.delta must be in (0, 1), e.g. 1e-5 (below 1 / data.num_clients), got {p.delta}")
    _require(p.target_epsilon >= 0, f"privacy.target_epsilon must be >= 0 (0 = no budget), got {p.target_epsilon}")
    _require(p.adaptive_quantile == 0 or 0 < p.adaptive_quantile < 1,
             f"privacy.adaptive_quantile must be 0 (fixed clipping) or a quantile in (0, 1), got {p.adaptive_quantile}")
    _require(p.adaptive_lr > 0,
             f"privacy.adaptive_lr must be > 0 (Andrew et al.'s eta_C, e.g. 0.2), got {p.adaptive_lr}")
    _require(p.adaptive_noise >= 0,
             f"privacy.adaptive_noise must be >= 0 (0 = clients.per_round / 20), got {p.adaptive_noise}")
    if p.mode == "off":
        return cfg
    _require(p.adaptive_quantile == 0 or p.mode == "central",
             "privacy.adaptive_quantile needs privacy.mode = \"central\" (adaptive clipping estimates the quantile "
             "from a server-side noised count); set privacy.adaptive_quantile = 0 for local DP")
    if p.target_epsilon > 0 and p.noise_multiplier == 0:
        _require(cfg.system.mode != "async",
                 "privacy.target_epsilon with privacy.noise_multiplier = 0 calibrates sigma up front, which needs "
                 "the rounds known in advance; in async mode set privacy.noise_multiplier > 0 (the run then stops "
                 "at the budget)")
        sigma = calibrate_noise(cfg)
        cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(p, noise_multiplier=sigma))
    return cfg
