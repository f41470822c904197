"""The control plane: membership, the expert placement table and its live changes.

Which attention node takes a request is a policy's choice (router/policies), among the healthy nodes the
controller offers it; how many microbatches each attention node runs is router/microbatch_plan.py's;
heartbeat loads become metrics in router/load_metrics.py.

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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.wire.auth import ClusterAuth
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from afd.wire.placement_proto import placement_to_proto
from router.expert_placement import imbalance, node_loads, plan_placement, plan_replicas, replicas_beyond
from router.load_metrics import LoadMetrics
from router.membership import Capacity, Load, Membership, NodeRecord, NodeState, Role, pool_speeds
from router.metrics import RouterMetrics
from router.microbatch_plan import plan_for_node
from router.policies import LeastPressurePolicy, LoadBalancingPolicy
from router.stragglers import DegradedNodes, StragglerConfig, drifted

log = logging.getLogger("afd.router")

_ROLES: dict[int, Role] = {pb.ROLE_ATTENTION: "attention", pb.ROLE_FFN: "ffn"}


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
    expert_replication: bool = False
    """Replicate hot experts on FFN nodes with spare capacity (EPLB); off until measured to pay."""
    replication_interval_s: float = 10.0
    """How often the router looks at the expert load to re-plan replicas."""
    replication_window_s: float = 30.0
    """Span of the sliding window of heartbeat expert counts the replica plan is made from."""
    max_replicas_per_node: int = 2
    """Most replicated experts an FFN node holds beyond its own share (each costs one expert's weights per
    MoE layer of memory, and a reload of the node's shard when the plan changes)."""
    replication_target_imbalance: float = 1.1
    """Predicted max/mean FFN node load at or below which no replica is added."""
    replication_min_gain: float = 0.05
    """A new replica plan is published only if it lowers the predicted max/mean load by at least this much
    (a reload for a small gain costs more than it saves)."""
    replication_min_tokens: int = 1024
    """Token-expert pairs the window must hold before replicas are planned from it (too few is noise)."""
    stragglers: StragglerConfig = field(default_factory=StragglerConfig)
    """When a late or slow FFN node leaves the placement and when it comes back (router/stragglers.py)."""

    def __post_init__(self) -> None:
        if self.replication_interval_s <= 0 or self.replication_window_s <= 0:
            raise ConfigError("replication_interval_s and replication_window_s must be positive")
        if self.max_replicas_per_node < 0:
            raise ConfigError(f"max_replicas_per_node must be >= 0, got {self.max_replicas_per_node}")
        if self.replication_target_imbalance < 1.0:
            raise ConfigError(
                f"replication_target_imbalance is max/mean (>= 1.0), got {self.replication_target_imbalance}"
            )


class Controller:
    def __init__(
        self,
        spec: ModelSpec,
        auth: ClusterAuth,
        metrics: RouterMetrics,
        config: ControllerConfig,
        model_fingerprint: str | None = None,
        policy: LoadBalancingPolicy | None = None,
    ) -> None:
        """model_fingerprint: afd.model_spec.model_fingerprint of the served checkpoint; nodes registering
        with another one are refused. None accepts any (a controller driven directly by tests).
        policy: how requests are spread over attention nodes (least pressure when None)."""
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
        self._tasks: set[asyncio.Future] = set()
        self.load_metrics = LoadMetrics(metrics, self.membership, config.replication_window_s)
        self._base_placement: ExpertPlacement | None = None
        """The placement without replicas (plan_placement's): pool changes plan from it, replicas on top of it."""
        self.policy: LoadBalancingPolicy = policy or LeastPressurePolicy()
        self.degraded = DegradedNodes(config.stragglers, config.heartbeat_interval_s)
        """FFN nodes out of the placement as stragglers, and when they may come back."""
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
        message.degraded_nodes.extend(n.node_id for n in self.membership.of_role("ffn", NodeState.DEGRADED))
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
        self.degraded.forget(record.node_id)  # registered again (e.g. after a freeze it was declared dead in)
        log.info("node %s (%s) registered at %s", record.node_id, role, record.address)
        if role == "ffn":
            # A restarted FFN node (same id) holds nothing any more: plan as if it were new.
            task = asyncio.ensure_future(self._join_ffn(record, replaced is not None))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.load_metrics.count_nodes()
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
        if node.state is NodeState.DEGRADED:
            self.degraded.heard(node.node_id)
        if request.HasField("capacity"):
            _update_links(node, request.capacity)
        self.load_metrics.record(node, load, request.placement_version)
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
        self.load_metrics.count_nodes()
        return pb.LeaveResponse()

    async def report_peer_failure(self, request: pb.PeerFailureReport) -> pb.PeerFailureResponse:
        why = f"reported by {request.reporter_id}: {request.error}"
        if request.degraded:
            await self.degrade(request.peer_id, why)
        else:
            await self.declare_dead(request.peer_id, why)
        return pb.PeerFailureResponse(placement=self._placement_message(self.placement))

    # ---- failures --------------------------------------------------------------------------------------
    async def declare_dead(self, node_id: str, why: str) -> None:
        node = self.membership.get(node_id)
        if node is None or node.state in (NodeState.DEAD, NodeState.LEFT):
            if self.placement is not None and node_id in self.placement.nodes:
                await self.rebalance(f"{node_id} is gone")
            return
        log.warning("node %s declared dead: %s", node_id, why)
        node.state = NodeState.DEAD
        self.load_metrics.count_nodes()
        if node.role == "ffn":
            await self.rebalance(f"{node_id} died")

    # ---- stragglers (router/stragglers.py) -------------------------------------------------------------
    async def degrade(self, node_id: str, why: str) -> bool:
        """Take a late or slow FFN node out of the placement (it stays alive); True if it was taken out."""
        node = self.membership.get(node_id)
        pool = [n.node_id for n in self.membership.of_role("ffn", NodeState.READY)]
        if node is None or node.role != "ffn" or not self.degraded.may_degrade(node_id, pool):
            if node is not None and node.state is NodeState.READY:
                log.info("FFN node %s is slow (%s) but stays: no other node may take its share", node_id, why)
            return False
        hold = self.degraded.mark(node_id, why)
        node.state = NodeState.DEGRADED
        log.warning("node %s degraded (out for at least %.0f s of regular heartbeats): %s", node_id, hold, why)
        self.load_metrics.count_nodes()
        await self.rebalance(f"{node_id} is a straggler")
        return True

    async def check_stragglers(self) -> None:
        """Degrade FFN nodes whose measured exchanges drifted; bring back degraded nodes that held out."""
        config = self.config.stragglers
        if not config.enabled:
            return
        for node_id in self.degraded.ready_to_return():
            node = self.membership.get(node_id)
            self.degraded.returned(node_id)
            if node is not None and node.state is NodeState.DEGRADED:
                log.info("node %s is on time again: back in the placement", node_id)
                node.state = NodeState.JOINING
                await self.rebalance(f"{node_id} recovered")
        reports: dict[str, list[tuple[float, int]]] = {}
        serving = set(self.placement.nodes) if self.placement else set()
        for attention in self.membership.of_role("attention", NodeState.READY, NodeState.DRAINING):
            for peer, figure in attention.capacity.peer_exchange_us.items():
                if peer in serving:
                    reports.setdefault(peer, []).append(figure)
        for node_id, ratio in drifted(reports, config.drift_factor, config.drift_min_exchanges).items():
            await self.degrade(node_id, f"its exchanges take {ratio:.1f}x the other FFN nodes' (measured)")

    async def watch(self, stop: asyncio.Event) -> None:
        """Declare nodes dead when their heartbeats stop (and re-plan hot-expert replicas, when enabled)."""
        if self.config.expert_replication:
            task = asyncio.ensure_future(self._replicate_forever(stop))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        while not stop.is_set():
            for node in self.membership.expired():
                await self.declare_dead(node.node_id, f"no heartbeat for {self.config.node_timeout_s:.0f} s")
            try:
                await self.check_stragglers()
            except Exception:  # the placement stays as it is; try again next round
                log.exception("straggler check failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.heartbeat_interval_s)

    # ---- reconfiguration -------------------------------------------------------------------------------
    async def _join_ffn(self, node: NodeRecord, restarted: bool) -> None:
        if restarted and self.placement is not None and node.node_id in self.placement.nodes:
            await self.rebalance(f"{node.node_id} restarted", force=True)
        else:
            await self.rebalance(f"{node.node_id} joins")

    async def rebalance(self, reason: str, force: bool = False) -> None:
        """Make the placement match the live FFN pool (joining + ready nodes).

        Nodes that fail to load their share are declared dead and the plan is made again without them,
        until every node of a plan has loaded it (or no FFN node is left).
        """
        async with self._reconfigure:
            while True:
                pool = self.membership.of_role("ffn", NodeState.JOINING, NodeState.READY)
                current = self.placement
                if not force and current is not None and set(current.nodes) == {n.node_id for n in pool}:
                    return
                if not pool:
                    log.error("no FFN node left (%s): requests wait until one joins", reason)
                    self.placement = None
                    return
                self._last_version += 1
                # From the placement without replicas: a pool change drops them (each node's own share stays
                # put), and the replication loop re-plans them on the new pool.
                placement = plan_placement(
                    self.spec.num_experts,
                    pool_speeds(pool, "ffn"),
                    previous=self._base_placement or current,
                    version=self._last_version,
                )
                self.load_metrics.remember(placement)
                log.info(
                    "placement v%d (%s): %s",
                    placement.version,
                    reason,
                    dict(zip(placement.nodes, map(len, placement.experts), strict=True)),
                )
                failed = await self._broadcast_ffn(placement)
                if not failed:
                    break
                for node_id, error in failed.items():
                    node = self.membership.get(node_id)
                    if node is not None:
                        node.state = NodeState.DEAD
                    log.warning("FFN node %s failed to load v%d: %s", node_id, placement.version, error)
                reason, force = f"{reason}; load failed on {sorted(failed)}", False
            for node in pool:
                node.state = NodeState.READY
            self.placement = placement
            self._base_placement = placement
            self.metrics.placement_version.set(placement.version)
            await self._broadcast_attention(placement)
            self.load_metrics.count_nodes()

    # ---- hot-expert replication (EPLB) ---------------------------------------------------------------
    async def _replicate_forever(self, stop: asyncio.Event) -> None:
        """Every replication_interval_s: re-plan replicas from the window (errors are logged, never fatal)."""
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.replication_interval_s)
            if stop.is_set():
                return
            try:
                await self.replicate_hot_experts()
            except Exception:  # the data path keeps the placement it has; try again next round
                log.exception("hot-expert replication failed")

    async def replicate_hot_experts(self) -> ExpertPlacement | None:
        """Publish replicas of the hottest experts as a new placement version, if that pays; returns it.

        Plans from the placement without replicas and the window's per-expert load (plan_replicas), and
        publishes only when the plan differs from the current table and lowers its predicted max/mean load
        by replication_min_gain (so a steady load does not reload shards each round, and replicas that no
        longer pay are dropped). Switched like a scale event: every FFN node loads its share of the new
        version, then attention nodes switch. Nothing happens while the pool is changing.
        """
        config = self.config
        async with self._reconfigure:
            current, base = self.placement, self._base_placement
            pool = self.membership.of_role("ffn", NodeState.READY)
            if current is None or base is None or {n.node_id for n in pool} != set(base.nodes):
                return None
            load = self.load_metrics.window.per_expert()
            if sum(load.values()) < config.replication_min_tokens:
                return None
            speeds = pool_speeds(pool, "ffn")
            plan = plan_replicas(base, load, speeds, config.max_replicas_per_node, config.replication_target_imbalance)
            before = imbalance(node_loads(current, load, speeds))
            after = imbalance(node_loads(plan, load, speeds))
            if plan.experts == current.experts or before - after < config.replication_min_gain:
                return None
            self._last_version += 1
            placement = ExpertPlacement(
                plan.num_experts, plan.nodes, plan.experts, plan.mlp_shares, version=self._last_version
            )
            self.load_metrics.remember(placement)
            replicas = {n: r for n, r in replicas_beyond(base, placement).items() if r}
            log.info(
                "placement v%d (hot experts): replicas %s, predicted max/mean FFN load %.2f -> %.2f",
                placement.version,
                replicas,
                before,
                after,
            )
            failed = await self._broadcast_ffn(placement)
            if not failed:
                self.placement = placement
                self.metrics.placement_version.set(placement.version)
                await self._broadcast_attention(placement)
        if failed:
            for node_id, error in failed.items():
                node = self.membership.get(node_id)
                if node is not None:
                    node.state = NodeState.DEAD
                log.warning("FFN node %s failed to load v%d: %s", node_id, placement.version, error)
            self.load_metrics.count_nodes()
            await self.rebalance(f"replicas v{placement.version}: load failed on {sorted(failed)}")
            return None
        return placement

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

    # ---- request routing: which attention node serves a request ----------------------------------------
    def pick_attention_node(self, exclude: set[str] = frozenset()) -> NodeRecord | None:  # type: ignore[assignment]
        """The policy's choice among the ready attention nodes on the current placement (None: no capacity)."""
        version = self.placement.version if self.placement else None
        if version is None:
            return None
        candidates = [
            n
            for n in self.membership.of_role("attention")
            if n.node_id not in exclude and n.placement_version >= version
        ]
        return self.policy.select(candidates) if candidates else None

    def microbatches_for(self, node: NodeRecord) -> int:
        if self.config.microbatches is not None:
            return self.config.microbatches
        return plan_for_node(node, self.membership.of_role("ffn"), self._top_k, self.spec.hidden_size)

    def status(self) -> dict[str, Any]:
        placement = self.placement
        held = dict(zip(placement.nodes, placement.experts, strict=True)) if placement else {}
        base = self._base_placement
        replicas = replicas_beyond(base, placement) if placement and base else {}
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
                    # replicas of hot experts among "experts" (held beyond the node's own share)
                    "replicas": list(replicas.get(node.node_id, ())),
                    "tokens_per_s": round(node.tokens_per_s, 2),
                    "placement_version": node.placement_version,
                    "microbatches": self.microbatches_for(node) if node.role == "attention" else None,
                    "transports": list(node.transports),
                    "link": {
                        "bytes_per_second": node.capacity.link_bytes_per_second,
                        "latency_us": node.capacity.link_latency_us,
                    },
                    "degraded": self.degraded.describe(node.node_id),
                }
            )
        return {
            "model": self.spec.architecture,
            "placement_version": placement.version if placement else None,
            "nodes": nodes,
            "num_experts": placement.num_experts if placement else 0,
            # Counts arrive summed over layers (each FFN node holds the same experts in every layer).
            "expert_load": self.load_metrics.expert_load(),
        }


def _measured_cost(node: NodeRecord) -> dict[str, float | int]:
    """The start-up measurement behind a node's share: per token (attention, at a context length) or per
    token-expert pair (FFN), microseconds per layer."""
    capacity = node.capacity
    if node.role == "attention":
        return {"per_token": capacity.attention_us_per_token, "at_context_len": capacity.attention_context_len}
    return {"per_token_expert": capacity.ffn_us_per_token_expert}


def _update_links(node: NodeRecord, message: pb.CapacityProfile) -> None:
    """Take the measured link figures of a heartbeat's capacity profile (the start-up ones stay)."""
    node.capacity.link_bytes_per_second = message.link_bytes_per_second
    node.capacity.link_latency_us = message.link_latency_us
    node.capacity.peer_exchange_us = {
        link.peer_id: (link.mean_exchange_us, link.exchanges) for link in message.peer_links
    }


def _capacity(message: pb.CapacityProfile) -> Capacity:
    return Capacity(
        device_kind=message.device_kind or "cpu",
        device_memory_bytes=message.device_memory_bytes,
        device_count=message.device_count or 1,
        attention_us_per_token=message.attention_us_per_token,
        attention_context_len=message.attention_context_len,
        ffn_us_per_token_expert=message.ffn_us_per_token_expert,
        link_bytes_per_second=message.link_bytes_per_second,
        link_latency_us=message.link_latency_us,
        kv_cache_blocks=message.kv_cache_blocks,
        kv_block_size=message.kv_block_size,
        max_num_seqs=message.max_num_seqs,
    )
