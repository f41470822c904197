"""Who is in the cluster: nodes, their roles, capacity, state and load, and when they are presumed dead."""

from __future__ import annotations

import enum
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


@dataclass(slots=True)
class Capacity:
    """A node's hardware and measured costs (CapacityProfile on the wire)."""

    device_kind: str = "cpu"
    device_memory_bytes: int = 0
    device_count: int = 1
    attention_us_per_token: float = 0.0
    attention_context_len: int = 0
    ffn_us_per_token_expert: float = 0.0
    link_bytes_per_second: float = 0.0
    kv_cache_blocks: int = 0
    kv_block_size: int = 0
    max_num_seqs: int = 0

    def speed(self, role: Role) -> float:
        """Relative throughput for placement: inverse of the measured per-token cost (1.0 if unknown)."""
        cost = self.attention_us_per_token if role == "attention" else self.ffn_us_per_token_expert
        return 1.0 / cost if cost > 0 else 1.0


@dataclass(slots=True)
class Load:
    """Latest heartbeat figures."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    busy_fraction: float = 0.0
    generated_tokens: int = 0


@dataclass(slots=True)
class NodeRecord:
    node_id: str
    role: Role
    address: str
    capacity: Capacity
    transports: tuple[str, ...] = ()
    state: NodeState = NodeState.JOINING
    load: Load = field(default_factory=Load)
    last_seen: float = field(default_factory=time.monotonic)
    placement_version: int = -1
    """Placement version the node last acknowledged."""
    inflight: int = 0
    """Requests the router currently streams from this node (attention nodes)."""
    tokens_per_s: float = 0.0
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
        return self.state in (NodeState.JOINING, NodeState.READY, NodeState.DRAINING)


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

    def forget_departed(self) -> None:
        for node_id in [n.node_id for n in self.nodes.values() if not n.alive]:
            del self.nodes[node_id]

    def counts(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for node in self.nodes.values():
            key = (node.role, node.state.value)
            out[key] = out.get(key, 0) + 1
        return out
