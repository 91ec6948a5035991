"""Differential privacy: clipping bounds, the noise's scale, accounting against a published example and the
library's own composition, calibration, bad input (simulator.privacy)."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from conftest import small_overrides
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from actors.cli import main
from simulator.config.schema import ConfigError
from simulator.experiment import load_config, replace
from simulator.privacy.accounting import ORDERS, REPLACE_ONE, Ledger, planned_epsilon, release_event
from simulator.privacy.clipping import SAFETY, adaptive_clip, clip_factors, update_norms
from simulator.privacy.mechanism import Privacy


def _cfg(*extra: str, **kw: object):
    return load_config(None, small_overrides(**{"system.backend": "inline", **kw}) + list(extra))


CENTRAL = ['privacy.mode="central"']


def test_clipping_bounds_every_contribution_exactly():
    rng = np.random.default_rng(0)
    scales = np.array([1e-3, 0.5, 0.69999, 0.7, 0.70001, 3.0, 1e6, 0.0])
    v = (rng.standard_normal((len(scales), 5000)) * scales[:, None] / math.sqrt(5000)).astype(np.float32)
    norms = update_norms(v)
    f = clip_factors(norms, 0.7)
    contrib = torch.from_numpy(f[:, None] * v.astype(np.float64))
    out = torch.linalg.vector_norm(contrib, dim=1).numpy()
    assert np.all(out <= 0.7)  # exactly, in float64
    over = norms > 0.7
    assert over.sum() >= 3 and np.all(out[over] >= 0.7 * (1 - 2 * SAFETY))
    assert np.all(f[~over] == 1.0)  # within the ball: not a bit changes


def test_one_client_moves_the_released_sum_by_at_most_2c():
    """Replace-one sensitivity of the central mechanism (sigma = 0): ||m (mean - mean')|| <= 2 C."""
    cfg = _cfg(*CENTRAL, "privacy.clip=0.3")
    rng = np.random.default_rng(1)
    v = rng.standard_normal((6, 200)).astype(np.float32)
    ids = np.arange(6)
    a = Privacy(cfg).mean(v, ids, 0, 0, 6, dtype=torch.float64)
    w = v.copy()
    w[2] = -100 * v[2]
    b = Privacy(cfg).mean(w, ids, 0, 0, 6, dtype=torch.float64)
    assert 0 < float(torch.linalg.vector_norm(6 * (a - b))) <= 2 * 0.3


def test_central_noise_std_is_sigma_c_over_m():
    """Zero uploads: the released mean is N(0, (sigma C / m)^2) per coordinate. Over n = R x P draws the sample
    std s has s / sd - 1 ~ N(0, 1 / (2 (n - 1))) (chi distribution), the mean ~ N(0, sd^2 / n): 6-sigma bounds."""
    sigma, clip, m, size, releases = 1.5, 0.8, 5, 500, 200
    cfg = _cfg(*CENTRAL, f"privacy.noise_multiplier={sigma}", f"privacy.clip={clip}")
    dp = Privacy(cfg)
    draws = np.stack([dp.mean(np.zeros((3, size), np.float32), np.arange(3), r, r, m,
                              dtype=torch.float64).numpy() for r in range(releases)])
    n, sd = draws.size, sigma * clip / m
    assert abs(draws.std(ddof=1) / sd - 1) < 6 / math.sqrt(2 * (n - 1))
    assert abs(draws.mean()) < 6 * sd / math.sqrt(n)
    assert not np.array_equal(draws[0], draws[1])  # a fresh stream per release


def test_local_noise_is_per_client_and_seeded():
    cfg = _cfg('privacy.mode="local"', "privacy.noise_multiplier=2.0", "privacy.clip=0.5")
    zeros = np.zeros((4, 3000), np.float32)
    a = Privacy(cfg).mean(zeros, np.arange(4), 7, 7, 4, dtype=torch.float64).numpy()
    b = Privacy(cfg).mean(zeros, np.arange(4), 7, 7, 4, dtype=torch.float64).numpy()
    assert np.array_equal(a, b)
    # the sum of 4 independent N(0, (sigma C)^2) over m = 4: std sigma C / 2 = 0.5
    assert abs(a.std(ddof=1) / 0.5 - 1) < 6 / math.sqrt(2 * (a.size - 1))


def test_rdp_reproduces_the_tensorflow_privacy_tutorial():
    """tensorflow/privacy tutorials/README.md, "Select Parameters" (MNIST DP-SGD, Abadi et al. 2016): n = 60,000,
    batch 256, delta = 1e-5; noise 1.12 for 60 epochs -> eps 2.92, noise 1.2 for 10 epochs -> eps 1.20, printed to
    2 decimals. The tutorial's accountant is RDP of the Poisson-sampled Gaussian with Mironov's conversion
    (2017, Prop. 3) over orders 1.1..10.9 and 12..63; dp-accounting's RDP with that conversion gives them, and its
    own tighter conversion (Canonne et al. 2020) gives less."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for sigma, epochs, published in ((1.12, 60, 2.92), (1.2, 10, 1.20)):
        acc = rdp.RdpAccountant(orders)
        acc.compose(dpa.PoissonSampledDpEvent(256 / 60000, dpa.GaussianDpEvent(sigma)), epochs * 60000 // 256)
        classic = min(r - math.log(1e-5) / (a - 1) for a, r in zip(orders, acc._rdp, strict=True))
        assert abs(classic - published) <= 0.005
        assert acc.get_epsilon(1e-5) < classic


def test_the_ledger_equals_the_library_composing_every_round():
    cfg = _cfg(*CENTRAL, "privacy.noise_multiplier=1.3", "privacy.delta=1e-4")
    event = dpa.SampledWithoutReplacementDpEvent(24, 6, dpa.GaussianDpEvent(1.3 / 2))
    assert release_event(cfg) == event
    acc = rdp.RdpAccountant(list(ORDERS), REPLACE_ONE)
    acc.compose(event, 7)
    assert planned_epsilon(cfg, 7) == pytest.approx(acc.get_epsilon(1e-4), rel=1e-12)
    # async: no amplification; a client twice in one buffer doubles the sensitivity
    a = _cfg(*CENTRAL, "privacy.noise_multiplier=1.3", 'system.mode="async"')
    acc = rdp.RdpAccountant(list(ORDERS), REPLACE_ONE)
    acc.compose(dpa.ComposedDpEvent([dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(1.3 / 2), 5),
                                     dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(1.3 / 4), 2)]))
    assert Ledger(a, {1: 5, 2: 2}).epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # adaptive clipping's count is a second Gaussian, sigma_b = per_round / 20 by default
    ad = _cfg(*CENTRAL, "privacy.noise_multiplier=1.3", "privacy.adaptive_quantile=0.5")
    assert release_event(ad) == dpa.SampledWithoutReplacementDpEvent(
        24, 6, dpa.ComposedDpEvent([dpa.GaussianDpEvent(0.65), dpa.GaussianDpEvent(6 / 20)]))


def test_no_noise_is_infinite_epsilon_and_off_is_nan():
    assert planned_epsilon(_cfg(*CENTRAL), 3) == math.inf
    assert all(math.isnan(v) for v in Privacy(_cfg()).columns().values())


def test_adaptive_clip_follows_the_geometric_rule():
    """Andrew et al. 2021, Alg. 1: all 10 unclipped (b = 1) with gamma = 0.5, eta = 0.2: C exp(-0.1)."""
    assert adaptive_clip(2.0, 10, 0.0, 10, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.1), rel=1e-15)
    assert adaptive_clip(2.0, 0, 0.0, 10, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1), rel=1e-15)


def test_calibration_meets_the_target_with_the_smallest_sigma():
    cfg = _cfg(*CENTRAL, "privacy.target_epsilon=4.0", rounds=20)
    sigma = cfg.privacy.noise_multiplier
    assert sigma > 0 and planned_epsilon(cfg, 20) <= 4.0
    lower = replace(cfg, **{"privacy.noise_multiplier": sigma * 0.99})
    assert planned_epsilon(lower, 20) > 4.0


BAD = [
    (["privacy.clip=-1.0"], "privacy.clip must be > 0"),
    (["privacy.noise_multiplier=-0.5"], "privacy.noise_multiplier must be >= 0"),
    (["privacy.delta=1.0"], "privacy.delta must be in (0, 1)"),
    (["privacy.delta=0.0"], "privacy.delta must be in (0, 1)"),
    (['privacy.mode="global"'], "privacy.mode = 'global' is not supported"),
    (["privacy.adaptive_quantile=1.5"], "privacy.adaptive_quantile must be 0"),
    (['privacy.mode="local"', "privacy.adaptive_quantile=0.5"], "needs privacy.mode = \"central\""),
    (CENTRAL + ["privacy.target_epsilon=3.0", 'system.mode="async"'], "in async mode set privacy.noise_multiplier"),
]


@pytest.mark.parametrize(("extra", "needle"), BAD, ids=[b[1] for b in BAD])
def test_bad_privacy_input_is_one_config_error(extra, needle):
    with pytest.raises(ConfigError, match=None) as err:
        _cfg(*extra)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_privacy_input_exits_2(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["run", "--out", str(out), "--no-progress", "--set", "privacy.clip=-1.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metafleet: error: privacy.clip must be > 0") and err.count("\n") == 1
    assert not out.exists()
