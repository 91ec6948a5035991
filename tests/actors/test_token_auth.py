"""Joining a cluster started with `ray start` (Ray 2.60 turns token authentication on): refused with the real
cause named, and working with RAY_AUTH_MODE=token. A real head node, in its own temp dir, on this machine."""

from __future__ import annotations

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
        refused = _metafleet(tmp_path / "refused", address, env)
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
