"""`afd bench transport` runs its peers in separate processes and prints parsable rows (tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cluster_helpers import REPO_ROOT

BANDWIDTH_KEYS = {
    "size_bytes", "count", "type", "time_us", "algbw_gbps", "busbw_gbps", "tcp_algbw_gbps", "ratio_vs_tcp",
}  # fmt: skip


AFD = [sys.executable, "-c", "import sys; from orchestration.cli import main; sys.argv[0] = 'afd'; main()"]


def run_afd(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([*AFD, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)


def run_bench(*args: str) -> list[dict]:
    done = run_afd("bench", "transport", *args, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_shm_sendrecv_rows_carry_sizes_and_ratios():
    rows = run_bench("--transport", "shm", "--max-bytes", "65536", "--latency-iters", "20")
    bandwidth = [row for row in rows if row["kind"] == "bandwidth"]
    assert [row["size_bytes"] for row in bandwidth] == [4096, 16384, 65536]
    for row in bandwidth:
        assert BANDWIDTH_KEYS | {"ratio_vs_memcpy"} <= set(row)
        assert row["algbw_gbps"] > 0 and row["ratio_vs_tcp"] > 0 and row["ratio_vs_memcpy"] > 0
        assert row["count"] * 2 == row["size_bytes"] and row["type"] == "bfloat16"
    (latency,) = [row for row in rows if row["kind"] == "latency"]
    assert latency["size_bytes"] == 65536
    assert 0 < latency["shm_p50_us"] <= latency["shm_p99_us"]
    assert 0 < latency["tcp_p50_us"] <= latency["tcp_p99_us"]


@pytest.mark.parametrize("transport", ["gloo", "grpc"])
def test_m2n_pattern_runs_every_sender_and_receiver(transport):
    rows = run_bench(
        "--transport", transport, "--pattern", "m2n", "--senders", "2", "--receivers", "2",
        "--max-bytes", "4096", "--latency-iters", "10",
    )  # fmt: skip
    (row,) = [row for row in rows if row["kind"] == "bandwidth"]
    assert (row["senders"], row["receivers"], row["pattern"]) == (2, 2, "m2n")
    assert row["busbw_gbps"] == pytest.approx(2 * row["algbw_gbps"])  # 2 senders' worth crossing the fabric
    assert "ratio_vs_memcpy" not in row


def test_unknown_transport_is_refused():
    done = run_afd("bench", "transport", "--transport", "smoke-signals")
    assert done.returncode != 0 and "--transport must be one of" in done.stderr
