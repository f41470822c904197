"""The exchange trace: node processes record the hops of each exchange, `afd bench cluster --trace-exchanges`
splits them (afd/exchange_trace.py, benchmarks/exchange_trace.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.exchange_trace import HOPS, analyze, analyze_rounds

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, events: list[tuple[float, str, int, float]]) -> None:
    path.write_text("".join(f"{t:.6f} {name} {key} {cpu:.6f}\n" for t, name, key, cpu in events))


def _one_cluster(folder: Path, start: float, seqs: tuple[int, int]) -> None:
    """Two m = 1 exchanges (layers 0 and 1) with hops of known length (ms): attention half 2, send 0.2,
    send -> read 0.3, read -> compute 0.1, compute 3, encode 0.05, encoded -> reply read 0.25, reply -> combined 0.2."""
    folder.mkdir(parents=True)
    attention, ffn = [], []
    t = start
    for layer, seq in enumerate(seqs):
        ms = 1e-3
        attention += [(t, "attn_half", layer, 0.0), (t + 2 * ms, "send", 0, 1.0), (t + 2.2 * ms, "sent", seq, 1.0002)]
        ffn += [(t + 2.5 * ms, "frame_read", seq, 0.0), (t + 2.6 * ms, "compute", 1, 0.0)]
        ffn += [(t + 5.6 * ms, "computed", 1, 0.0), (t + 5.65 * ms, "encoded", seq, 0.0)]
        attention += [(t + 2.3 * ms, "combine", layer, 0.0), (t + 5.9 * ms, "reply_read", seq, 0.0)]
        attention += [(t + 6.1 * ms, "combined", layer, 0.0)]
        t += 10 * ms
    _write(folder / "trace-100.txt", sorted(attention))
    _write(folder / "trace-200.txt", ffn)


def test_hops_are_matched_by_sequence_number_and_pooled_over_clusters(tmp_path: Path) -> None:
    # two clusters whose sequence numbers overlap: each folder is matched on its own
    _one_cluster(tmp_path / "m1" / "cluster-0", 10.0, (1, 2))
    _one_cluster(tmp_path / "m1" / "cluster-1", 20.0, (1, 2))
    result = analyze_rounds(tmp_path / "m1")
    assert result["exchanges"] == 4
    expected = {
        "attention half": 2.0,
        "send": 0.2,
        "send -> frame read": 0.3,
        "frame read -> compute": 0.1,
        "compute": 3.0,
        "computed -> encoded": 0.05,
        "encoded -> reply read": 0.25,
        "reply read -> combined": 0.2,
        "exchange": 4.1,
    }
    assert set(result["hops_ms"]) == set(HOPS)
    for hop, ms in expected.items():
        assert result["hops_ms"][hop]["p50"] == pytest.approx(ms, abs=2e-3), hop
    assert result["overhead_ms"]["p50"] == pytest.approx(0.2 + 0.3 + 0.1 + 0.05 + 0.25 + 0.2, abs=2e-3)
    assert result["send_cpu_ms"]["p50"] == pytest.approx(0.2, abs=2e-3)


def test_a_frame_without_its_ffn_side_is_left_out(tmp_path: Path) -> None:
    _one_cluster(tmp_path / "c", 1.0, (5, 6))
    ffn = tmp_path / "c" / "trace-200.txt"
    ffn.write_text("".join(line + "\n" for line in ffn.read_text().splitlines() if not line.endswith(" 6 0.000000")))
    result = analyze([tmp_path / "c"])
    assert result["exchanges"] == 1


def test_a_node_process_traces_only_with_the_variable_set(tmp_path: Path) -> None:
    """install_from_env wraps the exchange path's entry points and writes the events at exit; unset, nothing."""
    probe = (
        "import afd.exchange_trace as t, attn_nodes.runner as r, ffn_nodes.batching as b\n"
        "t.install_from_env()\n"
        "print(hasattr(r.ModelRunner._combine, '__wrapped__'), hasattr(b.Batcher._timed_compute, '__wrapped__'))\n"
        "t._recorder and t._recorder.mark('combined', 3)\n"
    )
    env = {**os.environ, "AFD_EXCHANGE_TRACE": str(tmp_path / "on")}
    on = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert on.returncode == 0, on.stderr
    assert on.stdout.split() == ["True", "True"]
    (trace,) = (tmp_path / "on").glob("trace-*.txt")
    assert trace.read_text().split()[1:3] == ["combined", "3"]
    env.pop("AFD_EXCHANGE_TRACE")
    off = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert off.returncode == 0, off.stderr
    assert off.stdout.split() == ["False", "False"]


def test_bench_cluster_refuses_to_trace_the_grpc_transport(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestration.cli import app

    result = CliRunner().invoke(app, ["bench", "cluster", "--transport", "grpc", "--trace-exchanges", str(tmp_path)])
    assert result.exit_code == 2
    words = " ".join(result.output.replace("│", " ").split())  # the message as rich boxes and wraps it
    assert "time the channel transports (shm, gloo), not grpc" in words
    assert not any(tmp_path.iterdir())  # refused before any cluster started
