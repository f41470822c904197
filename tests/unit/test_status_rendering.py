"""`afd status`: the node table, the live view (`--watch`) and the expert-load heatmap (`--expert-heatmap`).

Experts held show as compact ranges, never as a misleading min..max. The live view is driven with a fake
fetch (bounded refreshes, a router that goes away, Ctrl-C); tests/integration/test_status_cli.py runs the
CLI against a fake router.
"""

from __future__ import annotations

import io
import struct

import httpx
import pytest
from rich.console import Console

from afd.errors import AfdError, ConfigError
from orchestration.status_view import cluster_table, expert_load_matrix, expert_ranges, watch, write_expert_heatmap


@pytest.mark.parametrize(
    ("experts", "shown"),
    [
        ([0, 1, 2, 5, 7, 8], "0-2,5,7-8"),
        ([15, 6, 14, 7, 13], "6-7,13-15"),  # after a rebalance: not contiguous, not sorted
        ([3], "3"),
        (list(range(16)), "0-15"),
    ],
)
def test_expert_ranges(experts, shown):
    assert expert_ranges(experts) == shown


# --- the node table, `--watch`, `--expert-heatmap` ----------------------------------------------------------

VIEW = {
    "model": "Qwen3MoeForCausalLM",
    "placement_version": 4,
    "num_experts": 8,
    "nodes": [
        {
            "node_id": "attn-0", "role": "attention", "state": "ready", "device_kind": "cuda:H100",
            "device_count": 1, "device_memory_bytes": 80 * 2**30, "num_running": 3, "num_waiting": 1,
            "kv_cache_usage": 0.95, "busy_fraction": 0.0, "experts": [], "tokens_per_s": 41.5, "microbatches": 2,
        },
        {
            "node_id": "ffn-0", "role": "ffn", "state": "ready", "device_kind": "cpu", "device_count": 1,
            "device_memory_bytes": 0, "num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0,
            "busy_fraction": 0.375, "experts": [0, 1, 2, 3], "tokens_per_s": 20.0, "microbatches": None,
        },
        {
            "node_id": "ffn-1", "role": "ffn", "state": "draining", "device_kind": "cpu", "device_count": 2,
            "device_memory_bytes": 0, "num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0,
            "busy_fraction": 0.5, "experts": [4, 5, 6, 7, 3], "tokens_per_s": 22.0, "microbatches": None,
        },
    ],
    "expert_load": {"ffn-0": {"0": 5, "3": 1}, "ffn-1": {"3": 2, "7": 9}},
}  # fmt: skip


def _console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, color_system=None, width=160)


def _text(console: Console) -> str:
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_the_table_shows_role_device_load_kv_busy_and_experts_per_node():
    console = _console()
    console.print(cluster_table(VIEW))
    out = _text(console)
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith(("attn-", "ffn-"))}
    attn, ffn0, ffn1 = (" ".join(rows[name]) for name in ("attn-0", "ffn-0", "ffn-1"))
    assert attn == "attn-0 attn ready cuda:H100, 80 GiB 3 run, 1 wait, m=2 95% - - 41.5"
    assert ffn0 == "ffn-0 ffn ready cpu - 38% 4 (0-3) 20.0"
    assert ffn1 == "ffn-1 ffn draining cpu x2 - 50% 5 (3-7) 22.0"
    assert "placement v4" in out


def test_the_table_fits_80_columns_without_cutting_names_or_figures():
    console = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=80)
    console.print(cluster_table(VIEW))
    out = _text(console)
    assert max(len(line) for line in out.splitlines()) <= 80
    for figure in ("attn-0", "draining", "95%", "38%", "4 (0-3)", "41.5"):
        assert figure in out and "…" not in out


def test_watch_redraws_each_refresh_and_stops_after_the_bound():
    views = iter([VIEW, {**VIEW, "placement_version": 5}, {**VIEW, "placement_version": 6}])
    fetched = []

    def fetch():
        fetched.append(1)
        return next(views)

    console = _console()
    assert watch(fetch, interval_s=0.1, iterations=2, console=console) == 2
    assert len(fetched) == 2  # bounded: no third request
    out = _text(console)
    assert "placement v4" in out and "placement v5" in out and "placement v6" not in out
    assert "Ctrl-C to stop" in out


def test_watch_keeps_the_last_table_when_the_router_is_away_and_ends_cleanly_on_ctrl_c():
    calls = []

    def fetch():
        calls.append(1)
        if len(calls) == 1:
            return VIEW
        if len(calls) == 2:
            raise httpx.ConnectError("connection refused")
        raise KeyboardInterrupt  # Ctrl-C during the third refresh

    console = _console()
    assert watch(fetch, interval_s=0.1, console=console) == 2  # iterations=0: only Ctrl-C ends it
    out = _text(console)
    assert "router unreachable: ConnectError: connection refused" in out
    assert out.count("placement v4") >= 2  # the error frame still shows the last good table


def test_watch_refuses_a_busy_loop():
    with pytest.raises(ConfigError, match="--interval must be at least"):
        watch(lambda: VIEW, interval_s=0.0, iterations=1)


def test_expert_matrix_and_heatmap_png(tmp_path):
    rows, matrix = expert_load_matrix(VIEW)
    assert rows == ["ffn-0", "ffn-1"]
    assert matrix == [[5, 0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 2, 0, 0, 0, 9]]
    path = write_expert_heatmap(VIEW, tmp_path / "experts.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 600 and height >= 200
    with pytest.raises(AfdError, match="no expert token counts yet"):
        write_expert_heatmap({**VIEW, "expert_load": {}}, tmp_path / "none.png")
    with pytest.raises(AfdError, match="no routed experts"):
        expert_load_matrix({**VIEW, "num_experts": 0})
