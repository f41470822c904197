"""`afd up` as a user runs it, driven by `afd status`, `afd scale` and `afd down` from other processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _afd(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestration.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_up_status_scale_down(tmp_path):
    # TMPDIR: the cluster's work folder (node logs, records), which `afd up` keeps after `afd down`, stays in tmp_path
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    up = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "up", "--port", "0", "--threads", "1", "--name", "cli-test"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        state = tmp_path / "afd" / "clusters" / "cli-test.json"
        while not state.exists():
            assert up.poll() is None, up.stdout.read() if up.stdout else ""
            assert time.monotonic() < deadline, "afd up did not come up"
            time.sleep(0.2)
        status = _afd("status", "--name", "cli-test", "--json", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        roles = sorted(n["role"] for n in json.loads(status.stdout)["nodes"])
        assert roles == ["attention", "ffn", "ffn"]
        scaled = _afd("scale", "--ffn", "3", "--name", "cli-test", env=env)
        assert scaled.returncode == 0, scaled.stdout + scaled.stderr
        view = json.loads(_afd("status", "--name", "cli-test", "--json", env=env).stdout)
        ffn = [n for n in view["nodes"] if n["role"] == "ffn" and n["state"] == "ready"]
        assert len(ffn) == 3 and sorted(e for n in ffn for e in n["experts"]) == list(range(16))
        bad = _afd("scale", "--ffn", "0", "--name", "cli-test", env=env)
        assert bad.returncode == 2 and "at least one node" in bad.stdout
        down = _afd("down", "--name", "cli-test", env=env)
        assert down.returncode == 0
        assert up.wait(timeout=120) == 0
        assert not state.exists()
        missing = _afd("status", "--name", "cli-test", env=env)
        assert missing.returncode == 2 and "no running cluster" in missing.stdout
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(60)
