"""Joining a cluster started with `ray start` (Ray 2.60 turns token authentication on): refused with the real
cause named, and working with RAY_AUTH_MODE=token. A real head node, in its own temp dir, on this machine."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import small_overrides

ROOT = Path(__file__).resolve().parents[2]


#: a refused client tries the GCS once a second, 20 times by default (``RAY_NUM_REDIS_GET_RETRIES``): 3 suffice
FEW_RETRIES = {"RAY_NUM_REDIS_GET_RETRIES": "3"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metafleet(out: Path, address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    args = [a for o in small_overrides(rounds=2) + ["system.actors=1"] for a in ("--set", o)]
    return subprocess.run([sys.executable, "-m", "actors.cli", "run", "--address", address, "--out", str(out),
                           "--no-progress", "--no-plots", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


def test_joining_a_token_authenticated_cluster(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="mf-auth-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env |= {"RAY_TMPDIR": str(temp), "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([shutil.which("ray") or "ray", "start", "--head", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--block"], env=env | {"RAY_AUTH_MODE": "token"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the GCS port answers once the head is up
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(3)
        refused = _metafleet(tmp_path / "refused", address, env | FEW_RETRIES)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "uses token authentication: export RAY_AUTH_MODE=token" in refused.stderr
        assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()
        joined = _metafleet(tmp_path / "joined", address, env | {"RAY_AUTH_MODE": "token"})
        assert joined.returncode == 0, joined.stderr[-2000:]
        assert '"status": "completed"' in (tmp_path / "joined" / "summary.json").read_text()
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the head's processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


OWN_RAY = """
import json, os, sys, time
from actors.cluster import connect
from simulator.config.schema import SystemConfig
import ray
connect(SystemConfig())
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "mode": os.environ.get("RAY_AUTH_MODE"),
                  "token": os.environ.get("RAY_AUTH_TOKEN_PATH"), "task": ray.get(ray.remote(lambda: 7).remote())}),
      flush=True)
sys.stdin.readline()  # stay up until the test is done
"""

INTRUDER = """
import sys, ray
ray.init(address=sys.argv[1])
print("CONNECTED", ray.get(ray.remote(lambda: 1).remote()))
"""


def test_the_runs_own_ray_refuses_anyone_without_its_token(tmp_path):
    """The local Ray a run starts listens on every interface (Ray 2.60), so it requires a fresh token that
    only this user can read: a client without it (RAY_AUTH_MODE unset, or token mode with another token) is
    refused; the run's own tasks work."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env |= {"RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path)}  # no ~/.ray/auth_token to fall back on
    own = subprocess.Popen([sys.executable, "-c", OWN_RAY], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        info = json.loads(own.stdout.readline())
        assert info["task"] == 7 and info["mode"] == "token"
        token = Path(info["token"])
        assert token.stat().st_mode & 0o777 == 0o600 and token.parent.stat().st_mode & 0o777 == 0o700
        for extra in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}):
            intruder = subprocess.run([sys.executable, "-c", INTRUDER, info["gcs"]], cwd=ROOT,
                                      env=env | FEW_RETRIES | extra,
                                      capture_output=True, text=True, timeout=120)
            assert intruder.returncode != 0 and "CONNECTED" not in intruder.stdout, intruder.stdout
            if extra:  # it reached the GCS, which refused the token
                assert "AuthenticationError" in intruder.stderr, intruder.stderr[-2000:]
    finally:
        own.stdin.close()
        own.wait(timeout=60)
