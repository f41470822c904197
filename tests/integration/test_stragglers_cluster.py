"""A straggler under load on the local cluster (issue 11 item 4): SIGSTOP of an FFN node for 30 s.

The attention node's exchange deadlines (afd/transport/deadlines.py) find it late long before the router's
heartbeat timeout; the router moves its experts to the other nodes at a new placement version and the
stalled step re-runs there. No request fails, every text equals the in-process engine's, and after SIGCONT
the node holds experts again at a later placement version.
"""

from __future__ import annotations

import signal
import time

import pytest

from orchestration.local_cluster import LocalCluster
from tests.integration.test_cluster import Load, _wait_for, cluster, expected, model  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

FREEZE_S = 30.0


def _ffn_view(c: LocalCluster) -> tuple[int, dict[str, dict]]:
    view = c.cluster()
    return view["placement_version"], {n["node_id"]: n for n in view["nodes"] if n["role"] == "ffn"}


def test_a_frozen_ffn_node_is_withdrawn_as_a_straggler_and_comes_back(cluster, expected):  # noqa: F811
    c = cluster(ffn=3)
    load = Load(c, threads=2)
    victim = c.nodes["ffn-1"]
    frozen = False
    try:
        _wait_for(lambda: len(load.results) >= 4, 60, "first results (the deadlines' warm-up)")
        version_before, _ = _ffn_view(c)
        victim.process.send_signal(signal.SIGSTOP)
        frozen, frozen_at = True, time.monotonic()

        def withdrawn() -> bool:
            version, ffn = _ffn_view(c)
            return version > version_before and not ffn["ffn-1"]["experts"]

        _wait_for(withdrawn, 20, "a placement without the frozen node")
        withdrawn_after = time.monotonic() - frozen_at
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 4, 20, "results while the node is frozen")
        time.sleep(max(0.0, FREEZE_S - (time.monotonic() - frozen_at)))  # the freeze lasts 30 s
        version_frozen, _ = _ffn_view(c)
        victim.process.send_signal(signal.SIGCONT)
        frozen = False

        def back() -> bool:
            version, ffn = _ffn_view(c)
            return version > version_frozen and bool(ffn["ffn-1"]["experts"]) and ffn["ffn-1"]["state"] == "ready"

        _wait_for(back, 30, "the node back in the placement after SIGCONT")
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 2, 30, "results after it came back")
    finally:
        if frozen:
            victim.process.send_signal(signal.SIGCONT)
        load.stop()
    assert load.failures == []
    assert all(text == expected[prompt] for prompt, text in load.results)
    router_log = c.router.log_path.read_text(errors="replace")
    assert "node ffn-1 degraded" in router_log, "the attention node's deadlines did not find the straggler"
    # Withdrawn by its deadlines, not only once the router's heartbeat timeout (6 s) declared it dead.
    degraded_at = router_log.index("node ffn-1 degraded")
    assert "node ffn-1 declared dead" not in router_log[:degraded_at]
    assert withdrawn_after < 20.0
    print(
        f"withdrawn {withdrawn_after:.1f} s after SIGSTOP; router: "
        + "; ".join(line.split(" ", 2)[-1][:160] for line in router_log.splitlines() if "ffn-1" in line)
    )
