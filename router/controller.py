"""The control plane: membership, the expert placement table and its live changes, node selection.

Every change of the FFN pool (a node joins, drains or dies) is one reconfiguration, serialised by a lock:
1. plan the new placement (minimal movement, proportional to node speed), version v+1;
2. every FFN node of the new placement loads its share of v+1 (keeping v for frames still in flight);
3. every attention node switches to v+1 between two steps (an FFN node drops v when v+2 arrives).
Attention nodes therefore never address an FFN node that has not loaded its experts, and a failed FFN
node's experts are reloaded by the survivors before the interrupted steps are re-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.wire.auth import ClusterAuth
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from afd.wire.placement_proto import placement_to_proto
from router.expert_placement import plan_placement
from router.membership import Capacity, Load, Membership, NodeRecord, NodeState, Role
from router.metrics import RouterMetrics
from router.microbatch_plan import cpu_nodes_share_one_host, plan_microbatches, step_costs

log = logging.getLogger("afd.router")

_ROLES: dict[int, Role] = {pb.ROLE_ATTENTION: "attention", pb.ROLE_FFN: "ffn"}
_STATES = {
    NodeState.JOINING: pb.NODE_STATE_JOINING,
    NodeState.READY: pb.NODE_STATE_READY,
    NodeState.DRAINING: pb.NODE_STATE_DRAINING,
    NodeState.LEFT: pb.NODE_STATE_LEFT,
    NodeState.DEAD: pb.NODE_STATE_DEAD,
}


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    heartbeat_interval_s: float = 1.0
    """How often nodes report."""
    node_timeout_s: float = 6.0
    """A node silent this long is dead."""
    rpc_timeout_s: float = 120.0
    """Longest a node may take to load experts or switch placement."""
    microbatches: int | None = None
    """Fixed microbatch count for every attention node; None = plan from capacity profiles (auto)."""


RECENT_PLACEMENTS = 4
"""Placements the controller remembers for mapping expert counts (an FFN node holds at most two)."""


class Controller:
    def __init__(
        self,
        spec: ModelSpec,
        auth: ClusterAuth,
        metrics: RouterMetrics,
        config: ControllerConfig,
        model_fingerprint: str | None = None,
    ) -> None:
        """model_fingerprint: afd.model_spec.model_fingerprint of the served checkpoint; nodes registering
        with another one are refused. None accepts any (a controller driven directly by tests)."""
        self.spec = spec
        self.model_fingerprint = model_fingerprint
        self.auth = auth
        self.metrics = metrics
        self.config = config
        self.membership = Membership(config.node_timeout_s)
        self.placement: ExpertPlacement | None = None
        # Versions start at the router's start time (ms), so the placements of a restarted router supersede
        # the ones nodes still hold from its predecessor.
        self._last_version = int(time.time() * 1000)
        self._reconfigure = asyncio.Lock()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._placement_changed = asyncio.Event()
        self._tasks: set[asyncio.Future] = set()
        self._recent_placements: dict[int, ExpertPlacement] = {}
        """Version -> placement, for the last RECENT_PLACEMENTS planned: FFN nodes report expert counts
        under the version they computed with, which may be an older or a not yet committed one."""
        top_k = max((layer.moe.top_k for layer in spec.layers if layer.moe), default=0)
        self._top_k = top_k

    # ---- node RPCs -----------------------------------------------------------------------------------
    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = self.auth.aio_channel(address)
        return self._channels[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=None)
        self._channels.clear()

    def attention_stub(self, node: NodeRecord) -> pb_grpc.AttentionNodeStub:
        return pb_grpc.AttentionNodeStub(self._channel(node.address))

    def _placement_message(self, placement: ExpertPlacement | None) -> pb.Placement:
        if placement is None:
            return pb.Placement(version=-1)
        addresses = {n: self.membership.nodes[n].address for n in placement.nodes if n in self.membership.nodes}
        message = placement_to_proto(placement, addresses)
        # Attention nodes stop waiting on these at once (a frozen node would otherwise hold every step
        # for the full reply timeout after the router already knows it is gone).
        message.dead_nodes.extend(n.node_id for n in self.membership.of_role("ffn", NodeState.DEAD))
        return message

    # ---- Router service --------------------------------------------------------------------------------
    async def register(self, request: pb.RegisterRequest) -> pb.RegisterResponse:
        role = _ROLES.get(request.role)
        if role is None or not request.node_id or not request.address:
            raise ValueError("register needs node_id, address and role attention or ffn")
        if self.model_fingerprint is not None and request.model_fingerprint != self.model_fingerprint:
            raise ValueError(
                f"node {request.node_id} serves a checkpoint with fingerprint "
                f"{request.model_fingerprint or '(none)'}, the router serves {self.model_fingerprint}: "
                "every node must be started with the same --model (its config.json differs)"
            )
        record = NodeRecord(
            node_id=request.node_id,
            role=role,
            address=request.address,
            capacity=_capacity(request.capacity),
            transports=tuple(request.transports),
            state=NodeState.READY if role == "attention" else NodeState.JOINING,
        )
        replaced = self.membership.add(record)
        log.info("node %s (%s) registered at %s", record.node_id, role, record.address)
        if role == "ffn":
            # A restarted FFN node (same id) holds nothing any more: plan as if it were new.
            task = asyncio.ensure_future(self._join_ffn(record, replaced is not None))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._update_node_metrics()
        return pb.RegisterResponse(
            heartbeat_interval_ms=int(self.config.heartbeat_interval_s * 1000),
            placement=self._placement_message(self.placement),
        )

    async def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        node = self.membership.get(request.node_id)
        if node is None or not node.alive:
            # Unknown (e.g. the router restarted) or declared dead: the node must register again.
            raise LookupError(f"node {request.node_id} is not registered")
        load = request.load
        node.observe(
            Load(load.num_running, load.num_waiting, load.kv_cache_usage, load.busy_fraction, load.generated_tokens),
            time.monotonic(),
        )
        node.placement_version = request.placement_version
        self._record_load(node, load, request.placement_version)
        response = pb.HeartbeatResponse(drain=node.state is NodeState.DRAINING)
        if self.placement is not None and request.placement_version < self.placement.version:
            response.placement.CopyFrom(self._placement_message(self.placement))
        if node.role == "attention":
            response.microbatches = self.microbatches_for(node)
        return response

    async def leave(self, request: pb.LeaveRequest) -> pb.LeaveResponse:
        """Graceful departure: an FFN node's experts move first; an attention node stops getting requests."""
        node = self.membership.get(request.node_id)
        if node is None:
            return pb.LeaveResponse()
        log.info("node %s leaving: %s", node.node_id, request.reason or "no reason given")
        if node.role == "ffn" and node.state in (NodeState.READY, NodeState.JOINING):
            node.state = NodeState.DRAINING
            await self.rebalance(f"{node.node_id} leaves")
        node.state = NodeState.LEFT if node.role == "ffn" else NodeState.DRAINING
        self._update_node_metrics()
        return pb.LeaveResponse()

    async def report_peer_failure(self, request: pb.PeerFailureReport) -> pb.PeerFailureResponse:
        await self.declare_dead(request.peer_id, f"reported by {request.reporter_id}: {request.error}")
        return pb.PeerFailureResponse(placement=self._placement_message(self.placement))

    def mark_attention_departed(self, node_id: str) -> None:
        node = self.membership.get(node_id)
        if node is not None and node.role == "attention":
            node.state = NodeState.LEFT
            self._update_node_metrics()

    # ---- failures --------------------------------------------------------------------------------------
    async def declare_dead(self, node_id: str, why: str) -> None:
        node = self.membership.get(node_id)
        if node is None or node.state in (NodeState.DEAD, NodeState.LEFT):
            if self.placement is not None and node_id in self.placement.nodes:
                await self.rebalance(f"{node_id} is gone")
            return
        log.warning("node %s declared dead: %s", node_id, why)
        node.state = NodeState.DEAD
        self._update_node_metrics()
        if node.role == "ffn":
            await self.rebalance(f"{node_id} died")

    async def watch(self, stop: asyncio.Event) -> None:
        """Declare nodes dead when their heartbeats stop."""
        while not stop.is_set():
            for node in self.membership.expired():
                await self.declare_dead(node.node_id, f"no heartbeat for {self.config.node_timeout_s:.0f} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.heartbeat_interval_s)

    # ---- reconfiguration -------------------------------------------------------------------------------
    async def _join_ffn(self, node: NodeRecord, restarted: bool) -> None:
        if restarted and self.placement is not None and node.node_id in self.placement.nodes:
            await self.rebalance(f"{node.node_id} restarted", force=True)
        else:
            await self.rebalance(f"{node.node_id} joins")

    async def rebalance(self, reason: str, force: bool = False) -> None:
        """Make the placement match the live FFN pool (joining + ready nodes)."""
        async with self._reconfigure:
            pool = [n for n in self.membership.of_role("ffn", NodeState.JOINING, NodeState.READY)]
            current = self.placement
            if not force and current is not None and set(current.nodes) == {n.node_id for n in pool}:
                return
            if not pool:
                log.error("no FFN node left (%s): requests wait until one joins", reason)
                self.placement = None
                return
            self._last_version += 1
            version = self._last_version
            placement = plan_placement(
                self.spec.num_experts, pool_speeds(pool, "ffn"), previous=current, version=version
            )
            self._remember(placement)
            log.info(
                "placement v%d (%s): %s",
                version,
                reason,
                dict(zip(placement.nodes, map(len, placement.experts), strict=True)),
            )
            failed = await self._broadcast_ffn(placement)
            if failed:
                for node_id, error in failed.items():
                    node = self.membership.get(node_id)
                    if node is not None:
                        node.state = NodeState.DEAD
                    log.warning("FFN node %s failed to load v%d: %s", node_id, version, error)
                self._reconfigure.release()
                try:
                    await self.rebalance(f"{reason}; load failed on {sorted(failed)}")
                finally:
                    await self._reconfigure.acquire()
                return
            for node in pool:
                node.state = NodeState.READY
            self.placement = placement
            self.metrics.placement_version.set(version)
            await self._broadcast_attention(placement)
            self._placement_changed.set()
            self._placement_changed = asyncio.Event()
            self._update_node_metrics()

    async def _call_all(
        self, nodes: list[NodeRecord], call: Callable[[NodeRecord], Awaitable[Any]]
    ) -> dict[str, BaseException]:
        results = await asyncio.gather(*(call(n) for n in nodes), return_exceptions=True)
        return {n.node_id: r for n, r in zip(nodes, results, strict=True) if isinstance(r, BaseException)}

    async def _broadcast_ffn(self, placement: ExpertPlacement) -> dict[str, BaseException]:
        message = pb.LoadExpertsRequest(placement=self._placement_message(placement))
        nodes = [self.membership.nodes[n] for n in placement.nodes]

        async def load(node: NodeRecord) -> None:
            stub = pb_grpc.FfnNodeStub(self._channel(node.address))
            await stub.LoadExperts(message, timeout=self.config.rpc_timeout_s)

        return await self._call_all(nodes, load)

    async def _broadcast_attention(self, placement: ExpertPlacement) -> None:
        message = self._placement_message(placement)
        nodes = self.membership.of_role("attention", NodeState.READY, NodeState.DRAINING)

        async def update(node: NodeRecord) -> None:
            await self.attention_stub(node).UpdatePlacement(message, timeout=self.config.rpc_timeout_s)
            node.placement_version = placement.version

        for node_id, error in (await self._call_all(nodes, update)).items():
            # It will pick the placement up from its next heartbeat, or be declared dead.
            log.warning("attention node %s did not take placement v%d: %s", node_id, placement.version, error)

    async def wait_for_placement(self, timeout: float) -> ExpertPlacement | None:
        if self.placement is None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._placement_changed.wait(), timeout)
        return self.placement

    # ---- request placement -----------------------------------------------------------------------------
    def pick_attention_node(self, exclude: set[str] = frozenset()) -> NodeRecord | None:  # type: ignore[assignment]
        """The ready attention node with the least work per unit of speed that is on the current placement."""
        version = self.placement.version if self.placement else None
        candidates = [
            n
            for n in self.membership.of_role("attention")
            if n.node_id not in exclude and version is not None and n.placement_version >= version
        ]
        if not candidates:
            return None

        speeds = pool_speeds(candidates, "attention")

        def pressure(node: NodeRecord) -> float:
            kv_full = node.load.kv_cache_usage > 0.95
            queued = max(node.inflight, node.load.num_running + node.load.num_waiting)
            return (queued + 1) / speeds[node.node_id] * (4.0 if kv_full else 1.0)

        return min(candidates, key=pressure)

    def microbatches_for(self, node: NodeRecord) -> int:
        if self.config.microbatches is not None:
            return self.config.microbatches
        ffn = self.membership.of_role("ffn")
        if not ffn:
            return 1
        attention = (node.address, node.capacity.device_kind)
        if cpu_nodes_share_one_host(attention, [(n.address, n.capacity.device_kind) for n in ffn]):
            return 1
        ffn_cost = sum(n.capacity.ffn_us_per_token_expert for n in ffn) / len(ffn)
        tokens = max(1, node.load.num_running or node.capacity.max_num_seqs or 1)
        costs = step_costs(
            tokens,
            node.capacity.attention_us_per_token,
            ffn_cost,
            self._top_k,
            len(ffn),
            self.spec.hidden_size,
            node.capacity.link_bytes_per_second,
        )
        return plan_microbatches(costs)

    # ---- reporting -------------------------------------------------------------------------------------
    def _remember(self, placement: ExpertPlacement) -> None:
        self._recent_placements[placement.version] = placement
        for version in sorted(self._recent_placements)[:-RECENT_PLACEMENTS]:
            del self._recent_placements[version]

    def _record_load(self, node: NodeRecord, load: pb.NodeLoad, version: int) -> None:
        """`version`: the placement the node computed under; its expert counts are per expert it held then."""
        if node.role == "ffn":
            self.metrics.ffn_busy.labels(node.node_id).set(load.busy_fraction)
            placement = self._recent_placements.get(version)
            if placement is not None and node.node_id in placement.nodes:
                held = placement.experts[placement.index(node.node_id)]
                for expert, count in zip(held, load.expert_token_counts, strict=False):
                    if count:
                        self.metrics.expert_tokens.labels(str(expert)).inc(count)
            elif any(load.expert_token_counts):
                log.debug("dropped expert counts of %s under unknown placement v%d", node.node_id, version)
        for transfer in load.transfers:
            layer = str(transfer.layer)
            self.metrics.layer_round_trips.labels(layer).inc(transfer.round_trips)
            self.metrics.layer_round_trip_seconds.labels(layer).inc(transfer.seconds)
            self.metrics.activation_bytes.labels("attention_to_ffn").inc(transfer.bytes_sent)
            self.metrics.activation_bytes.labels("ffn_to_attention").inc(transfer.bytes_received)
        attention = self.membership.of_role("attention", NodeState.READY, NodeState.DRAINING)
        model = self.metrics.model_name
        self.metrics.num_requests_running.labels(model).set(sum(n.load.num_running for n in attention))
        self.metrics.num_requests_waiting.labels(model).set(sum(n.load.num_waiting for n in attention))
        if attention:
            usage = sum(n.load.kv_cache_usage for n in attention) / len(attention)
            self.metrics.kv_cache_usage.labels(model).set(usage)

    def _update_node_metrics(self) -> None:
        self.metrics.nodes.clear()
        for (role, state), count in self.membership.counts().items():
            self.metrics.nodes.labels(role, state).set(count)

    def status(self) -> dict[str, Any]:
        placement = self.placement
        held = dict(zip(placement.nodes, placement.experts, strict=True)) if placement else {}
        nodes = []
        for node in self.membership.nodes.values():
            nodes.append(
                {
                    "node_id": node.node_id,
                    "role": node.role,
                    "state": node.state.value,
                    "address": node.address,
                    "device_kind": node.capacity.device_kind,
                    "device_count": node.capacity.device_count,
                    "device_memory_bytes": node.capacity.device_memory_bytes,
                    "measured_us": _measured_cost(node),
                    "num_running": node.load.num_running,
                    "num_waiting": node.load.num_waiting,
                    "kv_cache_usage": node.load.kv_cache_usage,
                    "busy_fraction": node.load.busy_fraction,
                    "experts": list(held.get(node.node_id, ())),
                    "tokens_per_s": round(node.tokens_per_s, 2),
                    "placement_version": node.placement_version,
                    "microbatches": self.microbatches_for(node) if node.role == "attention" else None,
                    "transports": list(node.transports),
                }
            )
        return {
            "model": self.spec.architecture,
            "placement_version": placement.version if placement else None,
            "nodes": nodes,
        }


def _measured_cost(node: NodeRecord) -> dict[str, float | int]:
    """The start-up measurement behind a node's share: per token (attention, at a context length) or per
    token-expert pair (FFN), microseconds per layer."""
    capacity = node.capacity
    if node.role == "attention":
        return {"per_token": capacity.attention_us_per_token, "at_context_len": capacity.attention_context_len}
    return {"per_token_expert": capacity.ffn_us_per_token_expert}


def pool_speeds(nodes: list[NodeRecord], role: Role) -> dict[str, float]:
    """Relative speed per node, one figure per device kind (the median of its nodes' measurements).

    Start-up calibrations of identical machines differ by noise (and by who else was busy at that
    moment); a figure per hardware kind keeps identical nodes identical and different ones apart.
    """
    by_kind: dict[str, list[float]] = {}
    for node in nodes:
        by_kind.setdefault(node.capacity.device_kind, []).append(node.capacity.speed(role))
    kind_speed = {kind: statistics.median(speeds) for kind, speeds in by_kind.items()}
    return {node.node_id: kind_speed[node.capacity.device_kind] for node in nodes}


def _capacity(message: pb.CapacityProfile) -> Capacity:
    return Capacity(
        device_kind=message.device_kind or "cpu",
        device_memory_bytes=message.device_memory_bytes,
        device_count=message.device_count or 1,
        attention_us_per_token=message.attention_us_per_token,
        attention_context_len=message.attention_context_len,
        ffn_us_per_token_expert=message.ffn_us_per_token_expert,
        link_bytes_per_second=message.link_bytes_per_second,
        kv_cache_blocks=message.kv_cache_blocks,
        kv_block_size=message.kv_block_size,
        max_num_seqs=message.max_num_seqs,
    )


def state_to_proto(state: NodeState) -> int:
    return _STATES[state]
