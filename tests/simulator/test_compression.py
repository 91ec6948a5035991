"""Compressed uploads: every encoder's round trip and size, QSGD's unbiasedness, the config checks, and a run.

Sizes are the encodings of ``simulator.compression`` (d values, k kept): none 4d, fp16 2d, int8 d + 4, QSGD
4 + ceil(d (ceil(log2(s + 1)) + 1) / 8), randk 4k + 8, topk 8k.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import small_overrides

from actors.inline import InlineBackend
from simulator.compression import compress, decompress, encoded_bytes, kept, roundtrip
from simulator.config.schema import CompressionConfig, ConfigError
from simulator.contract import WorkerSpec
from simulator.experiment import load_config
from simulator.rng import generator
from simulator.rounds.run import run

D = 1000
V = np.random.default_rng(7).standard_normal(D).astype(np.float32) * np.float32(0.01)


def c(method: str, **kw) -> CompressionConfig:
    return CompressionConfig(method=method, **kw)


def rng(i: int = 0) -> np.random.Generator:
    return generator(0, "compress", 0, i)


@pytest.mark.parametrize(("cfg", "size"), [
    (c("none"), 4000), (c("fp16"), 2000), (c("int8"), 1004),
    (c("qsgd", levels=16), 4 + 750),     # ceil(log2 17) + 1 = 6 bits: 6000 bits = 750 B
    (c("qsgd", levels=1), 4 + 250),      # 1 + 1 = 2 bits
    (c("qsgd", levels=255), 4 + 1125),   # 8 + 1 = 9 bits
    (c("randk", fraction=0.1), 408), (c("topk", fraction=0.1), 800), (c("topk", fraction=0.0001), 8)])
def test_encoded_bytes(cfg, size):
    assert encoded_bytes(cfg, D) == size


def test_kept_is_floor_of_the_fraction_at_least_one():
    assert [kept(100, f) for f in (0.29, 0.1, 1.0, 0.001)] == [29, 10, 100, 1]


def test_none_and_fp16_round_trips():
    assert np.array_equal(roundtrip(V, c("none"), rng()), V)
    out = roundtrip(V, c("fp16"), rng())
    # IEEE half: 11 significant bits, so |error| <= 2^-11 |v| for normal values, <= 2^-25 (half the subnormal
    # spacing 2^-24) below 2^-14
    assert np.all(np.abs(out - V) <= np.maximum(np.abs(V) * 2.0**-11, 2.0**-25))
    assert np.array_equal(out, V.astype(np.float16).astype(np.float32))


def test_int8_is_off_by_at_most_half_a_step():
    e = compress(V, c("int8"), rng())
    s = np.float32(np.abs(V).max() / 127)
    assert e.values.dtype == np.int8 and e.scale == s and np.abs(e.values).max() == 127
    out = decompress(e)
    # rounding to the nearest code: s / 2; the float32 decode adds at most 2^-24 |q s| <= 2^-24 127 s
    assert np.all(np.abs(out - V) <= s * (0.5 + 127 * 2.0**-24))
    assert np.array_equal(roundtrip(np.zeros(5, np.float32), c("int8"), rng()), np.zeros(5, np.float32))


def test_topk_keeps_exactly_the_k_largest():
    out = roundtrip(V, c("topk", fraction=0.05), rng())
    k = 50
    nonzero = np.flatnonzero(out)
    assert nonzero.size == k
    assert set(nonzero) == set(np.argsort(-np.abs(V))[:k])
    assert np.array_equal(out[nonzero], V[nonzero])
    assert np.abs(V[out == 0]).max() <= np.abs(V[nonzero]).min()
    # ties go to the lower index
    assert np.flatnonzero(roundtrip(np.array([1, -2, 2, 2, 0.5], np.float32), c("topk", fraction=0.4), rng())
                          ).tolist() == [1, 2]


def test_randk_is_seeded_and_scaled_by_d_over_k():
    cfg = c("randk", fraction=0.1)
    a, b, other = roundtrip(V, cfg, rng(3)), roundtrip(V, cfg, rng(3)), roundtrip(V, cfg, rng(4))
    assert np.array_equal(a, b) and not np.array_equal(a, other)
    idx = np.flatnonzero(a)
    assert idx.size == 100
    assert np.array_equal(a[idx], (V[idx].astype(np.float64) * 10.0).astype(np.float32))
    # the server rebuilds the indices from the 8-byte seed alone
    e = compress(V, cfg, rng(3))
    assert e.indices is None and e.values.size == 100 and np.array_equal(decompress(e), a)


def test_qsgd_levels_and_norm():
    e = compress(V, c("qsgd", levels=4), rng())
    assert e.scale == float(np.float32(np.linalg.norm(V.astype(np.float64))))
    assert np.abs(e.values).max() <= 4
    r = np.abs(V.astype(np.float64)) / e.scale * 4
    # each level is floor or ceil of |v_i| s / ||v||, with v_i's sign
    assert np.all((np.abs(e.values) == np.floor(r)) | (np.abs(e.values) == np.ceil(r)))
    assert np.all(np.sign(e.values) * np.sign(V) >= 0)


def test_qsgd_is_unbiased():
    # mean of N independent quantizations: E ||mean - v||^2 = sum_i Var(Q_i) / N exactly, with
    # Var(Q_i) = (||v|| / s)^2 p_i (1 - p_i), p_i the fractional part of |v_i| s / ||v|| (a Bernoulli level);
    # Alistarh et al.'s Lemma 3.1 bounds the sum by min(d / s^2, sqrt(d) / s) ||v||^2. Markov's inequality puts
    # ||mean - v||^2 above 4x its expectation with probability <= 1/4 (the draws are fixed by their seeds).
    s, n = 4, 400
    cfg = c("qsgd", levels=s)
    mean = np.mean([roundtrip(V, cfg, rng(i)).astype(np.float64) for i in range(n)], axis=0)
    norm = float(np.float32(np.linalg.norm(V.astype(np.float64))))
    r = np.abs(V.astype(np.float64)) / norm * s
    p = r - np.floor(r)
    variance = float(((norm / s) ** 2 * p * (1 - p)).sum())
    assert variance <= min(D / s**2, math.sqrt(D) / s) * norm**2
    err = float(((mean - V) ** 2).sum())
    assert err <= 4 * variance / n
    assert err < 0.05 * float((V.astype(np.float64) ** 2).sum())  # and far below the signal


@pytest.mark.parametrize(("key", "value", "message"), [
    ("compression.method", '"zip"', r"compression\.method = 'zip' is not supported"),
    ("compression.levels", 0, r"compression\.levels must be in \[1, 65535\]"),
    ("compression.fraction", 0.0, r"compression\.fraction must be in \(0, 1\]"),
    ("compression.fraction", 1.5, r"compression\.fraction must be in \(0, 1\]"),
])
def test_bad_compression_keys_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, small_overrides() + [f"{key}={value}"])


def _run(tmp_path, **extra) -> pd.DataFrame:
    cfg = load_config(None, small_overrides(**{"system.backend": "inline", **extra}))
    with InlineBackend(WorkerSpec.from_config(cfg), cfg.system) as backend:
        run(cfg, backend, tmp_path)
    return pd.read_parquet(tmp_path / "rounds.parquet")


def test_a_run_charges_the_compressed_bytes_and_upload_time(tmp_path):
    constant = {"devices.speed": {"dist": "constant", "median": 100.0},
                "devices.bandwidth": {"dist": "constant", "median": 0.1}}
    overrides = {f"{k}.{sub}": v for k, d in constant.items() for sub, v in d.items()}
    plain = _run(tmp_path / "plain", **overrides)
    top = _run(tmp_path / "topk", **overrides, **{"compression.method": "topk", "compression.fraction": 0.1})
    p = 1761  # the default MLP's parameters
    assert (plain["bytes_up"] == 6 * 4 * p).all()
    assert (top["bytes_up"] == 6 * 8 * kept(p, 0.1)).all() and (top["bytes_down"] == plain["bytes_down"]).all()
    # every client: download 4p B at 0.1 Mbit/s, 20 samples at 100/s, upload at 0.05 Mbit/s
    up, down = 0.05 * 125_000, 0.1 * 125_000
    np.testing.assert_allclose(plain["round_sim_duration_s"], 4 * p / down + 0.2 + 4 * p / up, rtol=1e-12)
    np.testing.assert_allclose(top["round_sim_duration_s"], 4 * p / down + 0.2 + 8 * 176 / up, rtol=1e-12)
    assert not np.allclose(plain["update_norm"], top["update_norm"])
