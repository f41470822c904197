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
from ffn_nodes.experts import LoopedExperts, MlpSlice


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


class LimitedSwigluExperts(LoopedExperts):
    """The routed experts of one bounded Step-3.5 layer on one FFN node (see the module docstring)."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, limit: float, sync_free: bool | None = None) -> None:
        """gate_up: `[num_local, 2 * intermediate, hidden]` (gate rows first); down: `[num_local, hidden,
        intermediate]`; limit > 0; sync_free as LoopedExperts (None: by the weights' device)."""
        if limit <= 0:
            raise ValueError(f"swiglu limit must be positive, got {limit}")
        super().__init__(int(gate_up.shape[0]), gate_up.device, sync_free)
        self.gate_up, self.down, self.limit = gate_up, down, limit
        self.intermediate = int(down.shape[2])

    def expert_output(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        return limited_swiglu(rows, self.gate_up[expert], self.down[expert], self.limit)
