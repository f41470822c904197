"""A killed launcher leaves nothing running, and `afd down` stops a cluster whose launcher cannot answer."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestration.lifeline import ProcessRecord, stop_recorded
from tests.cluster_helpers import REPO_ROOT

pytestmark = pytest.mark.slow

UP_TIMEOUT_S = 180.0
GONE_TIMEOUT_S = 30.0
"""The lifeline's grace (5 s) plus a node's own shutdown, on a loaded machine."""


def _descendants(pid: int) -> list[ProcessRecord]:
    """Every live process below `pid` (from /proc), as records that survive reparenting."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    records = [ProcessRecord.of(str(child), child) for child in found]
    return [record for record in records if record is not None and record.alive()]


def _start_up(tmp_path: Path, name: str) -> tuple[subprocess.Popen[str], dict[str, str], Path]:
    # TMPDIR: the cluster's work folder (node logs, records) lands in tmp_path too, so a killed launcher leaves
    # nothing behind in /tmp
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["TMPDIR"] = str(tmp_path)
    command = [sys.executable, "-m", "orchestration.cli", "up", "--port", "0", "--threads", "1", "--ffn", "1"]
    up = subprocess.Popen(
        [*command, "--name", name], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    state = tmp_path / "afd" / "clusters" / f"{name}.json"
    deadline = time.monotonic() + UP_TIMEOUT_S
    while not state.exists():
        if up.poll() is not None:
            raise AssertionError(f"afd up exited with {up.returncode}:\n{up.stdout.read() if up.stdout else ''}")
        if time.monotonic() > deadline:
            up.kill()
            up.wait(10)
            raise AssertionError("afd up did not come up")
        time.sleep(0.2)
    return up, env, state


def _cleanup(up: subprocess.Popen[str], children: list[ProcessRecord]) -> None:
    """Whatever the test left: the launcher (by its handle), then its children by pid and start time."""
    if up.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            up.send_signal(signal.SIGCONT)
        up.kill()
    up.wait(10)
    stop_recorded(children, timeout_s=10)


def test_kill_9_of_the_launcher_leaves_no_node_running(tmp_path: Path) -> None:
    up, _env, _state = _start_up(tmp_path, "kill-test")
    children: list[ProcessRecord] = []
    try:
        children = _descendants(up.pid)
        assert len(children) == 3, children  # router, one attention node, one FFN node
        up.kill()  # what the OOM killer, a CI timeout or a closed terminal does
        up.wait(10)
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while any(child.alive() for child in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [child for child in children if child.alive()]
        assert not left, f"still running {GONE_TIMEOUT_S:.0f} s after the launcher was killed: {left}"
    finally:
        _cleanup(up, children)


def test_down_stops_a_cluster_whose_launcher_does_not_answer(tmp_path: Path) -> None:
    up, env, state = _start_up(tmp_path, "stuck-test")
    children: list[ProcessRecord] = []
    try:
        children = _descendants(up.pid)
        assert len(children) == 3, children
        up.send_signal(signal.SIGSTOP)  # alive, holding its port, never answering: a hung launcher
        down = subprocess.run(
            [sys.executable, "-m", "orchestration.cli", "down", "--name", "stuck-test"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert "stopping its processes by pid" in " ".join(down.stdout.split()), down.stdout  # rich wraps lines
        left = [child for child in children if child.alive()]
        assert not left, f"`afd down` left {left} running"
        assert up.wait(30) is not None  # the stuck launcher is cleaned up too
        assert not state.exists()
        again = subprocess.run(
            [sys.executable, "-m", "orchestration.cli", "status", "--name", "stuck-test"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 2 and "no running cluster" in again.stdout
    finally:
        _cleanup(up, children)
