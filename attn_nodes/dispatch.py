"""Turns one layer's hidden states and gate choice into one FfnRequest per FFN node, and adds the replies.

Each token's hidden state goes once to every node that holds one of its experts (or a slice of the
shared expert / dense MLP, in which case every token goes there), carrying local expert ids and weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def __init__(self, spec: ModelSpec, placement: ExpertPlacement | None) -> None:
        self.spec = spec
        self.placement: ExpertPlacement | None = None
        if placement is not None:
            self.set_placement(placement)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Switch to a new placement (applied between steps, never inside one)."""
        self.placement = placement
        owner, local = placement.owner_tables()
        # local_on[i][e]: expert e's id on node i, or -1 when node i does not serve it (one gather per node).
        self.local_on = [torch.where(owner == i, local, -1).to(torch.int32) for i in range(len(placement.nodes))]
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
        for i, node in enumerate(nodes):
            ids = self.local_on[i][routing.expert_ids]  # [num_tokens, top_k]
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
        total = torch.zeros(residual.shape, dtype=torch.float32, device=residual.device)
        for node, partial in partials.items():
            token_rows = dispatch.rows[node]
            if token_rows is None:
                total += partial.float()
            else:
                total.index_add_(0, token_rows, partial.float())
        residual += total.to(residual.dtype)


def _nonempty(bounds: tuple[int, int]) -> bool:
    return bounds[1] > bounds[0]
