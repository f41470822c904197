"""What nodes report in heartbeats, turned into the router's Prometheus metrics.

Expert counts are per local expert of the placement an FFN node computed under, which may be an older
one (or one not yet committed) while a placement change propagates: the recent placements are kept by
version so that each count lands on the expert it was for.
"""

from __future__ import annotations

import logging

from afd.placement import ExpertPlacement
from afd.wire.generated import afd_cluster_pb2 as pb
from router.membership import Membership, NodeRecord, NodeState
from router.metrics import RouterMetrics

log = logging.getLogger("afd.router")

RECENT_PLACEMENTS = 4
"""Placements remembered for mapping expert counts (an FFN node holds at most two at a time)."""


class LoadMetrics:
    """Records heartbeat loads and node counts into `metrics`."""

    def __init__(self, metrics: RouterMetrics, membership: Membership) -> None:
        self.metrics = metrics
        self.membership = membership
        self._recent_placements: dict[int, ExpertPlacement] = {}

    def remember(self, placement: ExpertPlacement) -> None:
        """A placement was planned (FFN nodes may report under it before it is committed)."""
        self._recent_placements[placement.version] = placement
        for version in sorted(self._recent_placements)[:-RECENT_PLACEMENTS]:
            del self._recent_placements[version]

    def record(self, node: NodeRecord, load: pb.NodeLoad, version: int) -> None:
        """`version`: the placement the node computed under; its expert counts are per expert it held then."""
        metrics = self.metrics
        if node.role == "ffn":
            metrics.ffn_busy.labels(node.node_id).set(load.busy_fraction)
            placement = self._recent_placements.get(version)
            if placement is not None and node.node_id in placement.nodes:
                held = placement.experts[placement.index(node.node_id)]
                for expert, count in zip(held, load.expert_token_counts, strict=False):
                    if count:
                        metrics.expert_tokens.labels(str(expert)).inc(count)
            elif any(load.expert_token_counts):
                log.debug("dropped expert counts of %s under unknown placement v%d", node.node_id, version)
        for transfer in load.transfers:
            layer = str(transfer.layer)
            metrics.layer_round_trips.labels(layer).inc(transfer.round_trips)
            metrics.layer_round_trip_seconds.labels(layer).inc(transfer.seconds)
            metrics.activation_bytes.labels("attention_to_ffn").inc(transfer.bytes_sent)
            metrics.activation_bytes.labels("ffn_to_attention").inc(transfer.bytes_received)
        attention = self.membership.of_role("attention", NodeState.READY, NodeState.DRAINING)
        model = metrics.model_name
        metrics.num_requests_running.labels(model).set(sum(n.load.num_running for n in attention))
        metrics.num_requests_waiting.labels(model).set(sum(n.load.num_waiting for n in attention))
        if attention:
            metrics.kv_cache_usage.labels(model).set(sum(n.load.kv_cache_usage for n in attention) / len(attention))

    def count_nodes(self) -> None:
        """Refresh afd:nodes{role,state} from the membership table."""
        self.metrics.nodes.clear()
        for (role, state), count in self.membership.counts().items():
            self.metrics.nodes.labels(role, state).set(count)
