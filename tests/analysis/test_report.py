"""load_runs, run labels, the summary table, the HTML report (settings, config differences, links) and the
plot/report/compare commands."""

from __future__ import annotations

import base64
import html
import re
from urllib.parse import unquote

import pytest
from conftest import small_overrides
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from sweep_runs import TRIALS, make_sweep

from actors.cli import main
from analysis import load_runs, run_labels
from analysis.plots import standard_figures
from analysis.report import html_report
from analysis.tables import summary_table


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


def test_run_labels_ignore_seed_and_execution_keys_and_name_every_difference():
    base = {"seed": 0, "rounds": 10, "algorithm": {"name": "reptile", "local_lr": 0.1}, "system": {"actors": 1}}
    other = {"seed": 1, "rounds": 10, "algorithm": {"name": "reptile", "local_lr": 0.1}, "system": {"actors": 2}}
    assert run_labels([base, other]) == ["reptile", "reptile"]
    maml = {**base, "algorithm": {"name": "maml", "local_lr": 0.2}}
    # local_lr differs too: named, even though the algorithm name already tells the runs apart
    assert run_labels([base, maml]) == ["algorithm.name=reptile, algorithm.local_lr=0.1",
                                        "algorithm.name=maml, algorithm.local_lr=0.2"]
    longer = {**base, "rounds": 20}  # a longer run ends elsewhere: another setting
    assert run_labels([base, longer]) == ["rounds=10", "rounds=20"]


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


def _rows(page: str, table: str) -> int:
    """The rows (header included) of the table with id ``table``."""
    start = page.index(f'<table id="{table}"')
    return page[start:page.index("</table>", start)].count("<tr>")


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
    assert _rows(page, "summary") == 1 + 3  # header and one row per run
    assert _rows(page, "settings") == 1 + 2  # reptile's two seeds are one setting
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert 'id="one"' in page and "figure two" in page
    assert "http" not in page  # self-contained: nothing fetched from elsewhere


def test_plot_report_and_compare_commands(three_runs, tmp_path, capsys):
    runs = [str(p) for p in sorted(three_runs.iterdir())]
    assert main(["compare", *runs, "--runs", "--wide"]) == 0
    printed = capsys.readouterr().out
    assert "reptile-s1" in printed and "final loss post" in printed and "2 setting(s) of 3 run(s)" in printed

    assert main(["report", *runs, "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and _rows(page, "summary") == 4

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


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("report"))


def _table_html(page: str, table: str) -> str:
    start = page.index(f'<table id="{table}"')
    return page[start:page.index("</table>", start)]


def _cells(row: str) -> list[str]:
    return [html.unescape(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", row)]


@pytest.mark.filterwarnings("ignore:.*no rounds written yet:UserWarning")
def test_report_of_a_sweep_has_config_differences_the_base_and_relative_links(sweep, tmp_path, capsys):
    first = sweep / "trials" / TRIALS[0][0]
    assert main(["plot", str(first)]) == 0 and main(["report", str(first)]) == 0  # its own figures and report
    capsys.readouterr()
    out = sweep / "report.html"
    assert main(["report", str(sweep), "--out", str(out)]) == 0
    assert "skipped, no rounds written yet" in capsys.readouterr().err
    page = out.read_text()
    differences = _table_html(page, "differences").split("<tr>")[1:]
    assert _cells(differences[0]) == ["#", "algorithm.name", "algorithm.server_lr", "algorithm.server_optimizer", "n",
                                      "runs"]
    assert _cells(differences[1])[:5] == ["1", "reptile", "1.0", "sgd", "4"]
    assert _cells(differences[2])[:5] == ["2", "maml", "0.003", "adam", "2"]
    base = dict(_cells(row) for row in _table_html(page, "base").split("<tr>")[2:])
    assert base["algorithm.local_lr"] == "0.02" and base["model.hidden"] == "[40,40]" and base["rounds"] == "4"
    assert base["algorithm.factory"] == '""' and base["system.backend"] == "inline"
    assert not {"seed", "algorithm.name", "system.actors", "metrics.flush_every"} & set(base)
    assert "<code>seed</code>, <code>system.actors</code>, <code>metrics.flush_every</code>" in page
    assert _rows(page, "settings") == 1 + 2 and "3 completed, 1 running/killed" in page
    # every link is relative to the report and leads to a trial's directory, its report or its figures
    hrefs = re.findall(r'href="([^"]+)"', page)
    assert hrefs and not any(h.startswith(("/", "http", "file:")) for h in hrefs)
    targets = {(out.parent / unquote(h)).resolve() for h in hrefs}
    trials = {(sweep / "trials" / name).resolve() for name, _ in TRIALS}
    assert trials <= targets and all(t.exists() for t in targets)
    assert targets - trials == {(first / "report.html").resolve(), (first / "figures").resolve()}
    assert f'href="trials/{TRIALS[0][0]}/figures/">figures</a>' in page


@pytest.mark.filterwarnings("ignore:.*no rounds written yet:UserWarning")
def test_report_figures_aggregate_seeds_with_bands(sweep):
    figures = standard_figures(load_runs(sweep))
    legend = [t.get_text() for t in figures["loss_by_round"].axes[0].get_legend().get_texts()]
    assert legend == ["algorithm.name=maml, algorithm.server_lr=0.003,\nalgorithm.server_optimizer=adam (n=2)",
                      "algorithm.name=reptile, algorithm.server_lr=1.0,\nalgorithm.server_optimizer=sgd (n=4)"]
    assert sum(isinstance(c, PolyCollection) for c in figures["loss_by_round"].axes[0].collections) == 2


def test_single_run_report_shows_its_whole_config(three_runs, tmp_path):
    run_dir = three_runs / "reptile-s1"
    assert main(["report", str(run_dir), "--out", str(tmp_path / "one.html")]) == 0
    page = (tmp_path / "one.html").read_text()
    assert "differences" not in page and 'id="settings"' not in page and _rows(page, "summary") == 2
    base = dict(_cells(row) for row in _table_html(page, "base").split("<tr>")[2:])
    assert base["seed"] == "1" and base["algorithm.name"] == "reptile" and base["data.name"] == "synthetic"
    assert page.count("data:image/png;base64,") >= 6
