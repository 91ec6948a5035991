"""analysis.plots on small hand-made frames: series, labels, aggregated values, figure selection, saving."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis.load import RunSet  # noqa: E402
from analysis.plots import (  # noqa: E402
    PALETTE,
    _compressed,
    client_cdf,
    curves,
    drops,
    participation,
    personalization_gain,
    save_figures,
    staleness_histogram,
    standard_figures,
    throughput,
)

A, B, C = "algorithm.name=fomaml", "algorithm.name=maml", "algorithm.name=reptile"
SETTINGS = ((A, 1.0, (0, 1)), (B, 2.0, (0, 1)), (C, 3.0, (0,)))  # label, base loss, seeds (C has one)
EVAL_ROUNDS = (0, 2, 4)
NAN = math.nan


def _loss(base: float, seed: int, rnd: int) -> float:
    return base + seed - 0.1 * rnd


def _rounds(classification: bool = True, dropped: bool = False) -> pd.DataFrame:
    rows = []
    for label, base, seeds in SETTINGS:
        for seed in seeds:
            for rnd in range(5):
                evaluated = rnd in EVAL_ROUNDS
                loss = _loss(base, seed, rnd)
                rows.append({
                    "run": f"{label}-s{seed}", "label": label, "seed": seed, "round": rnd,
                    "sim_time_s": (rnd + 1) * (1.0 + 0.5 * seed), "wall_time_s": 0.5 * (rnd + 1),
                    "num_sampled": 4, "num_completed": 3, "num_dropped": 1 if dropped else 0,
                    "dropped_offline": 0, "dropped_dropout": 0, "dropped_deadline": 1 if dropped else 0,
                    "dropped_overselect": 0, "dropped_staleness": 0, "train_loss": loss + 0.5,
                    "eval_loss_pre": loss + 1.0 if evaluated else NAN, "eval_loss_post": loss if evaluated else NAN,
                    "eval_metric_pre": 0.5 if evaluated and classification else NAN,
                    "eval_metric_post": 0.6 + 0.1 * seed if evaluated and classification else NAN,
                })
    return pd.DataFrame(rows)


def _clients(stale: bool = True) -> pd.DataFrame:
    rows = []
    for label, _, seeds in SETTINGS:
        for seed in seeds:
            for rnd in range(5):
                for client in range(4):
                    kept = client != 3
                    rows.append({"run": f"{label}-s{seed}", "label": label, "seed": seed, "round": rnd,
                                 "client_id": client, "staleness": client % 2 if stale else 0, "dropped": not kept,
                                 "drop_reason": "" if kept else "deadline"})
    return pd.DataFrame(rows)


def _evals(classification: bool = True) -> pd.DataFrame:
    rows = []
    for label, base, seeds in SETTINGS:
        for seed in seeds:
            for rnd in EVAL_ROUNDS:
                for client in range(5):
                    loss = _loss(base, seed, rnd) + 0.1 * client
                    rows.append({"run": f"{label}-s{seed}", "label": label, "seed": seed, "round": rnd,
                                 "client_id": 100 + client, "loss_pre": loss + 1, "loss_post": loss,
                                 "metric_pre": 0.5 if classification else NAN,
                                 "metric_post": 0.6 if classification else NAN})
    return pd.DataFrame(rows)


def _runset(classification: bool = True, stale: bool = True, dropped: bool = False) -> RunSet:
    return RunSet([], [A, B, C], pd.DataFrame(), _rounds(classification, dropped), _clients(stale),
                  _evals(classification))


LEGEND = [f"{A} (n=2)", f"{B} (n=2)", f"{C} (n=1)"]
T_975_1 = math.tan(0.475 * math.pi)  # Student-t quantile t_{0.975, 1}: the Cauchy distribution's tan(pi (p - 1/2))


def _legend(fig: Figure) -> list[str]:
    legends = [leg for ax in fig.axes if (leg := ax.get_legend())] + list(fig.legends)
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def _bands(fig: Figure) -> int:
    return sum(isinstance(c, PolyCollection) for c in fig.axes[0].collections)


def test_palette_is_okabe_ito() -> None:
    okabe_ito = {"#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7"}
    assert len(PALETTE) == 8 and set(PALETTE) == okabe_ito


def test_curves_by_round_mean_band_and_labels() -> None:
    fig = curves(_rounds(), "eval_loss_post", "round")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3 and _bands(fig) == 2  # bands only for the labels with two seeds
    assert _legend(fig) == LEGEND
    assert ax.get_xlabel() == "round" and "cross-entropy" in ax.get_ylabel()
    assert "round" in ax.get_title() and "3 settings" in ax.get_title()
    assert list(lines[0].get_xdata()) == list(EVAL_ROUNDS)
    expected = [np.mean([_loss(1.0, s, r) for s in (0, 1)]) for r in EVAL_ROUNDS]
    np.testing.assert_allclose(lines[0].get_ydata(), expected)
    np.testing.assert_allclose(lines[2].get_ydata(), [_loss(3.0, 0, r) for r in EVAL_ROUNDS])
    # distinguishable without colour
    assert len({(line.get_linestyle(), line.get_marker()) for line in lines}) == 3
    assert plt.get_fignums() == []


def _band_ys(fig: Figure, index: int = 0) -> np.ndarray:
    bands = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    return np.unique(np.round(np.concatenate([p.vertices[:, 1] for p in bands[index].get_paths()]), 12))


def test_curves_band_is_the_t_interval_or_the_min_max_range() -> None:
    # setting A's two seeds are b and b + 1 at every round: mean b + 1/2, s = 1/sqrt(2), so the 95% t half-width
    # is t_{0.975,1} s / sqrt(2) = t_{0.975,1} / 2, and the min-max band is [b, b + 1]
    means = np.array([_loss(1.0, 0, r) + 0.5 for r in EVAL_ROUNDS])
    t_band = _band_ys(curves(_rounds(), "eval_loss_post", "round"))
    np.testing.assert_allclose(t_band, np.round(np.sort(np.r_[means - T_975_1 / 2, means + T_975_1 / 2]), 12),
                               rtol=1e-12)
    minmax = _band_ys(curves(_rounds(), "eval_loss_post", "round", band="minmax"))
    np.testing.assert_allclose(minmax, np.round(np.sort(np.r_[means - 0.5, means + 0.5]), 12), rtol=1e-12)
    assert "band: 95% Student-t confidence interval" in curves(_rounds()).axes[0].get_title()
    with pytest.raises(ValueError, match="interval kind"):
        curves(_rounds(), band="std")


def test_a_single_seed_gets_no_band_and_says_n_1() -> None:
    one = _rounds()[lambda f: f["label"] == C]
    fig = curves(one, "eval_loss_post", "round")
    assert _bands(fig) == 0 and _legend(fig) == [f"{C} (n=1)"]
    assert "band" not in fig.axes[0].get_title()


def test_curves_interpolate_sim_time_within_the_overlap() -> None:
    fig = curves(_rounds(), "eval_loss_post", "sim_time_s")
    ax = fig.axes[0]
    line = ax.get_lines()[0]
    assert ax.get_xlabel() == "simulated time (s)"
    # seed 0 is evaluated at t = 1, 3, 5 and seed 1 at t = 1.5, 4.5, 7.5: union within [1.5, 5]
    np.testing.assert_allclose(line.get_xdata(), [1.5, 3.0, 4.5, 5.0])
    seed0 = np.interp([1.5, 3.0, 4.5, 5.0], [1, 3, 5], [_loss(1, 0, r) for r in EVAL_ROUNDS])
    seed1 = np.interp([1.5, 3.0, 4.5, 5.0], [1.5, 4.5, 7.5], [_loss(1, 1, r) for r in EVAL_ROUNDS])
    np.testing.assert_allclose(line.get_ydata(), (seed0 + seed1) / 2)


def test_curves_units_for_regression_and_accuracy() -> None:
    assert "MSE" in curves(_rounds(classification=False)).axes[0].get_ylabel()
    ax = curves(_rounds(), "eval_metric_post").axes[0]
    assert ax.get_ylabel() == "held-out accuracy after adaptation"
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [0.65, 0.65, 0.65])


def test_personalization_gain_bars_and_annotations() -> None:
    fig = personalization_gain(_rounds())
    ax = fig.axes[0]
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(containers) == 2 and all(len(c) == 3 for c in containers)
    post = [_loss(1.0, 0, 4) / 2 + _loss(1.0, 1, 4) / 2, _loss(2.0, 0, 4) / 2 + _loss(2.0, 1, 4) / 2, _loss(3.0, 0, 4)]
    np.testing.assert_allclose([b.get_height() for b in containers[0]], np.array(post) + 1.0)
    np.testing.assert_allclose([b.get_height() for b in containers[1]], post)
    assert [t.get_text() for t in ax.texts] == ["gain\n-1"] * 3
    assert [t.get_text() for t in ax.get_xticklabels()] == LEGEND
    assert _legend(fig) == ["before adaptation", "after adaptation"]
    assert "round 4" in ax.get_title() and "cross-entropy" in ax.get_ylabel()
    accuracy = personalization_gain(_rounds(), "accuracy").axes[0]
    assert "accuracy" in accuracy.get_ylabel() and accuracy.texts[2].get_text() == "gain\n+0.1"
    with pytest.raises(ValueError):
        personalization_gain(_rounds(), "f1")


def test_personalization_gain_error_bars_are_the_interval_over_seeds() -> None:
    # at round 4 setting A's seeds are b and b + 1 after adaptation: t half-width t_{0.975,1} / 2, min-max +-0.5;
    # setting C has one seed: no error bar at all
    post = _loss(1.0, 0, 4) + 0.5
    for band, half in (("t", T_975_1 / 2), ("minmax", 0.5)):
        ax = personalization_gain(_rounds(), band=band).axes[0]
        after = [c for c in ax.containers if isinstance(c, BarContainer)][1]
        segments = after.errorbar.lines[2][0].get_segments()
        np.testing.assert_allclose(segments[0][:, 1], [post - half, post + half], rtol=1e-12)
        assert len(segments[2]) == 0
    assert "error bars: 95% Student-t" in personalization_gain(_rounds()).axes[0].get_title()


def test_client_cdf_pools_seeds_at_the_last_evaluation() -> None:
    fig = client_cdf(_evals())
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3 and _legend(fig) == LEGEND
    assert ax.get_ylabel() == "fraction of held-out clients" and "loss" in ax.get_xlabel()
    assert len(lines[0].get_ydata()) == 11 and lines[0].get_ydata()[-1] == 1.0  # 2 seeds x 5 clients, plus 0
    assert lines[2].get_xdata()[0] == pytest.approx(_loss(3.0, 0, 4))
    early = client_cdf(_evals(), "loss_post", eval_round=0).axes[0]
    assert early.get_lines()[2].get_xdata()[0] == pytest.approx(_loss(3.0, 0, 0)) and "round 0" in early.get_title()


def test_staleness_histogram_counts_aggregated_updates() -> None:
    fig = staleness_histogram(_clients())
    ax = fig.axes[0]
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(containers) == 3 and _legend(fig) == LEGEND
    # per run: clients 0 and 2 (staleness 0) and client 1 (staleness 1) over 5 rounds; client 3 dropped
    assert [b.get_height() for b in containers[0]] == [10, 5]
    assert "client updates" in ax.get_ylabel() and "staleness" in ax.get_xlabel() and ax.get_title()


def test_participation_histogram() -> None:
    fig = participation(_clients())
    ax = fig.axes[0]
    containers = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(containers) == 3 and _legend(fig) == LEGEND
    heights = [b.get_height() for b in containers[2]]  # counts 0..5: one client never, three always
    assert heights == [1, 0, 0, 0, 0, 3]
    assert ax.get_xlabel() == "times a client was aggregated" and ax.get_ylabel().startswith("clients")
    assert "aggregated" in ax.get_title()


def test_drops_stacks_reasons_per_label() -> None:
    fig = drops(_rounds(dropped=True))
    assert len(fig.axes) == 3
    for ax in fig.axes:
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 1  # only the deadline is non-zero
        assert [line.get_label() for line in ax.get_lines()] == ["completed"]
        assert ax.get_xlabel() == "round" and "client updates" in ax.get_ylabel()
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [6] * 5)  # summed over 2 seeds
    assert [ax.get_title() for ax in fig.axes] == LEGEND
    assert _legend(fig) == ["deadline", "completed"] and fig.get_suptitle()


def test_throughput_in_wall_clock() -> None:
    fig = throughput(_rounds())
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3 and _legend(fig) == LEGEND
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [6.0] * 5)  # 3 updates per 0.5 s
    assert "wall-clock" in ax.get_title() and ax.get_ylabel() == "client updates per wall-clock second"


def test_standard_figures_pick_what_applies() -> None:
    classification = standard_figures(_runset(classification=True, stale=True, dropped=True))
    assert set(classification) == {
        "loss_by_round", "loss_by_sim_time", "accuracy_by_round", "accuracy_by_sim_time", "personalization_gain",
        "personalization_gain_accuracy", "client_cdf", "client_cdf_accuracy", "staleness", "drops",
        "participation", "throughput", "train_loss"}
    regression = standard_figures(_runset(classification=False, stale=False, dropped=False))
    assert set(regression) == {"loss_by_round", "loss_by_sim_time", "personalization_gain", "client_cdf",
                               "participation", "throughput", "train_loss"}
    assert all(isinstance(f, Figure) for f in regression.values())
    assert "MSE" in regression["loss_by_round"].axes[0].get_ylabel()
    assert plt.get_fignums() == []


def test_standard_figures_on_empty_frames() -> None:
    empty = pd.DataFrame()
    assert standard_figures(RunSet([], [], empty, empty, empty, empty)) == {}
    typed = RunSet([], [], empty, _rounds().iloc[0:0], _clients().iloc[0:0], _evals().iloc[0:0])
    assert standard_figures(typed) == {}
    no_evals = _rounds().assign(eval_loss_post=NAN, eval_loss_pre=NAN, eval_metric_post=NAN, eval_metric_pre=NAN)
    figures = standard_figures(RunSet([], [], empty, no_evals, empty, _evals().iloc[0:0]))
    assert set(figures) == {"throughput", "train_loss"}
    for make in (curves, personalization_gain, drops, throughput, staleness_histogram, participation, client_cdf):
        assert isinstance(make(empty), Figure)  # an empty figure that says "no data"


@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_save_figures_is_deterministic(tmp_path, fmt: str) -> None:
    figures = {"loss_by_round": curves(_rounds()), "throughput": throughput(_rounds())}
    first = save_figures(figures, tmp_path / "a", fmt)
    second = save_figures(figures, tmp_path / "b", fmt)
    assert [p.name for p in first] == [f"loss_by_round.{fmt}", f"throughput.{fmt}"]
    for one, two in zip(first, second, strict=True):
        assert one.stat().st_size > 0 and one.read_bytes() == two.read_bytes()
    with pytest.raises(ValueError):
        save_figures(figures, tmp_path, "jpg")


def test_bytes_sent_get_a_figure_only_when_uploads_are_compressed():
    frame = pd.DataFrame({"bytes_up": [100, 100], "bytes_down": [400, 400]})
    assert _compressed(frame)
    assert not _compressed(frame.assign(bytes_up=[400, 400]))
    assert not _compressed(frame.iloc[:0]) and not _compressed(frame.drop(columns="bytes_down"))
