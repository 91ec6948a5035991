"""load_runs, run labels, the summary table, the HTML report and the plot/report/compare commands."""

from __future__ import annotations

import base64
import re

import pytest
from conftest import small_overrides
from matplotlib.figure import Figure

from actors.cli import main
from analysis import load_runs, run_labels
from analysis.report import html_report, summary_table


def _run(out, **kw) -> None:
    overrides = small_overrides(**{"system.backend": "inline", **kw})
    assert main(["run", "--out", str(out), "--no-progress", "--no-plots",
                 *[a for o in overrides for a in ("--set", o)]]) == 0


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """reptile seeds 0 and 1, and fedavg seed 0, on synthetic data."""
    root = tmp_path_factory.mktemp("runs")
    _run(root / "reptile-s0", **{"data.name": "synthetic", "seed": 0})
    _run(root / "reptile-s1", **{"data.name": "synthetic", "seed": 1})
    _run(root / "fedavg-s0", **{"data.name": "synthetic", "algorithm.name": "fedavg", "seed": 0})
    return root


def test_run_labels_ignore_seed_run_length_and_execution_keys():
    base = {"seed": 0, "rounds": 10, "algorithm": {"name": "reptile", "local_lr": 0.1}, "system": {"actors": 1}}
    other = {"seed": 1, "rounds": 20, "algorithm": {"name": "reptile", "local_lr": 0.1}, "system": {"actors": 2}}
    assert run_labels([base, other]) == ["reptile", "reptile"]
    maml = {**base, "algorithm": {"name": "maml", "local_lr": 0.2}}
    # local_lr differs too but is already told apart by the algorithm name: left out
    assert run_labels([base, maml]) == ["algorithm.name=reptile", "algorithm.name=maml"]
    lr = {**base, "algorithm": {"name": "reptile", "local_lr": 0.3}}
    assert run_labels([base, maml, lr]) == ["algorithm.name=reptile, algorithm.local_lr=0.1",
                                            "algorithm.name=maml, algorithm.local_lr=0.2",
                                            "algorithm.name=reptile, algorithm.local_lr=0.3"]


def test_load_runs_stacks_tidy_frames_with_config_columns(three_runs):
    rs = load_runs(str(three_runs / "*"))
    assert sorted(rs.summary["run"]) == ["fedavg-s0", "reptile-s0", "reptile-s1"]
    assert sorted(set(rs.labels)) == ["algorithm.name=fedavg", "algorithm.name=reptile"]
    assert len(rs.rounds) == 3 * 4 and len(rs.clients) == 3 * 24 and len(rs.evals) == 3 * 3 * 4
    for frame in (rs.rounds, rs.clients, rs.evals):
        assert {"run", "label", "seed", "algorithm.name", "data.name"} <= set(frame.columns)
    seeds = rs.rounds[rs.rounds["label"] == "algorithm.name=reptile"].groupby("run")["seed"].first()
    assert sorted(seeds) == [0, 1]
    with pytest.raises(FileNotFoundError, match="no run directories"):
        load_runs(str(three_runs / "nothing-*"))


def test_summary_table_and_html_report(three_runs):
    rs = load_runs(sorted(three_runs.iterdir()))
    table = summary_table(rs)
    assert list(table["run"]) == ["fedavg-s0", "reptile-s0", "reptile-s1"]
    assert (table["rounds"] == 4).all() and (table["client_updates"] == 24).all()
    assert table["final_acc_post"].between(0, 1).all()  # classification keeps its accuracy columns
    r0 = rs.runs[1].rounds
    assert table.loc[1, "final_loss_post"] == r0["eval_loss_post"].dropna().iloc[-1]
    assert table.loc[1, "best_loss_post"] == r0["eval_loss_post"].min()

    figs = {}
    for stem in ("one", "two"):
        fig = Figure()
        fig.add_subplot().plot([0, 1], [1, 0])
        fig.axes[0].set_title(f"figure {stem}")
        figs[stem] = fig
    page = html_report(rs, figs, title="three runs")
    assert page.startswith("<!DOCTYPE html>") and "<title>three runs</title>" in page
    assert page.count("<tr>") == 1 + 3  # header and one row per run
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert 'id="one"' in page and "figure two" in page
    assert "http" not in page  # self-contained: nothing fetched from elsewhere


def test_plot_report_and_compare_commands(three_runs, tmp_path, capsys):
    runs = [str(p) for p in sorted(three_runs.iterdir())]
    assert main(["compare", *runs]) == 0
    printed = capsys.readouterr().out
    assert "reptile-s1" in printed and "final loss post" in printed

    assert main(["report", *runs, "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and page.count("<tr>") == 4

    assert main(["plot", *runs, "--out", str(tmp_path / "figs"), "--format", "svg"]) == 0
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert "loss_by_round.svg" in names and "accuracy_by_sim_time.svg" in names
    assert all(n.endswith(".svg") for n in names)
    # the report embeds every figure `plot` writes, each under its name
    assert page.count("data:image/png;base64,") == len(names)
    assert all(f'id="{n.removesuffix(".svg")}"' in page for n in names)


def test_analysis_commands_reject_what_is_not_a_run(tmp_path, capsys):
    for command in ("plot", "report", "compare"):
        assert main([command, str(tmp_path / "missing")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("metafleet: error:") and "not a metafleet run directory" in err
        assert "Traceback" not in err
    assert not any(tmp_path.iterdir())
