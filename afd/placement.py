"""The expert placement table: which FFN node serves which routed experts and which MLP slice.

Attention nodes use it to address each token's hidden state to the nodes that hold its experts; FFN
nodes use it to decide what to load; the router owns and versions it. Dense MLPs and shared experts
are split along the intermediate dimension in proportion to `mlp_shares`, so every node returns a
partial sum and the attention node simply adds them.

An expert may be held by several nodes (a replica of a hot expert, router/expert_placement.py's
plan_replicas): each of its tokens is then computed by exactly one of them (attn_nodes/dispatch.py splits
them), so the sum of the partials is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from afd.errors import ConfigError

if TYPE_CHECKING:  # the router uses placements without importing torch
    import torch


@dataclass(frozen=True, slots=True)
class ExpertPlacement:
    """Routed experts and MLP slices per FFN node (the same for every layer)."""

    num_experts: int
    """Routed experts per MoE layer (0 for a dense model)."""
    nodes: tuple[str, ...]
    """FFN node ids, in a fixed order that indexes the other fields."""
    experts: tuple[tuple[int, ...], ...]
    """Global expert ids each node holds, ascending; the position in the tuple is the local id. An expert may
    appear on several nodes (replicas); every expert appears on at least one."""
    mlp_shares: tuple[float, ...]
    """Relative share of every dense / shared-expert intermediate dimension each node computes."""
    version: int = 0
    """Bumped by the router on every change, so nodes can tell stale tables apart."""

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ConfigError("an expert placement needs at least one FFN node")
        if len(set(self.nodes)) != len(self.nodes):
            raise ConfigError(f"duplicate FFN node ids in placement: {self.nodes}")
        if not len(self.experts) == len(self.mlp_shares) == len(self.nodes):
            raise ConfigError("placement fields must have one entry per node")
        held: set[int] = set()
        for node, ids in zip(self.nodes, self.experts, strict=True):
            if list(ids) != sorted(set(ids)):
                raise ConfigError(f"node {node}: expert ids must be unique and ascending, got {ids}")
            if ids and not 0 <= ids[0] <= ids[-1] < self.num_experts:
                raise ConfigError(f"node {node}: expert ids out of range [0, {self.num_experts})")
            held.update(ids)
        if len(held) != self.num_experts:
            missing = sorted(set(range(self.num_experts)) - held)
            raise ConfigError(f"experts {missing} are not placed on any FFN node")
        if any(share < 0 for share in self.mlp_shares) or sum(self.mlp_shares) <= 0:
            raise ConfigError(f"mlp shares must be non-negative with a positive sum: {self.mlp_shares}")

    @classmethod
    def balanced(
        cls,
        num_experts: int,
        nodes: Sequence[str],
        weights: Sequence[float] | None = None,
        version: int = 0,
    ) -> ExpertPlacement:
        """Contiguous expert ranges and MLP slices in proportion to `weights` (node speed); equal by default."""
        weights = list(weights) if weights is not None else [1.0] * len(nodes)
        if len(weights) != len(nodes) or any(w <= 0 for w in weights):
            raise ConfigError(f"need one positive weight per node, got {weights} for {list(nodes)}")
        counts = apportion(num_experts, weights)
        ranges, start = [], 0
        for count in counts:
            ranges.append(tuple(range(start, start + count)))
            start += count
        return cls(num_experts, tuple(nodes), tuple(ranges), tuple(float(w) for w in weights), version)

    def index(self, node: str) -> int:
        try:
            return self.nodes.index(node)
        except ValueError:
            raise ConfigError(f"FFN node {node!r} is not in the placement {self.nodes}") from None

    def owner_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`owner[e]` (node index) and `local[e]` (id on that node), `[num_experts] int64` each.

        An expert held by several nodes (a replica) is served by the first of them.
        """
        import torch

        owner = torch.full((self.num_experts,), -1, dtype=torch.int64)
        local = torch.full((self.num_experts,), -1, dtype=torch.int64)
        for node_index, ids in enumerate(self.experts):
            for local_id, expert in enumerate(ids):
                if owner[expert] < 0:
                    owner[expert] = node_index
                    local[expert] = local_id
        return owner, local

    def holders(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per global expert, every `(node index, local id)` that holds it, in node order (first = owner)."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(self.num_experts)]
        for node_index, ids in enumerate(self.experts):
            for local_id, expert in enumerate(ids):
                out[expert].append((node_index, local_id))
        return tuple(tuple(h) for h in out)

    @property
    def has_replicas(self) -> bool:
        """Whether some expert is held by more than one node."""
        return sum(len(ids) for ids in self.experts) > self.num_experts

    def slice_bounds(self, node_index: int, size: int) -> tuple[int, int]:
        """The [start, end) slice of an intermediate dimension of `size` that node `node_index` computes."""
        total = sum(self.mlp_shares)
        before = sum(self.mlp_shares[:node_index])
        start = round(size * before / total)
        end = round(size * (before + self.mlp_shares[node_index]) / total)
        return start, end

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_experts": self.num_experts,
            "nodes": list(self.nodes),
            "experts": [list(ids) for ids in self.experts],
            "mlp_shares": list(self.mlp_shares),
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpertPlacement:
        try:
            return cls(
                num_experts=int(data["num_experts"]),
                nodes=tuple(str(n) for n in data["nodes"]),
                experts=tuple(tuple(int(e) for e in ids) for ids in data["experts"]),
                mlp_shares=tuple(float(s) for s in data["mlp_shares"]),
                version=int(data.get("version", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed expert placement: {exc}") from exc


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` into integers proportional to `weights` (largest remainder)."""
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
