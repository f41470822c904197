"""Who is in the cluster: nodes, their roles, capacity, state and load, and when they are presumed dead."""

from __future__ import annotations

import enum
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["attention", "ffn"]


class NodeState(enum.Enum):
    JOINING = "joining"
    READY = "ready"
    DRAINING = "draining"
    LEFT = "left"
    DEAD = "dead"
    DEGRADED = "degraded"
    """An FFN node taken out of the placement as a straggler (router/stragglers.py); alive, it comes back."""


@dataclass(slots=True)
class Capacity:
    """A node's hardware and measured costs (CapacityProfile on the wire)."""

    device_kind: str = "cpu"
    """What computes, as the node describes it ("NVIDIA H200", "cpu (8 threads)")."""
    device_memory_bytes: int = 0
    """Memory of that device, bytes (host memory for a CPU node)."""
    device_count: int = 1
    """Devices the node computes on."""
    attention_us_per_token: float = 0.0
    """Attention nodes: measured microseconds per token per layer of a decode batch at attention_context_len."""
    attention_context_len: int = 0
    """Context length, tokens, at which attention_us_per_token was measured."""
    ffn_us_per_token_expert: float = 0.0
    """FFN nodes: measured microseconds per (token, expert) pair per layer."""
    link_bytes_per_second: float = 0.0
    """Attention nodes: effective bytes/s of the slowest FFN link, measured by the data plane (0: unknown)."""
    link_latency_us: float = 0.0
    """Attention nodes: fixed cost per exchange of that link, microseconds (0: unknown)."""
    peer_exchange_us: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Attention nodes: FFN node id -> (mean exchange microseconds, exchanges measured), from heartbeats."""
    kv_cache_blocks: int = 0
    """Attention nodes: KV cache size, in blocks."""
    kv_block_size: int = 0
    """Tokens per KV block."""
    max_num_seqs: int = 0
    """Attention nodes: most requests in one decode batch."""

    def speed(self, role: Role) -> float:
        """Relative throughput for placement: inverse of the measured per-token cost (1.0 if unknown)."""
        cost = self.attention_us_per_token if role == "attention" else self.ffn_us_per_token_expert
        return 1.0 / cost if cost > 0 else 1.0


@dataclass(slots=True)
class Load:
    """Latest heartbeat figures."""

    num_running: int = 0
    """Attention nodes: requests in the decode batch."""
    num_waiting: int = 0
    """Attention nodes: requests queued for a batch slot or KV blocks."""
    kv_cache_usage: float = 0.0
    """Attention nodes: share of KV blocks in use, 0..1."""
    busy_fraction: float = 0.0
    """FFN nodes: share of wall time spent computing since the last heartbeat, 0..1."""
    generated_tokens: int = 0
    """Monotonic since the node started: tokens generated (attention) or token rows computed (FFN)."""


@dataclass(slots=True)
class NodeRecord:
    node_id: str
    """Unique in the cluster; a node that restarts registers under the same id."""
    role: Role
    address: str
    """host:port of the node's gRPC server."""
    capacity: Capacity
    transports: tuple[str, ...] = ()
    """Data planes the node speaks (grpc, gloo, shm, nccl)."""
    state: NodeState = NodeState.JOINING
    load: Load = field(default_factory=Load)
    """From the latest heartbeat."""
    last_seen: float = field(default_factory=time.monotonic)
    """time.monotonic() of the latest heartbeat, seconds."""
    placement_version: int = -1
    """Placement version the node last acknowledged."""
    inflight: int = 0
    """Requests the router currently streams from this node (attention nodes)."""
    tokens_per_s: float = 0.0
    """Smoothed rate of generated_tokens, tokens per second."""
    _last_tokens: tuple[float, int] = (0.0, 0)

    def observe(self, load: Load, now: float) -> None:
        then, before = self._last_tokens
        if then and now > then and load.generated_tokens >= before:
            rate = (load.generated_tokens - before) / (now - then)
            self.tokens_per_s = 0.7 * self.tokens_per_s + 0.3 * rate if self.tokens_per_s else rate
        self._last_tokens = (now, load.generated_tokens)
        self.load = load
        self.last_seen = now

    @property
    def alive(self) -> bool:
        return self.state in (NodeState.JOINING, NodeState.READY, NodeState.DRAINING, NodeState.DEGRADED)


class Membership:
    """The node table. Single-threaded: used from the router's event loop only."""

    def __init__(self, node_timeout_s: float) -> None:
        self.node_timeout_s = node_timeout_s
        self.nodes: dict[str, NodeRecord] = {}

    def add(self, record: NodeRecord) -> NodeRecord | None:
        """Insert or replace (a node that restarts re-registers under its id); returns the replaced record."""
        previous = self.nodes.get(record.node_id)
        self.nodes[record.node_id] = record
        return previous

    def get(self, node_id: str) -> NodeRecord | None:
        return self.nodes.get(node_id)

    def of_role(self, role: Role, *states: NodeState) -> list[NodeRecord]:
        wanted = states or (NodeState.READY,)
        return [n for n in self.nodes.values() if n.role == role and n.state in wanted]

    def expired(self, now: float | None = None) -> list[NodeRecord]:
        """Live nodes whose heartbeats stopped more than node_timeout_s ago."""
        now = time.monotonic() if now is None else now
        return [n for n in self.nodes.values() if n.alive and now - n.last_seen > self.node_timeout_s]

    def counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for node in self.nodes.values():
            key = (node.role, node.state.value)
            out[key] = out.get(key, 0) + 1
        return out


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
