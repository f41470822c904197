"""What nodes report in heartbeats, turned into the router's Prometheus metrics.

Expert counts are per local expert of the placement an FFN node computed under, which may be an older
one (or one not yet committed) while a placement change propagates: the recent placements are kept by
version so that each count lands on the expert it was for.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from afd.placement import ExpertPlacement
from afd.wire.generated import afd_cluster_pb2 as pb
from router.membership import Membership, NodeRecord, NodeState
from router.metrics import RouterMetrics

log = logging.getLogger("afd.router")

RECENT_PLACEMENTS = 4
"""Placements remembered for mapping expert counts (an FFN node holds at most two at a time)."""

DEFAULT_WINDOW_S = 30.0
"""Span of the sliding window of expert load that hot-expert replication plans from, seconds."""


class ExpertLoadWindow:
    """Token-expert pairs per global expert (and per FFN node) over the last `window_s` seconds.

    Fed with every heartbeat's counts (already mapped to global expert ids); old samples fall out as
    time passes, so the replica planner sees the recent load, not the load since the router started.
    """

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        if window_s <= 0:
            raise ValueError(f"the expert load window must be positive, got {window_s} s")
        self.window_s = window_s
        self._samples: deque[tuple[float, str, dict[int, int]]] = deque()

    def add(self, node_id: str, counts: dict[int, int], now: float | None = None) -> None:
        """`counts`: global expert -> token-expert pairs `node_id` computed since its previous report."""
        if counts:
            self._samples.append((time.monotonic() if now is None else now, node_id, counts))

    def _expire(self, now: float | None) -> None:
        cutoff = (time.monotonic() if now is None else now) - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()

    def per_expert(self, now: float | None = None) -> dict[int, int]:
        """Global expert -> token-expert pairs in the window, over every node that computed it."""
        self._expire(now)
        totals: dict[int, int] = {}
        for _, _, counts in self._samples:
            for expert, count in counts.items():
                totals[expert] = totals.get(expert, 0) + count
        return totals

    def per_node(self, now: float | None = None) -> dict[str, int]:
        """FFN node -> token-expert pairs it computed in the window."""
        self._expire(now)
        totals: dict[str, int] = {}
        for _, node_id, counts in self._samples:
            totals[node_id] = totals.get(node_id, 0) + sum(counts.values())
        return totals

    def clear(self) -> None:
        self._samples.clear()


class LoadMetrics:
    """Records heartbeat loads and node counts into `metrics`."""

    def __init__(self, metrics: RouterMetrics, membership: Membership, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.metrics = metrics
        self.membership = membership
        self._recent_placements: dict[int, ExpertPlacement] = {}
        self.expert_totals: dict[str, dict[int, int]] = {}
        """Per FFN node: tokens computed per global expert since the router started (`afd status`'s heatmap)."""
        self.window = ExpertLoadWindow(window_s)
        """The recent expert load (what hot-expert replication plans from)."""
        self._reported: set[str] = set()
        """Nodes with per-node gauges, so that a departed node's series can be removed."""

    def remember(self, placement: ExpertPlacement) -> None:
        """A placement was planned (FFN nodes may report under it before it is committed)."""
        self._recent_placements[placement.version] = placement
        for version in sorted(self._recent_placements)[:-RECENT_PLACEMENTS]:
            del self._recent_placements[version]

    def record(self, node: NodeRecord, load: pb.NodeLoad, version: int) -> None:
        """`version`: the placement the node computed under; its expert counts are per expert it held then."""
        metrics = self.metrics
        node_id = node.node_id
        self._reported.add(node_id)
        metrics.node_tokens_per_second.labels(node_id, node.role).set(node.tokens_per_s)
        if node.role == "ffn":
            metrics.ffn_busy.labels(node_id).set(load.busy_fraction)
            placement = self._recent_placements.get(version)
            if placement is not None and node_id in placement.nodes:
                held = placement.experts[placement.index(node_id)]
                totals = self.expert_totals.setdefault(node_id, {})
                recent: dict[int, int] = {}
                for expert, count in zip(held, load.expert_token_counts, strict=False):
                    if count:
                        metrics.expert_tokens.labels(str(expert)).inc(count)
                        metrics.node_expert_tokens.labels(node_id, str(expert)).inc(count)
                        totals[expert] = totals.get(expert, 0) + count
                        recent[expert] = count
                self.window.add(node_id, recent)
            elif any(load.expert_token_counts):
                log.debug("dropped expert counts of %s under unknown placement v%d", node_id, version)
        else:
            metrics.node_requests_running.labels(node_id).set(load.num_running)
            metrics.node_requests_waiting.labels(node_id).set(load.num_waiting)
            metrics.node_kv_cache_usage.labels(node_id).set(load.kv_cache_usage)
        for transfer in load.transfers:
            layer = str(transfer.layer)
            metrics.layer_round_trips.labels(layer).inc(transfer.round_trips)
            metrics.layer_round_trip_seconds.labels(layer).inc(transfer.seconds)
            metrics.layer_wait_seconds.labels(layer).inc(transfer.wait_seconds)
            metrics.activation_bytes.labels("attention_to_ffn").inc(transfer.bytes_sent)
            metrics.activation_bytes.labels("ffn_to_attention").inc(transfer.bytes_received)
            metrics.layer_activation_bytes.labels(layer, "attention_to_ffn").inc(transfer.bytes_sent)
            metrics.layer_activation_bytes.labels(layer, "ffn_to_attention").inc(transfer.bytes_received)
        attention = self.membership.of_role("attention", NodeState.READY, NodeState.DRAINING)
        model = metrics.model_name
        metrics.num_requests_running.labels(model).set(sum(n.load.num_running for n in attention))
        metrics.num_requests_waiting.labels(model).set(sum(n.load.num_waiting for n in attention))
        if attention:
            metrics.kv_cache_usage.labels(model).set(sum(n.load.kv_cache_usage for n in attention) / len(attention))

    def count_nodes(self) -> None:
        """Refresh afd:nodes{role,state} from the membership table; drop the gauges of nodes that are gone."""
        self.metrics.nodes.clear()
        for (role, state), count in self.membership.counts().items():
            self.metrics.nodes.labels(role, state).set(count)
        for node_id in list(self._reported):
            record = self.membership.get(node_id)
            if record is None or record.state in (NodeState.DEAD, NodeState.LEFT):
                self.metrics.forget_node(node_id)
                self._reported.discard(node_id)

    def expert_load(self) -> dict[str, dict[str, int]]:
        """Tokens per expert of each FFN node still in the cluster: {node_id: {expert id: tokens}} (JSON keys)."""
        live = {
            record.node_id
            for record in self.membership.nodes.values()
            if record.state not in (NodeState.DEAD, NodeState.LEFT)
        }
        return {
            node_id: {str(expert): count for expert, count in sorted(counts.items())}
            for node_id, counts in sorted(self.expert_totals.items())
            if node_id in live
        }
