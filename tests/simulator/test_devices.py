"""Device heterogeneity: distribution draws, durations, profiles, device and availability traces."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simulator.config.schema import ConfigError, Distribution
from simulator.experiment import load_config
from simulator.scheduling.devices import (
    MBIT,
    AvailabilityTrace,
    Devices,
    DeviceTrace,
    Profiles,
    client_durations,
    draw,
)

HEADER = "client_id,compute_speed,up_bw,down_bw\n"


def make_devices(*overrides: str, seed: int = 0) -> Devices:
    cfg = load_config(None, list(overrides))
    return Devices(cfg.devices, seed)


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- draw


def test_constant_and_zero_sigma_lognormal_return_the_median_exactly():
    rng = np.random.default_rng(0)
    assert draw(Distribution("constant", 50.0, sigma=3.0), rng) == 50.0
    assert draw(Distribution("lognormal", 7.5, sigma=0.0), rng) == 7.5


@pytest.mark.parametrize("dist", [Distribution("lognormal", 40.0, sigma=1.0), Distribution("pareto", 40.0, shape=1.0),
                                  Distribution("pareto", 40.0, shape=2.5)], ids=["lognormal", "pareto1", "pareto2.5"])
def test_sample_median_is_the_median(dist):
    rng = np.random.default_rng(1)
    values = np.array([draw(dist, rng) for _ in range(20_000)])
    assert np.all(values > 0)
    # the standard error of the sample median is below 1% here, so 3% is a > 3-sigma band
    assert abs(np.median(values) / 40.0 - 1) < 0.03


def test_pareto_has_a_heavy_slow_tail_and_lognormal_does_not():
    rng = np.random.default_rng(2)
    pareto = np.array([draw(Distribution("pareto", 100.0, shape=1.0), rng) for _ in range(20_000)])
    lognormal = np.array([draw(Distribution("lognormal", 100.0, sigma=0.5), rng) for _ in range(20_000)])
    # pareto(1): speed = 2 * median * (1 - u), so its 1% quantile is 0.02 * median = 2
    assert np.quantile(pareto, 0.01) < 100.0 / 10
    assert np.quantile(pareto, 0.01) == pytest.approx(2.0, rel=0.2)
    # fast side is bounded: u = 0 gives the largest rate, 2^(1/shape) * median = 200
    assert pareto.max() <= 200.0
    # lognormal(0.5): 1% quantile is median * exp(-2.326 * 0.5) = 31.3
    assert np.quantile(lognormal, 0.01) > 100.0 / 10
    assert np.quantile(lognormal, 0.01) == pytest.approx(31.3, rel=0.05)


def test_draw_always_consumes_the_same_randomness():
    after = []
    for dist in (Distribution("constant", 1.0), Distribution("lognormal", 1.0, 2.0), Distribution("pareto", 1.0)):
        rng = np.random.default_rng(3)
        draw(dist, rng)
        after.append(rng.random())
    reference = np.random.default_rng(3)
    reference.random()
    reference.standard_normal()
    assert after == [reference.random()] * 3


def test_draw_matches_the_formulas_on_a_fixed_stream():
    rng = np.random.default_rng(4)
    u, z = rng.random(), rng.standard_normal()
    assert draw(Distribution("lognormal", 10.0, sigma=0.5), np.random.default_rng(4)) == pytest.approx(
        10.0 * np.exp(0.5 * z))
    assert draw(Distribution("pareto", 10.0, shape=2.0), np.random.default_rng(4)) == pytest.approx(
        10.0 * 2.0 ** 0.5 * (1 - u) ** 0.5)


# ---------------------------------------------------------------- durations


def test_client_durations_by_hand():
    profiles = Profiles(np.array([0, 1]), compute_speed=np.array([50.0, 25.0]), up_bw=np.array([1.0, 0.5]),
                        down_bw=np.array([2.0, 4.0]))
    out = client_durations(profiles, np.array([100, 100]), model_bytes=250_000, update_bytes=125_000)
    # client 0: 250000 / (2 * 125000) + 100 / 50 + 125000 / (1 * 125000) = 1 + 2 + 1 = 4
    # client 1: 250000 / (4 * 125000) + 100 / 25 + 125000 / (0.5 * 125000) = 0.5 + 4 + 2 = 6.5
    assert out.tolist() == [4.0, 6.5]
    assert MBIT == 125_000.0


def test_constant_devices_give_hand_computed_durations():
    dev = make_devices('devices.speed={dist="constant", median=50.0}',
                       'devices.bandwidth={dist="constant", median=2.0}', "devices.uplink_ratio=0.5")
    prof = dev.profiles(np.array([0, 9, 123456]))
    assert prof.compute_speed.tolist() == [50.0] * 3
    assert prof.down_bw.tolist() == [2.0] * 3
    assert prof.up_bw.tolist() == [1.0] * 3
    # 250000 / (2 MBIT) + 100 / 50 + 125000 / (1 MBIT) = 1 + 2 + 1
    assert client_durations(prof, np.full(3, 100), 250_000, 125_000).tolist() == [4.0] * 3


# ---------------------------------------------------------------- drawn profiles


def test_profiles_are_per_client_and_independent_of_the_call():
    dev = make_devices("devices.uplink_ratio=0.25", seed=5)
    ids = np.array([3, 7, 11, 1000])
    full = dev.profiles(ids)
    assert full.client_ids.tolist() == ids.tolist()
    assert np.all(full.compute_speed > 0) and np.all(full.down_bw > 0)
    assert len(set(full.compute_speed.tolist())) == 4  # lognormal(sigma=1): all distinct
    # subset and reversed order give each client the same profile
    part = dev.profiles(np.array([1000, 7]))
    assert part.compute_speed.tolist() == [full.compute_speed[3], full.compute_speed[1]]
    assert part.down_bw.tolist() == [full.down_bw[3], full.down_bw[1]]
    single = dev.profiles(np.array([11]))
    assert single.compute_speed[0] == full.compute_speed[2]
    # a fresh Devices (another process, say) agrees
    again = make_devices("devices.uplink_ratio=0.25", seed=5).profiles(ids)
    assert np.array_equal(again.compute_speed, full.compute_speed)
    # uplink = ratio x downlink
    assert np.array_equal(full.up_bw, full.down_bw * 0.25)


def test_profiles_change_with_the_seed():
    ids = np.arange(10)
    a = make_devices(seed=0).profiles(ids)
    b = make_devices(seed=1).profiles(ids)
    assert not np.any(a.compute_speed == b.compute_speed)
    assert not np.any(a.down_bw == b.down_bw)


# ---------------------------------------------------------------- device trace

TRACE_ROWS = [(0, 10.0, 1.0, 2.0), (1, 20.0, 3.0, 4.0), (2, 30.0, 5.0, 6.0)]


def test_device_trace_csv_and_parquet_agree_with_modulo_rows(tmp_path):
    # rows given out of order: 2, 0, 1
    rows = [TRACE_ROWS[2], TRACE_ROWS[0], TRACE_ROWS[1]]
    csv = write(tmp_path, "t.csv", HEADER + "".join(f"{c},{s},{u},{d}\n" for c, s, u, d in rows))
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({name: [r[i] for r in rows] for i, name in enumerate(DeviceTrace.COLUMNS)}), parquet)
    ids = np.array([0, 1, 2, 3, 4, 8])  # 3 -> row 0, 4 -> row 1, 8 -> row 2
    for path in (csv, parquet):
        dev = make_devices(f'devices.trace="{path}"')
        prof = dev.profiles(ids)
        assert prof.client_ids.tolist() == ids.tolist()
        assert prof.compute_speed.tolist() == [10.0, 20.0, 30.0, 10.0, 20.0, 30.0]
        assert prof.up_bw.tolist() == [1.0, 3.0, 5.0, 1.0, 3.0, 5.0]
        assert prof.down_bw.tolist() == [2.0, 4.0, 6.0, 2.0, 4.0, 6.0]
        # the trace's own uplink wins over devices.uplink_ratio
        # client 4 uses row 1: 250000 / (4 MBIT) + 100 / 20 + 125000 / (3 MBIT) = 0.5 + 5 + 1/3
        assert client_durations(dev.profiles(np.array([4])), np.array([100]), 250_000, 125_000)[0] == pytest.approx(
            5.5 + 1 / 3)


BAD_TRACES = [
    # (CSV content, substring of the message)
    ("client_id,compute_speed,up_bw\n0,1,1\n", "lacks the column(s) down_bw"),
    (HEADER + "0,fast,1,1\n", "compute_speed must be numeric"),
    (HEADER + "0,0,1,1\n", "compute_speed must be > 0"),
    (HEADER + "0,-5,1,1\n", "compute_speed must be > 0"),
    (HEADER + "0,1,0,1\n", "up_bw must be > 0"),
    (HEADER + "0,1,1,inf\n", "non-finite"),
    (HEADER + "0,,1,1\n", "empty values"),
    (HEADER + "1,1,1,1\n2,1,1,1\n", "client_id must be"),      # ids 1..2, not 0..1
    (HEADER + "0,1,1,1\n2,1,1,1\n", "client_id must be"),      # gap
    (HEADER + "0,1,1,1\n0,2,2,2\n1,1,1,1\n", "exactly once"),  # duplicate
    (HEADER, "has no rows"),
    ("", "cannot be read"),
]


@pytest.mark.parametrize(("content", "fragment"), BAD_TRACES, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_TRACES)])
def test_bad_device_trace_raises_config_error(tmp_path, content, fragment):
    path = write(tmp_path, "t.csv", content)
    with pytest.raises(ConfigError) as info:
        DeviceTrace(str(path))
    assert "devices.trace" in str(info.value)
    assert fragment in str(info.value)


def test_missing_and_garbage_device_trace(tmp_path):
    with pytest.raises(ConfigError, match="devices.trace.*does not exist"):
        make_devices(f'devices.trace="{tmp_path / "nope.csv"}"')
    garbage = tmp_path / "t.parquet"
    garbage.write_bytes(b"\x00\xff\x13\x37 not parquet" * 8)
    with pytest.raises(ConfigError, match="devices.trace.*cannot be read as Parquet"):
        DeviceTrace(str(garbage))


def test_garbage_pq_trace_is_reported_as_parquet(tmp_path):
    garbage = tmp_path / "t.pq"
    garbage.write_bytes(b"\x00\xff\x13\x37 not parquet" * 8)
    with pytest.raises(ConfigError, match="cannot be read as Parquet"):
        DeviceTrace(str(garbage))


# ---------------------------------------------------------------- availability trace

AVAIL = "client_id,start,end\n1,5,15\n0,20,30\n0,0,10\n"  # client 0: [0,10) and [20,30); client 1: [5,15)


def test_availability_trace_intervals_are_half_open(tmp_path):
    trace = AvailabilityTrace(str(write(tmp_path, "a.csv", AVAIL)))
    assert trace.m == 2
    zero = np.array([0])
    assert [bool(trace.online(zero, t)[0]) for t in (0.0, 9.999, 10.0, 15.0, 20.0, 29.999, 30.0)] == [
        True, True, False, False, True, True, False]
    one = np.array([1])
    assert [bool(trace.online(one, t)[0]) for t in (4.999, 5.0, 14.999, 15.0)] == [False, True, True, False]
    # client c follows trace client c mod 2
    assert trace.online(np.array([0, 1, 2, 3, 5]), 7.0).tolist() == [True, True, True, True, True]
    assert trace.online(np.array([0, 1, 2, 3, 5]), 12.0).tolist() == [False, True, False, True, True]
    assert trace.online(np.array([4, 7]), 25.0).tolist() == [True, False]


def test_availability_trace_next_start(tmp_path):
    trace = AvailabilityTrace(str(write(tmp_path, "a.csv", AVAIL)))
    # starts are 0, 5, 20; strictly after the given time
    assert trace.next_start(-1.0) == 0.0
    assert trace.next_start(0.0) == 5.0
    assert trace.next_start(7.0) == 20.0
    assert trace.next_start(20.0) is None


def test_devices_with_availability_trace(tmp_path):
    path = write(tmp_path, "a.csv", AVAIL)
    dev = make_devices(f'devices.availability_trace="{path}"')
    assert dev.online(np.array([0, 1, 2]), 12.0, key=0).tolist() == [False, True, False]
    assert dev.next_online_time(12.0) == 20.0
    assert dev.next_online_time(25.0) is None
    # without a trace, a fresh draw may succeed at once
    assert make_devices().next_online_time(12.5) == 12.5
    assert make_devices("devices.availability=0.3").next_online_time(3.0) == 3.0


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("client_id,start,end\n0,5,5\n", "0 <= start < end"),
        ("client_id,start,end\n0,6,5\n", "0 <= start < end"),
        ("client_id,start,end\n0,-1,5\n", "0 <= start < end"),
        ("client_id,start\n0,5\n", "lacks the column(s) end"),
        ("client_id,start,end\n0,0,1\n2,0,1\n", "client_id must be"),
        ("client_id,start,end\n", "has no rows"),
    ],
)
def test_bad_availability_trace(tmp_path, content, fragment):
    path = write(tmp_path, "a.csv", content)
    with pytest.raises(ConfigError) as info:
        make_devices(f'devices.availability_trace="{path}"')
    assert "devices.availability_trace" in str(info.value)
    assert fragment in str(info.value)


def test_availability_trace_repeated_ids_are_allowed(tmp_path):
    # unlike the device trace, a client may have many rows (one per interval)
    trace = AvailabilityTrace(str(write(tmp_path, "a.csv", "client_id,start,end\n0,0,1\n0,2,3\n0,4,5\n")))
    assert trace.m == 1
    assert [bool(trace.online(np.array([7]), t)[0]) for t in (0.5, 1.5, 2.5, 3.5, 4.5)] == [
        True, False, True, False, True]


# ---------------------------------------------------------------- availability probability and dropout


def test_availability_probability():
    ids = np.arange(4000)
    dev = make_devices("devices.availability=0.5", seed=3)
    up = dev.online(ids, 0.0, key=7)
    # binomial(4000, 0.5): std 32, so +-150 is ~4.7 sigma
    assert abs(int(up.sum()) - 2000) < 150
    # per (seed, key, client): order, subset, time and a fresh object do not matter
    few, up_few = ids[:400], up[:400]
    assert np.array_equal(dev.online(few[::-1], 0.0, key=7), up_few[::-1])
    assert dev.online(np.array([17, 5]), 0.0, key=7).tolist() == [up[17], up[5]]
    assert np.array_equal(dev.online(few, 99.5, key=7), up_few)
    assert np.array_equal(make_devices("devices.availability=0.5", seed=3).online(few, 0.0, key=7), up_few)
    # another key (round) or seed redraws: about half of the clients change (std 0.025 over 400)
    assert 0.4 < np.mean(dev.online(few, 0.0, key=8) != up_few) < 0.6
    assert 0.4 < np.mean(make_devices("devices.availability=0.5", seed=4).online(few, 0.0, key=7) != up_few) < 0.6


def test_full_availability_means_everyone_is_online():
    assert make_devices().online(np.arange(500), 3.0, key=1).all()
    assert make_devices("devices.availability=1.0").online(np.array([4, 2]), 0.0, key=0).tolist() == [True, True]


def test_dropout_fraction():
    ids = np.arange(4000)
    assert np.isnan(make_devices().dropout_fraction(ids[:50], key=0)).all()  # dropout 0: everyone completes
    dev = make_devices("devices.dropout=0.3", seed=2)
    frac = dev.dropout_fraction(ids, key=5)
    drops = ~np.isnan(frac)
    # binomial(4000, 0.3): std 29, so +-130 is ~4.5 sigma
    assert abs(int(drops.sum()) - 1200) < 130
    assert np.all((frac[drops] >= 0) & (frac[drops] < 1))
    assert 0.45 < frac[drops].mean() < 0.55  # uniform fraction of the duration
    few = ids[:400]
    assert np.array_equal(dev.dropout_fraction(few[::-1], key=5)[::-1], frac[:400], equal_nan=True)
    # another key redraws: P(drop status differs) = 2 * 0.3 * 0.7 = 0.42
    assert 0.3 < np.mean(np.isnan(dev.dropout_fraction(few, key=6)) != ~drops[:400]) < 0.55


def test_fractional_client_ids_are_rejected(tmp_path):
    path = tmp_path / "f.csv"
    path.write_text("client_id,compute_speed,up_bw,down_bw\n0.7,10,1,1\n1.2,20,1,1\n")
    with pytest.raises(ConfigError, match="devices.trace.*whole numbers"):
        DeviceTrace(str(path))


def test_profile_cache_is_bounded_and_changes_nothing(monkeypatch):
    import simulator.scheduling.devices as devices_module

    monkeypatch.setattr(devices_module, "PROFILE_CACHE", 8)
    cfg = load_config(None, ['devices.speed={dist="pareto", median=100.0, shape=1.0}'])
    cached = Devices(cfg.devices, cfg.seed)
    ids = np.arange(30)
    first = cached.profiles(ids)
    again = cached.profiles(ids[::-1])  # mostly evicted by now; some served from the cache
    assert len(cached._cache) == 8
    fresh = Devices(cfg.devices, cfg.seed).profiles(ids[::-1])
    for name in ("compute_speed", "up_bw", "down_bw"):
        np.testing.assert_array_equal(getattr(again, name), getattr(fresh, name))
        np.testing.assert_array_equal(getattr(first, name), getattr(fresh, name)[::-1])
