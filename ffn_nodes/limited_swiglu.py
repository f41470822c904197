"""Step-3.5's bounded SwiGLU for the few layers whose config sets `swiglu_limits` / `swiglu_limits_shared`.

down(min(silu(gate), limit) * clamp(up, -limit, limit)), as transformers' Step3p7 MLP and experts compute it.
The bound applies element by element along the intermediate dimension, so a slice of a dense MLP or shared
expert is bounded the same way as the whole. Layers without a bound keep the plain StackedExperts / MlpSlice
(and their fast paths); this module is the slow, simple path for the bounded ones (2 of 45 layers in
Step-3.5-Flash).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afd.kernels import linear
from ffn_nodes.experts import MlpSlice, Strategy


def limited_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, limit: float) -> torch.Tensor:
    """`x: [tokens, hidden]`, `gate_up: [2 * intermediate, hidden]` (gate rows first), `down: [hidden,
    intermediate]` -> `[tokens, hidden]` in x's dtype."""
    intermediate = down.shape[1]
    h = linear(x, gate_up)
    gate = F.silu(h[:, :intermediate]).clamp(max=limit)
    up = h[:, intermediate:].clamp(min=-limit, max=limit)
    return linear(gate * up, down)


class LimitedMlpSlice(MlpSlice):
    """A slice of a dense MLP or shared expert with Step-3.5's bound (see the module docstring)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, limit: float) -> None:
        """`gate_up: [2 * width, hidden]` (gate rows first), `down: [hidden, width]`, `limit > 0`."""
        if limit <= 0:
            raise ValueError(f"swiglu limit must be positive, got {limit}")
        super().__init__(gate_up, down)
        self.limit = limit

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return limited_swiglu(hidden, self.gate_up, self.down, self.limit)


class LimitedSwigluExperts:
    """The routed experts of one bounded Step-3.5 layer on one FFN node; the interface and load counters of
    StackedExperts. One sort makes each expert's tokens a contiguous block; the loop runs over the experts that
    received tokens only."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, limit: float) -> None:
        """gate_up: `[num_local, 2 * intermediate, hidden]` (gate rows first); down: `[num_local, hidden,
        intermediate]`; limit > 0."""
        if limit <= 0:
            raise ValueError(f"swiglu limit must be positive, got {limit}")
        self.gate_up, self.down, self.limit = gate_up, down, limit
        self.num_local = int(gate_up.shape[0])
        self.intermediate = int(down.shape[2])
        self.strategy: Strategy = "looped"
        self.expert_tokens = [0] * self.num_local
        """Tokens routed to each local expert since load (as StackedExperts.expert_tokens)."""
        self.experts_hit = 0
        """Sum over calls of the experts that received at least one token."""

    def forward(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Add the weighted expert outputs into `out`; arguments as StackedExperts.forward."""
        top_k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        per = torch.bincount(flat + 1, minlength=self.num_local + 1).tolist()
        elsewhere = per[0]
        if elsewhere == flat.numel():
            return
        order = torch.sort(flat, stable=True).indices[elsewhere:]
        tokens = order // top_k
        x = hidden.index_select(0, tokens)
        outputs, start = [], 0
        for expert, count in enumerate(per[1:]):
            if count:
                self.expert_tokens[expert] += count
                self.experts_hit += 1
                rows = x[start : start + count]
                outputs.append(limited_swiglu(rows, self.gate_up[expert], self.down[expert], self.limit))
                start += count
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        weights = expert_weights.reshape(-1)[order].to(y.dtype)
        out.index_add_(0, tokens, y * weights.unsqueeze(1))
