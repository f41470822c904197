"""What travels between an attention node and an FFN node for one layer of one microbatch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class FfnRequest:
    """Hidden states for one FFN node: each token is sent once, with the experts it chose on that node.

    The reply is a partial sum `[num_tokens, hidden_size]` in the hidden dtype: the node's routed experts
    weighted by `expert_weights`, plus its slice of the shared expert (scaled by `shared_scale`) or of
    the dense MLP.
    """

    layer: int
    """Decoder layer index."""
    hidden: torch.Tensor
    """`[num_tokens, hidden_size]`, model dtype: post-attention-norm hidden states."""
    expert_ids: torch.Tensor | None = None
    """`[num_tokens, top_k] int32`: local expert ids on the receiving node; -1 where the expert is elsewhere."""
    expert_weights: torch.Tensor | None = None
    """`[num_tokens, top_k] float32`: routing weights, 0 where expert_ids is -1."""
    shared_scale: torch.Tensor | None = None
    """`[num_tokens] float32`: per-token multiplier of the shared expert (Qwen2-MoE's sigmoid gate)."""
    microbatch: int = 0
    """Microbatch id within the attention node's step (for ping-pong pipelining)."""
    placement_version: int = 0
    """Expert placement the local ids refer to; an FFN node keeps the previous version while a change is
    in flight, so requests addressed under either are computed with the right experts."""

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0])
