"""Rotary position embedding with the scaling schemes of the supported checkpoints.

Frequencies follow the HF reference formulas (default, linear, llama3, yarn) so that cos/sin tables are
bit-identical to transformers'; the table is built once per engine for every position it can serve.
"""

from __future__ import annotations

import math

import torch

from afd import kernels
from afd.model_spec import RopeSpec, yarn_mscale


def inverse_frequencies(rope: RopeSpec) -> tuple[torch.Tensor, float]:
    """Per-pair angular frequencies `[rotary_dim // 2] float32` and the cos/sin magnitude factor."""
    dim = rope.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3(inv_freq, rope), 1.0
    return _yarn(rope)


def _llama3(inv_freq: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    old_len = rope.original_max_position
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeSpec) -> tuple[torch.Tensor, float]:
    dim, base, factor = rope.rotary_dim, rope.theta, rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(rope.original_max_position / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """Applies rope to `[num_tokens, num_heads, head_dim]` tensors given `positions: [num_tokens] int64`."""

    def __init__(
        self, rope: RopeSpec, max_positions: int, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> None:
        """The tables are computed on the host, as the references compute inv_freq, then moved to `device`."""
        inv_freq, magnitude = inverse_frequencies(rope)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cos = (freqs.cos() * magnitude).to(dtype)
        sin = (freqs.sin() * magnitude).to(dtype)
        # Full-width tables with the rotation's sign folded into sin: out = x * cos + swap_halves(x) * sin,
        # the reference's `x * cos + rotate_half(x) * sin` with the same roundings, in fewer kernels.
        self.cos = torch.cat((cos, cos), dim=-1).to(device)  # [max_positions, rotary_dim]
        self.sin = torch.cat((-sin, sin), dim=-1).to(device)
        self.rotary_dim = rope.rotary_dim
        self.interleaved = rope.interleaved
        self.max_positions = max_positions

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[num_tokens, 1, rotary_dim]` for the given positions (computed once per step)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first `rotary_dim` features of `x: [num_tokens, heads, head_dim]`.

        Interleaved layouts rotate pairs (x0, x1), (x2, x3), ... and return them de-interleaved as
        [evens, odds]; attention scores are unchanged because queries and keys get the same permutation.
        """
        if not self.interleaved and self.rotary_dim == x.shape[-1]:
            fused = kernels.rope(x, cos, sin)
            if fused is not None:
                return fused
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rot = torch.cat((x1, x2), dim=-1)
        else:
            half = self.rotary_dim // 2
            x1, x2 = rot[..., :half], rot[..., half:]
        out = rot * cos + torch.cat((x2, x1), dim=-1) * sin
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
