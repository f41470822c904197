"""Turns one layer's hidden states and gate choice into one FfnRequest per FFN node, and adds the replies.

Each token's hidden state goes once to every node that holds one of its experts (or a slice of the
shared expert / dense MLP, in which case every token goes there), carrying local expert ids and weights.
An expert held by several nodes (a replica of a hot expert) has its tokens split among them
(_ReplicaTables), each (token, expert) pair computed by exactly one.

On the CPU, where rows are copied to the nodes (`compact_rows`), a node gets only the rows of tokens it
computes (found with `nonzero`, free there). On an accelerator that would read the routing back to the host
every layer, and in process nothing is copied, so there every node that holds experts of the layer gets the
whole microbatch with -1 for the pairs computed elsewhere: fixed shapes, no host read, three small ops per node
instead of eleven; its partial sum is exactly zero on the rows it computed nothing for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afd import kernels
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from attn_nodes.moe_gate import Routing


@dataclass(slots=True)
class Dispatch:
    """Requests of one layer and microbatch, with the rows each one covers."""

    requests: dict[str, FfnRequest]
    rows: dict[str, torch.Tensor | None]
    """Token rows per node (`[n] int64`), None when the node got every token."""


class FfnDispatcher:
    """Addresses tokens to FFN nodes according to the current expert placement."""

    def __init__(self, spec: ModelSpec, placement: ExpertPlacement | None, compact_rows: bool = True) -> None:
        """compact_rows: send each node on the CPU only its rows (FfnTransport.rows_cross_a_wire)."""
        self.spec = spec
        self.compact_rows = compact_rows
        self.placement: ExpertPlacement | None = None
        if placement is not None:
            self.set_placement(placement)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Switch to a new placement (applied between steps, never inside one)."""
        self.placement = placement
        owner, local = placement.owner_tables()
        # local_on[i][e]: expert e's id on node i, or -1 when node i does not serve it (one gather per node).
        self.local_on = [torch.where(owner == i, local, -1).to(torch.int32) for i in range(len(placement.nodes))]
        self._replicas = _ReplicaTables.of(placement) if placement.has_replicas else None
        self._holds_experts = [bool(held) for held in placement.experts]
        # A node serving every expert under its global id (one FFN node) takes the gate's choice as it is: no
        # gather, mask or row search per layer (seven small ops, about 40 us a layer on a 2-core CPU).
        every = torch.arange(placement.num_experts, dtype=torch.int32)
        self._serves_all = [bool(torch.equal(table, every)) for table in self.local_on]
        nodes = range(len(placement.nodes))
        self._dense_nodes: dict[int, list[int]] = {}
        self._shared_nodes: dict[int, set[int]] = {}
        for layer in self.spec.layers:
            size = layer.dense_intermediate_size
            if size and size not in self._dense_nodes:
                self._dense_nodes[size] = [i for i in nodes if _nonempty(placement.slice_bounds(i, size))]
            shared = layer.moe.shared_intermediate_size if layer.moe else 0
            if shared and shared not in self._shared_nodes:
                self._shared_nodes[shared] = {i for i in nodes if _nonempty(placement.slice_bounds(i, shared))}

    def build(self, layer: int, hidden: torch.Tensor, routing: Routing | None, microbatch: int = 0) -> Dispatch:
        """hidden: `[num_tokens, hidden]` post-attention-norm states of `layer` for one microbatch."""
        if self.placement is None:
            raise RuntimeError("no expert placement yet: no FFN node to send to")
        nodes = self.placement.nodes
        version = self.placement.version
        requests: dict[str, FfnRequest] = {}
        rows: dict[str, torch.Tensor | None] = {}
        moe = self.spec.moe(layer)
        if moe is None or routing is None:
            for i in self._dense_nodes[self.spec.layers[layer].dense_intermediate_size]:
                requests[nodes[i]] = FfnRequest(layer, hidden, microbatch=microbatch, placement_version=version)
                rows[nodes[i]] = None
            return Dispatch(requests, rows)
        shared_nodes = self._shared_nodes.get(moe.shared_intermediate_size, set())
        num_tokens = hidden.shape[0]
        split = self._replicas.split(routing.expert_ids) if self._replicas else None
        compact = self.compact_rows and hidden.device.type == "cpu"
        if self.local_on[0].device != hidden.device:
            self.local_on = [table.to(hidden.device) for table in self.local_on]
        for i, node in enumerate(nodes):
            if split is None and self._serves_all[i]:
                requests[node] = FfnRequest(
                    layer,
                    hidden,
                    expert_ids=routing.expert_ids.to(torch.int32),
                    expert_weights=routing.weights,
                    shared_scale=routing.shared_scale,
                    microbatch=microbatch,
                    placement_version=version,
                )
                rows[node] = None
                continue
            # [num_tokens, top_k] local ids on node i, -1 where another node computes the pair
            ids = self.local_on[i][routing.expert_ids] if split is None else torch.where(split[0] == i, split[1], -1)
            if not compact:
                if not self._holds_experts[i] and i not in shared_nodes:
                    continue
                requests[node] = FfnRequest(
                    layer,
                    hidden,
                    expert_ids=ids,
                    expert_weights=routing.weights.masked_fill(ids < 0, 0.0),
                    shared_scale=routing.shared_scale,
                    microbatch=microbatch,
                    placement_version=version,
                )
                rows[node] = None
                continue
            elsewhere = ids < 0
            weights = routing.weights.masked_fill(elsewhere, 0.0)
            shared = routing.shared_scale
            token_rows = None
            if i not in shared_nodes:
                token_rows = (~elsewhere).any(dim=1).nonzero().squeeze(1)
                kept = token_rows.numel()
                if kept == 0:
                    continue
                if kept == num_tokens:
                    token_rows = None
                else:
                    ids, weights = ids[token_rows], weights[token_rows]
                    shared = shared[token_rows] if shared is not None else None
            requests[node] = FfnRequest(
                layer,
                hidden if token_rows is None else hidden[token_rows],
                expert_ids=ids,
                expert_weights=weights,
                shared_scale=shared,
                microbatch=microbatch,
                placement_version=version,
            )
            rows[node] = token_rows
        return Dispatch(requests, rows)

    @staticmethod
    def accumulate(residual: torch.Tensor, dispatch: Dispatch, partials: dict[str, torch.Tensor]) -> None:
        """Add every node's partial sum into `residual: [num_tokens, hidden]` (summed in float32 first)."""
        if len(partials) == 1:
            ((node, partial),) = partials.items()
            token_rows = dispatch.rows[node]
            if token_rows is None:
                residual += partial
            else:
                residual.index_add_(0, token_rows, partial)
            return
        ordered = [(partial, dispatch.rows[node]) for node, partial in partials.items()]
        if kernels.add_partials(residual, ordered):
            return
        total = torch.zeros(residual.shape, dtype=torch.float32, device=residual.device)
        for node, partial in partials.items():
            token_rows = dispatch.rows[node]
            if token_rows is None:
                total += partial.float()
            else:
                total.index_add_(0, token_rows, partial.float())
        residual += total.to(residual.dtype)


@dataclass(slots=True)
class _ReplicaTables:
    """Where each (token, expert) pair goes when some experts are held by several nodes (replicas).

    Round robin per expert: the j-th pair of an expert since the placement was set (in call order, then
    token order) goes to replica j mod count, so its replicas get equal shares (±1) over any run of
    calls, even of one-token decode microbatches (a split that restarted at every call would send those
    all to the first replica). Deterministic for a given sequence of calls. Which node computes a pair
    changes nothing in the math: every pair is computed exactly once.
    """

    count: torch.Tensor
    """`[num_experts] int64` nodes holding each expert (1 if not replicated)."""
    node: torch.Tensor
    """`[num_experts, max_count] int64` node index of each replica (padded with the first)."""
    local: torch.Tensor
    """`[num_experts, max_count] int32` local expert id on that node."""
    sent: torch.Tensor
    """`[num_experts] int64` pairs of each expert addressed so far (where its round robin continues)."""

    @classmethod
    def of(cls, placement: ExpertPlacement) -> _ReplicaTables:
        holders = placement.holders()
        width = max(len(h) for h in holders)
        padded = [list(h) + [h[0]] * (width - len(h)) for h in holders]
        return cls(
            count=torch.tensor([len(h) for h in holders], dtype=torch.int64),
            node=torch.tensor([[n for n, _ in h] for h in padded], dtype=torch.int64),
            local=torch.tensor([[lid for _, lid in h] for h in padded], dtype=torch.int32),
            sent=torch.zeros(len(holders), dtype=torch.int64),
        )

    def split(self, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """expert_ids: `[num_tokens, top_k] int64` global ids -> (node index `int64`, local id `int32`), same shape."""
        if self.count.device != expert_ids.device:
            moved = (t.to(expert_ids.device) for t in (self.count, self.node, self.local, self.sent))
            self.count, self.node, self.local, self.sent = moved
        flat = expert_ids.reshape(-1)
        # rank of each pair among the pairs of its expert, in token order (a stable sort groups them)
        order = torch.sort(flat, stable=True).indices
        # a fixed-size count (bincount's size depends on the largest id, which an accelerator must read back)
        per_expert = torch.zeros_like(self.sent).scatter_add_(0, flat, torch.ones_like(flat))
        starts = torch.cumsum(per_expert, 0) - per_expert
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
        choice = (rank + self.sent[flat]) % self.count[flat]
        self.sent += per_expert
        node = self.node[flat, choice].view_as(expert_ids)
        local = self.local[flat, choice].view_as(expert_ids)
        return node, local


def _nonempty(bounds: tuple[int, int]) -> bool:
    return bounds[1] > bounds[0]
