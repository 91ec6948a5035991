"""The command line: a small run end to end, and bad input rejected cleanly (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from conftest import small_overrides

from actors.cli import main
from simulator.experiment import from_dict
from simulator.rundir.metrics import WALL_CLOCK_COLUMNS

INLINE = ["system.backend=\"inline\""]


def _args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_run_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--no-progress", *_args(small_overrides() + INLINE)])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"config.toml", "rounds.parquet", "clients.parquet", "checkpoint.pt",
                                               "evals.parquet", "summary.json", "figures", ".lock"}
    figures = {p.name for p in (out / "figures").iterdir()}
    assert {"loss_by_round.png", "loss_by_sim_time.png", "personalization_gain.png", "client_cdf.png"} <= figures
    assert "accuracy_by_round.png" not in figures  # sinusoid is regression
    cfg = from_dict(tomllib.loads((out / "config.toml").read_text()))  # the resolved config reloads
    assert cfg.rounds == 4 and cfg.system.backend == "inline"
    rounds = pd.read_parquet(out / "rounds.parquet")
    assert list(rounds["round"]) == [0, 1, 2, 3]
    assert (rounds["sim_time_s"].diff().dropna() > 0).all()
    assert rounds["eval_loss_post"].notna().tolist() == [True, False, True, True]  # every 2 and the last
    clients = pd.read_parquet(out / "clients.parquet")
    assert len(clients) == 4 * 6 and clients.groupby("round")["client_id"].nunique().eq(6).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    printed = capsys.readouterr().out
    assert "held-out clients" in printed and str(out) in printed


def test_quickstart_meta_learning_works(tmp_path):
    """A shortened quickstart (Reptile, sinusoid): adaptation helps, and more so after training."""
    out = tmp_path / "q"
    overrides = INLINE + ["rounds=60", "clients.per_round=10", "eval.clients=30", "eval.every=59"]
    assert main(["run", "--out", str(out), "--no-progress", "--no-plots", *_args(overrides)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    first, final = summary["first_eval"], summary["final_eval"]
    assert final["round"] == 59 and first["round"] == 0
    assert final["eval_loss_post"] < 0.75 * final["eval_loss_pre"]
    assert final["eval_loss_post"] < 0.75 * first["eval_loss_post"]


BAD = [
    (["--set", "clients.per_round=5000"], "clients.per_round"),
    (["--set", "algoritm.name=\"maml\""], "did you mean 'algorithm.name'"),
    (["--set", "algorithm.name=\"sgd\""], "algorithm.name"),
    (["--set", "algorithm.local_lr=-0.1"], "algorithm.local_lr"),
    (["--set", "system.gpus_per_actor=1.5"], "system.gpus_per_actor"),
    (["--set", "system.gpu_memory_fraction=2"], "system.gpu_memory_fraction"),
    (["--set", "model.hidden=[64, \"x\"]"], "model.hidden"),
    (["--set", "rounds=2.5"], "rounds"),
    (["--set", "data.alpha=0.5"], "data.alpha"),
    (["--set", "nonsense"], "--set"),
    (["--set", "model.factory=\"no_such_module_xyz:make\""], "model.factory"),
    (["--set", "model.factory=\"collections:OrderedDict\""], "model.factory"),
    (["--set", "model.factory=\"torch.nn:Identity\"", "--set", "data.name=\"synthetic\""], "model outputs"),
    (["--set", "model.factory=\"torch.nn:Identity\""], "no trainable parameters"),
    (["/nonexistent/config.toml"], "does not exist"),
    (["--address", "127.0.0.1:1"], "system.address"),
    (["--set", "devices.trace=\"/nonexistent/trace.csv\""], "devices.trace"),
    (["--set", "devices.availability_trace=\"/nonexistent/on_off.parquet\""], "devices.availability_trace"),
    (["--set", "system.mode=\"deadline\""], "system.deadline_s"),
    (["--set", "devices.speed.dist=\"weibull\""], "devices.speed.dist"),
    (["--set", "data.name=\"digits\"", "--set", "data.num_clients=5000"], "data.num_clients"),
    # files made by the test ({tmp}: see FILES)
    (["{tmp}/bad.toml"], "not valid TOML"),
    (["{tmp}/unknown_key.toml"], "did you mean 'algorithm.local_lr'"),
    (["--set", "roundz=3"], "did you mean 'rounds'"),
    (["--set", "system.vectorize=\"yes\""], "system.vectorize must be true or false"),
    (["--set", "system.shard_cache_mb=0"], "system.shard_cache_mb must be > 0"),
    (["--set", "devices.dropout=1.5"], "devices.dropout"),
    (["--set", "async.mixing=0"], "async.mixing"),
    (["--set", "devices.availability=0"], "devices.availability"),
    (["--set", "checkpoint_every=-1"], "checkpoint_every"),
    (["--set", "system.max_failures=-2"], "system.max_failures"),
    (["--set", "eval.clients=500"], "eval.clients"),
    (["--set", "data.name=\"synthetic\"", "--set", "data.shots=5"], "data.shots"),
    (["--set", "data.name=\"table\""], "data.path"),
    (["--set", "data.name=\"table\"", "--set", "data.path=\"/nonexistent/clients.csv\""], "data.path"),
    (["--set", "data.name=\"table\"", "--set", "data.path=\"{tmp}/corrupt.parquet\""], "data.path"),
    (["--set", "data.name=\"table\"", "--set", "data.path=\"{tmp}/no_label.csv\""], "data.label_column"),
    (["--set", "data.name=\"leaf\"", "--set", "data.path=\"{tmp}/empty_leaf\""], "data.path"),
    (["--set", "devices.trace=\"{tmp}/corrupt_trace.csv\""], "devices.trace"),
    (["--set", "model.name=\"femnist_cnn\""], "model.name"),
    (["--set", "algorithm.name=\"pfedavg\"", "--set", "algorithm.server_optimizer=\"adam\""],
     "algorithm.server_optimizer = \"sgd\""),
    (["--set", "algorithm.name=\"pfedavg\"", "--set", "algorithm.switch_round=400"], "algorithm.switch_round"),
    # numbers that overflow, names that cannot name a directory, places a run directory cannot go
    (["--set", "seed=18446744073709551616"], "seed = 18446744073709551616 is out of range"),
    (["--set", "rounds=1180591620717411303424"], "rounds = 1180591620717411303424 is out of range"),
    (["--set", "clients.per_round=9223372036854775807"], "clients.per_round"),
    (["--set", "data.num_clients=9223372036854775000"], "data.num_clients + data.eval_clients"),
    (["--set", "name=\"" + "n" * 300 + "\""], "(302 characters) must be 1 to 200 bytes without '/' or NUL"),
    (["--set", "name=\"a\\u0000b\""], "must be 1 to 200 bytes without '/' or NUL"),
    (["--set", "name=\"runs/../x\""], "must be 1 to 200 bytes without '/' or NUL"),
    (["{tmp}/huge_name.toml"], "must be 1 to 200 bytes"),
    (["/proc/self/mem"], "cannot be read"),
    (["--out", "/proc/metafleet-never"], "refuses new files"),
    (["--out", "{tmp}/bad.toml/run"], "which is a file, not a directory"),
    (["--out", "{tmp}/dangling"], "is a link to nothing"),
]

FILES = {
    "bad.toml": "rounds = = 3\n",
    "unknown_key.toml": "[algorithm]\nlocal_lrr = 0.1\n",
    "corrupt.parquet": "this is not parquet\n",
    "no_label.csv": "client_id,x0,x1\na,0.5,1.0\na,0.1,0.2\nb,0.3,0.4\nb,0.7,0.8\n",
    "corrupt_trace.csv": "client,speed\n1,fast\n",
    "huge_name.toml": "name = \"" + "x" * 100_000 + "\"\n",
}


@pytest.mark.parametrize(("argv", "needle"), BAD, ids=[b[1] for b in BAD])
def test_bad_input_exits_2_with_one_message(tmp_path, capsys, monkeypatch, argv, needle):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "empty_leaf").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)  # a default run directory would appear under ./runs
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / "never"
    code = main(["run", "--out", str(out), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err
    assert err.startswith("metafleet: error:") and err.count("\n") == 1 and len(err) < 1000
    assert "Traceback" not in err
    assert not out.exists() and not (tmp_path / "runs").exists() and not (tmp_path / "nowhere").exists()
    assert not list(tmp_path.glob(".metafleet-probe-*"))


def test_a_runs_path_that_is_a_file_is_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("not a directory")
    assert main(["run", "--no-progress", *_args(INLINE)]) == 2
    assert "is a file, so run directories cannot go under runs/" in capsys.readouterr().err


def test_malformed_toml_and_existing_out_dir(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "summary.json").write_text("{}")
    assert main(["run", "--out", str(taken), *_args(INLINE)]) == 2
    assert "--out" in capsys.readouterr().err


def test_console_script_bad_flag_and_bad_key_no_traceback(tmp_path):
    for argv in (["run", "--bogus-flag"], ["run", "--set", "rounds=-1", "--out", str(tmp_path / "r")]):
        proc = subprocess.run([sys.executable, "-m", "actors.cli", *argv], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- --resume

RESUME = small_overrides(**{"rounds": 6, "checkpoint_every": 2, "system.backend": "inline"})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(["run", "--out", str(out), "--no-progress", "--no-plots", *_args(RESUME)]) == 0
    return out


def _listing(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*"))}


RESUME_BAD = [
    (["--resume", "{tmp}"], "is not a metafleet run directory"),
    (["--resume", "{truncated}", "--set", "rounds=8"], "rounds.parquet/part-00000.parquet cannot be read"),
    (["--resume", "{garbage}", "--set", "rounds=8"], "clients.parquet/part-00001.parquet cannot be read"),
    (["--resume", "{tmpdir}", "--set", "rounds=8"], ".checkpoint.pt.tmp (a temporary file of an interrupted"),
    (["--resume", "{ckdir}", "--set", "rounds=8"], "checkpoint.pt is not a regular file"),
    (["--resume", "{run}", "--set", "algorithm.local_lr=0.5"], "algorithm.local_lr was 0.02 when the run started"),
    (["--resume", "{run}", "--set", "data.num_clients=30"], "data.num_clients was 24"),
    (["--resume", "{run}", "{tmp}/other.toml"], "drop the CONFIG argument"),
    (["--resume", "{run}"], "already has all 6 of 6 rounds"),
    (["--resume", "{corrupt}", "--set", "rounds=8"], "checkpoint.pt cannot be read"),
]


@pytest.mark.parametrize(("argv", "needle"), RESUME_BAD, ids=[b[1] for b in RESUME_BAD])
def test_bad_resume_exits_2_and_leaves_the_run_untouched(tmp_path, capsys, finished_run, argv, needle):
    (tmp_path / "other.toml").write_text("rounds = 3\n")
    damaged = {name: tmp_path / name for name in ("corrupt", "truncated", "garbage", "tmpdir", "ckdir")}
    for d in damaged.values():
        shutil.copytree(finished_run, d)
    (damaged["corrupt"] / "checkpoint.pt").write_bytes(b"not a checkpoint")
    part = damaged["truncated"] / "rounds.parquet" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:100])
    (damaged["garbage"] / "clients.parquet" / "part-00001.parquet").write_bytes(b"garbage" * 100)
    (damaged["tmpdir"] / ".checkpoint.pt.tmp").mkdir()
    (damaged["ckdir"] / "checkpoint.pt").unlink()
    (damaged["ckdir"] / "checkpoint.pt").mkdir()
    before = {d: _files(d) for d in (finished_run, *damaged.values())}
    argv = [a.format(tmp=tmp_path, run=finished_run, **damaged) for a in argv]
    assert main(["run", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("metafleet: error:") and err.count("\n") == 1
    assert {d: _files(d) for d in before} == before  # byte for byte
    assert (damaged["tmpdir"] / ".checkpoint.pt.tmp").is_dir() and (damaged["ckdir"] / "checkpoint.pt").is_dir()


def test_resume_extends_a_finished_run(tmp_path, finished_run):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    assert main(["run", "--resume", str(run_dir), "--set", "rounds=8", "--no-progress", "--no-plots"]) == 0
    assert pd.read_parquet(run_dir / "rounds.parquet")["round"].tolist() == list(range(8))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds_completed"] == 8
    assert "rounds = 8" in (run_dir / "config.toml").read_text()


def test_sigkilled_metafleet_run_resumes_to_the_uninterrupted_result(tmp_path):
    overrides = small_overrides(**{"rounds": 40, "checkpoint_every": 3, "metrics.flush_every": 4,
                                   "system.backend": "inline", "eval.every": 10})
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main(["run", "--out", str(ref), "--no-progress", "--no-plots", *_args(overrides)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "actors.cli", "run", "--out", str(killed), "--no-progress",
                             "--no-plots", *_args(overrides)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "summary.json").exists()
    assert main(["run", "--resume", str(killed), "--no-progress", "--no-plots"]) == 0
    for table in ("rounds", "clients", "evals"):
        a, b = (pd.read_parquet(d / f"{table}.parquet").drop(columns=list(WALL_CLOCK_COLUMNS[table]))
                for d in (ref, killed))
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=table)


# ---------------------------------------------------------------- one writer, signals, a run's own Ray

ROOT = Path(__file__).resolve().parents[1]
LONG = small_overrides(**{"rounds": 400, "eval.every": 1000, "system.backend": "inline", "metrics.flush_every": 1})


def _cli(*argv: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "actors.cli", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} never appeared: {proc.stderr.read() if proc.poll() is not None else ''}"


def _files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_second_metafleet_run_on_a_live_directory_is_refused_then_sigterm_stops_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    first = _cli("run", "--out", str(out), "--no-progress", "--no-plots", *_args(LONG))
    _wait_for(out / "rounds.parquet" / "part-00001.parquet", first)
    for argv in (["run", "--out", str(out), *_args(LONG)], ["run", "--resume", str(out), "--set", "rounds=500"]):
        assert main([*argv, "--no-progress"]) == 2  # the same --out, and a resume of the live run
        err = capsys.readouterr().err
        assert f"is being written by process {first.pid} on" in err and err.count("\n") == 1, err
    first.send_signal(signal.SIGTERM)  # handled like Ctrl-C: last completed round kept, summary, exit 143
    assert first.wait(timeout=60) == 128 + signal.SIGTERM, first.stderr.read()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 0 < summary["rounds_completed"] < 400
    assert pd.read_parquet(out / "rounds.parquet")["round"].tolist() == list(range(summary["rounds_completed"]))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from simulator.rundir.lock import exclusive\n"
                               "with exclusive(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(600)",
                               str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    before = _files(out)
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 2
    assert f"process {holder.pid}" in capsys.readouterr().err and _files(out) == before  # byte for byte
    holder.kill()  # SIGKILL: the kernel releases the lock, nothing stale is left
    holder.wait()
    done = summary["rounds_completed"] + 2
    assert main(["run", "--resume", str(out), "--set", f"rounds={done}", "--no-progress", "--no-plots"]) == 0
    assert pd.read_parquet(out / "rounds.parquet")["round"].tolist() == list(range(done))


def test_the_default_ray_is_the_runs_own_never_a_cluster_found_on_the_machine(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="mf-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        (temp / "ray").mkdir()
        (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:9\n")  # a dead cluster, as Ray records one
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(temp)}
        start = time.monotonic()
        proc = _cli("run", "--out", str(tmp_path / "run"), "--no-progress", "--no-plots",
                    *_args(small_overrides(**{"system.actors": 1})), env=env)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert time.monotonic() - start < 200
        own = list(temp.glob("mf-ray-*"))  # it started its own local Ray, in a private dir under RAY_TMPDIR
        assert len(own) == 1 and own[0].stat().st_mode & 0o777 == 0o700 and any((own[0] / "ray").glob("session_*"))
        assert not any((temp / "ray").glob("session_*"))
        bad = _cli("run", "--out", str(tmp_path / "bad"), *_args(small_overrides()),
                   env=env | {"RAY_ADDRESS": "127.0.0.1:9"})
        _, err = bad.communicate(timeout=120)  # RAY_ADDRESS is honoured, and a dead one is one clear line
        assert bad.returncode == 2 and "nothing answers there" in err and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_two_quick_ctrl_c_exit_promptly_without_a_traceback_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    proc = _cli("run", "--out", str(out), "--no-progress", "--no-plots", *_args(LONG))
    _wait_for(out / "rounds.parquet" / "part-00001.parquet", proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)  # the second lands while the first one's stop is under way (or just after)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    assert main(["run", "--resume", str(out), "--no-progress", "--no-plots"]) == 0
    assert pd.read_parquet(out / "rounds.parquet")["round"].tolist() == list(range(400))


def test_bare_metafleet_prints_help_and_version_is_known(capsys):
    assert main([]) == 0
    assert "usage: metafleet" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("metafleet 0.1.0")
