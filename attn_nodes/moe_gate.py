"""The MoE gate: top-k expert choice per token, computed on the attention node before dispatch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from afd.kernels import linear
from afd.model_spec import MoeSpec


@dataclass(slots=True)
class GateWeights:
    """Router tensors of one MoE layer."""

    weight: torch.Tensor
    """`[num_experts, hidden]` router projection."""
    correction_bias: torch.Tensor | None = None
    """`[num_experts] float32` DeepSeek-V3 bias used for choosing only."""
    shared_gate: torch.Tensor | None = None
    """`[1, hidden]` Qwen2-MoE shared-expert gate."""
    bias: torch.Tensor | None = None
    """`[num_experts]` router projection bias (gpt-oss), model dtype."""


@dataclass(slots=True)
class Routing:
    """The gate's decision for a batch of tokens."""

    expert_ids: torch.Tensor
    """`[num_tokens, top_k] int64` global expert ids."""
    weights: torch.Tensor
    """`[num_tokens, top_k] float32` routing weights."""
    shared_scale: torch.Tensor | None = None
    """`[num_tokens] float32` shared-expert multiplier, when the model gates it."""


def route(hidden: torch.Tensor, gate: GateWeights, moe: MoeSpec) -> Routing:
    """Top-k choice for `hidden: [num_tokens, hidden_size]` (model dtype), as the reference models do it."""
    if moe.scoring == "topk_softmax":
        return _route_topk_softmax(hidden, gate, moe)
    if moe.scoring == "sigmoid" or moe.group_limit != "none":
        # DeepSeek computes its router in float32 whatever the model dtype.
        logits = linear(hidden.float(), gate.weight.float())
    else:
        logits = linear(hidden, gate.weight)
    scores = logits.sigmoid() if moe.scoring == "sigmoid" else torch.softmax(logits, dim=-1, dtype=torch.float32)
    choice = scores if gate.correction_bias is None else scores + gate.correction_bias
    if moe.group_limit != "none":
        choice = _limit_to_groups(choice, moe)
    if moe.group_limit == "none" and gate.correction_bias is None:
        weights, ids = torch.topk(scores, moe.top_k, dim=-1)
    else:
        ids = torch.topk(choice, moe.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if moe.scoring == "sigmoid" else 0.0))
    if moe.routed_scaling_factor != 1.0:
        weights = weights * moe.routed_scaling_factor
    if moe.scoring == "softmax" and moe.group_limit == "none":
        # Qwen rounds the weights to the model dtype before the experts use them; do the same (Mixtral
        # keeps float32, a difference below bf16 resolution).
        weights = weights.to(hidden.dtype)
    shared = None
    if gate.shared_gate is not None:
        shared = torch.sigmoid(linear(hidden, gate.shared_gate)).squeeze(1).float()
    return Routing(ids, weights.float(), shared)


def _route_topk_softmax(hidden: torch.Tensor, gate: GateWeights, moe: MoeSpec) -> Routing:
    """gpt-oss: top-k of the (biased) router logits, softmax over just those k, all in the model dtype."""
    logits = linear(hidden, gate.weight, gate.bias)
    top, ids = torch.topk(logits, moe.top_k, dim=-1)
    weights = torch.softmax(top, dim=-1, dtype=top.dtype)
    return Routing(ids, weights.float())


def _limit_to_groups(choice: torch.Tensor, moe: MoeSpec) -> torch.Tensor:
    """Mask out experts outside the `topk_group` best groups (DeepSeek group-limited routing)."""
    tokens = choice.shape[0]
    grouped = choice.view(tokens, moe.n_group, -1)
    if moe.group_limit == "group_max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    keep = torch.topk(group_scores, moe.topk_group, dim=-1, sorted=False)[1]
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    fill = 0.0 if moe.group_limit == "group_max" else float("-inf")
    return grouped.masked_fill(~mask.unsqueeze(-1), fill).view(tokens, -1)
