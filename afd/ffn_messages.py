"""What travels between an attention node and an FFN node for one layer of one microbatch."""

from __future__ import annotations

import dataclasses
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
    """`[num_tokens, hidden_size]`, model dtype (or the wire dtype, e.g. float8_e4m3fn with `hidden_scale`):
    post-attention-norm hidden states."""
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
    hidden_scale: torch.Tensor | None = None
    """`[num_tokens] float32`, positive: set when `hidden` travels as float8_e4m3fn (the fp8 wire); the
    hidden states are then `hidden.float() * hidden_scale[:, None]`."""

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0])

    def in_dtype(self, dtype: torch.dtype) -> FfnRequest:
        """This request with `hidden` in the compute dtype `dtype` (fp8 dequantised); itself when it already is."""
        if self.hidden_scale is None and self.hidden.dtype == dtype:
            return self
        if self.hidden_scale is not None:
            hidden = (self.hidden.float() * self.hidden_scale.unsqueeze(1)).to(dtype)
        else:
            hidden = self.hidden.to(dtype)
        return dataclasses.replace(self, hidden=hidden, hidden_scale=None)


FP8_WIRE_DTYPE = torch.float8_e4m3fn
"""The fp8 format of the attention->FFN wire (e4m3: 3 mantissa bits, range +-448, as Step-3 and FastAFD)."""
FP8_MAX = float(torch.finfo(FP8_WIRE_DTYPE).max)


def quantize_fp8(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden `[num_tokens, hidden_size]` -> (float8_e4m3fn of the same shape, `[num_tokens] float32` scales).

    One scale per token (its row's absolute maximum / 448), so a token with large activations does not
    crush the others' precision; an all-zero row gets scale 1. `q.float() * scale[:, None]` restores hidden
    to about 2**-4 relative error per element.
    """
    amax = hidden.abs().amax(dim=1).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    quantized = (hidden.float() / scale.unsqueeze(1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_WIRE_DTYPE)
    return quantized, scale
