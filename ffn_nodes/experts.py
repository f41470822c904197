"""Grouped SwiGLU expert compute over a batch of (token, local expert, weight) assignments.

Assignments are sorted by expert once, so each expert's tokens are a contiguous block, and all
experts run in one grouped matmul (`torch.nn.functional.grouped_mm`) when the build has it; otherwise
a loop over the experts that received tokens. There is never a Python loop over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _supports_grouped_mm(dtype: torch.dtype, device: torch.device) -> bool:
    if _grouped_mm is None:
        return False
    try:
        x = torch.zeros(2, 8, dtype=dtype, device=device)
        w = torch.zeros(2, 8, 8, dtype=dtype, device=device)
        _grouped_mm(x, w, offs=torch.tensor([1, 2], dtype=torch.int32, device=device))
        return True
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class StackedExperts:
    """The routed experts one FFN node holds for one layer, stacked for grouped compute."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """gate_up: `[num_local, 2 * intermediate, hidden]` (gate rows first);
        down: `[num_local, hidden, intermediate]`."""
        self.gate_up = gate_up
        self.down = down
        self.num_local = int(gate_up.shape[0])
        self.intermediate = int(down.shape[2])
        self._grouped = _supports_grouped_mm(gate_up.dtype, gate_up.device)

    def forward(
        self, hidden: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Add the weighted expert outputs into `out`.

        hidden: `[num_tokens, hidden] model dtype`; expert_ids: `[num_tokens, top_k] int` local ids, -1 to
        skip; expert_weights: `[num_tokens, top_k] float32`; out: `[num_tokens, hidden] float32` accumulator.
        """
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1).to(torch.int64)
        chosen = (flat_ids >= 0).nonzero().squeeze(1)
        if chosen.numel() == 0:
            return
        ids = flat_ids[chosen]
        ids, order = torch.sort(ids, stable=True)
        chosen = chosen[order]
        tokens = chosen // top_k
        weights = expert_weights.reshape(-1)[chosen]
        counts = torch.bincount(ids, minlength=self.num_local)
        x = hidden.index_select(0, tokens)
        y = self._grouped_swiglu(x, counts) if self._grouped else self._looped_swiglu(x, counts)
        out.index_add_(0, tokens, y.float() * weights.unsqueeze(1))

    def _grouped_swiglu(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        gate_up = _grouped_mm(x, self.gate_up.transpose(-2, -1), offs=offsets)
        act = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
        return _grouped_mm(act, self.down.transpose(-2, -1), offs=offsets)

    def _looped_swiglu(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.down.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                rows = slice(start, start + count)
                y[rows] = swiglu(x[rows], self.gate_up[expert], self.down[expert], self.intermediate)
                start += count
        return y


def swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, intermediate: int) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with `gate_up: [2 * intermediate, hidden]`, `down: [hidden, intermediate]`."""
    h = F.linear(x, gate_up)
    return F.linear(F.silu(h[:, :intermediate]) * h[:, intermediate:], down)


class MlpSlice:
    """A slice [start, end) of a dense MLP's (or shared expert's) intermediate dimension."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """`gate_up: [2 * width, hidden]` (gate rows first), `down: [hidden, width]`."""
        self.gate_up = gate_up
        self.down = down
        self.width = int(down.shape[1])

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[num_tokens, hidden]` partial output of this slice, in the hidden dtype."""
        return swiglu(hidden, self.gate_up, self.down, self.width)
