"""Least pressure: the attention node with the least work per unit of its measured speed.

Work is what the node runs and queues (or what the router streams from it, if more: heartbeats lag), plus
the request being placed; speed is its pool's per-kind figure (router.membership.pool_speeds), so a node twice
as fast takes about twice the requests. A node whose KV cache is nearly full counts four times: it would
have to preempt to take more, so it gets requests only when the others are much busier.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.membership import NodeRecord, pool_speeds

KV_NEARLY_FULL = 0.95
"""KV cache usage (0..1) above which a node's pressure is multiplied by KV_FULL_PENALTY."""
KV_FULL_PENALTY = 4.0


class LeastPressurePolicy:
    name = "least_pressure"

    def select(self, candidates: Sequence[NodeRecord]) -> NodeRecord:
        speeds = pool_speeds(list(candidates), "attention")

        def pressure(node: NodeRecord) -> float:
            queued = max(node.inflight, node.load.num_running + node.load.num_waiting)
            penalty = KV_FULL_PENALTY if node.load.kv_cache_usage > KV_NEARLY_FULL else 1.0
            return (queued + 1) / speeds[node.node_id] * penalty

        return min(candidates, key=pressure)

    def on_request_start(self, node: NodeRecord) -> None:
        """Nothing to keep: the controller counts requests in flight per node (NodeRecord.inflight)."""

    def on_request_end(self, node: NodeRecord) -> None:
        """Nothing to keep."""
