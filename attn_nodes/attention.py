"""Attention of one layer over the paged KV cache: grouped-query attention and DeepSeek's MLA.

Each layer's cache is one tensor `[num_slots, entry_width]`: K and V side by side for GQA, the
compressed latent and the rope key for MLA (the naive form up-projects the gathered latent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afd import kernels
from afd.kernels import linear
from afd.model_spec import ModelSpec
from attn_nodes.attention_metadata import AttentionMetadata
from attn_nodes.rope import RotaryEmbedding

# DeepSeek's q_a / kv_a layernorms use the RMSNorm default epsilon, not config.rms_norm_eps.
MLA_LATENT_NORM_EPS = 1e-6


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; `weight` broadcasts against x (e.g. `[heads, head_dim]`).

    Bit-identical to the reference models (normalise in float32, round to x's dtype, then scale by the
    weight in that dtype); F.rms_norm does the float32 part in one kernel.
    """
    if weight.dtype != x.dtype:
        # Offset norms (ModelSpec.norm_offset) keep 1 + weight in float32 and scale before rounding, as their
        # reference does.
        return (weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps)).to(x.dtype)
    fused = kernels.rms_norm(x, weight, eps)
    if fused is not None:
        return fused
    return weight * F.rms_norm(x, (x.shape[-1],), None, eps)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows `slots: [num_seqs, ctx] int64` of `cache: [num_slots, width]` -> `[num_seqs, ctx, width]`.

    index_select on the flattened slots is several times faster on CPU than advanced indexing.
    """
    return cache.index_select(0, slots.view(-1)).view(*slots.shape, cache.shape[1])


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    gqa: bool,
) -> torch.Tensor:
    """Padded batched attention.

    query: `[num_tokens, heads, qk_dim]`; key: `[num_seqs, ctx, kv_heads, qk_dim]`;
    value: `[num_seqs, ctx, kv_heads, v_dim]`. Returns `[num_tokens, heads * v_dim]`.
    """
    _, heads, qk_dim = query.shape
    if meta.query_index is None:
        q = query.view(meta.num_seqs, 1, heads, qk_dim)
        mask = meta.key_padding
    else:
        q = query.new_zeros(meta.num_seqs * meta.max_query_len, heads, qk_dim)
        q[meta.query_index] = query
        q = q.view(meta.num_seqs, meta.max_query_len, heads, qk_dim)
        mask = meta.mask
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
        enable_gqa=gqa,
    )  # [num_seqs, heads, max_query_len, v_dim]
    out = out.transpose(1, 2).reshape(meta.num_seqs * meta.max_query_len, -1)
    return out if meta.query_index is None else out[meta.query_index]


def _attend_windowed(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """`_attend` for sliding-window layers and layers with attention sinks (shapes as there).

    window: keys a query sees counting back from itself (None: all before it). sinks: `[heads]` learned
    logits that join each softmax's denominator and are dropped after it (gpt-oss). SDPA takes no sink, so
    with sinks the softmax is written out, in the order of the transformers reference (scores, sink column,
    subtract the row maximum, softmax in the scores' dtype).
    """
    _, heads, qk_dim = query.shape
    seqs, q_len = meta.num_seqs, meta.max_query_len
    if meta.query_index is None:
        q = query.view(seqs, 1, heads, qk_dim)
    else:
        q = query.new_zeros(seqs * q_len, heads, qk_dim)
        q[meta.query_index] = query
        q = q.view(seqs, q_len, heads, qk_dim)
    mask: torch.Tensor | None
    if window is not None:
        mask = meta.window_mask(window)
    else:
        mask = meta.key_padding if meta.query_index is None else meta.mask
    q, k, v = q.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [seqs, heads, len, dim]
    if sinks is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != heads)
    else:
        if k.shape[1] != heads:  # query head h reads kv head h // (heads / kv_heads), as repeat_kv does
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale  # [seqs, heads, q_len, ctx]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        sink = sinks.to(scores.dtype).view(1, heads, 1, 1).expand(seqs, heads, q_len, 1)
        logits = torch.cat((scores, sink), dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]
        out = torch.matmul(probs.to(v.dtype), v)
    out = out.transpose(1, 2).reshape(seqs * q_len, -1)
    return out if meta.query_index is None else out[meta.query_index]


class GqaAttention:
    """Multi-head / grouped-query attention with optional qkv bias and per-head q/k RMSNorm (Qwen3)."""

    def __init__(
        self,
        spec: ModelSpec,
        w: dict[str, torch.Tensor],
        rope: RotaryEmbedding,
        window: int | None = None,
        num_heads: int | None = None,
        layer_rope: bool = False,
    ) -> None:
        """`window`: this layer's sliding window (spec.attention_window), None for full causal attention;
        `num_heads`: its query heads (spec.layer_num_heads), spec.num_heads when None; `layer_rope`: `rope` is this
        layer's own (spec.sliding_rope), so forward takes its cos/sin from it instead of the model's tables."""
        self.spec = spec
        self.rope = rope
        self.window = window
        self.num_heads = num_heads or spec.num_heads
        self.layer_rope = layer_rope
        self.sinks = w.get("sinks")
        """`[num_heads]` attention sink logits (gpt-oss), or None."""
        self.q_width = self.num_heads * spec.head_dim
        self.kv_width = spec.num_kv_heads * spec.head_dim
        # Step-3.5's per-head output gate `[num_heads, hidden]` rides in the same matmul, after v.
        self.head_gate = "g_proj" in w
        self.qkv = torch.cat((w["q_proj"], w["k_proj"], w["v_proj"], *([w["g_proj"]] if self.head_gate else [])))
        self.qkv_bias = torch.cat((w["q_bias"], w["k_bias"], w["v_bias"])) if spec.qkv_bias else None
        if self.qkv_bias is not None and self.head_gate:
            raise ValueError("a per-head output gate with q/k/v biases is not supported")
        # q and k are normalised and rotated together as one [tokens, heads + kv_heads, head_dim] tensor.
        self.qk_norm = (
            torch.cat((w["q_norm"].expand(self.num_heads, -1), w["k_norm"].expand(spec.num_kv_heads, -1)))
            if spec.qk_norm
            else None
        )
        self.o_proj, self.o_bias = w["o_proj"], w.get("o_bias")

    def forward(
        self,
        h: torch.Tensor,
        meta: AttentionMetadata,
        cache: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """`h: [num_tokens, hidden]` -> `[num_tokens, hidden]`; writes this step's K/V into `cache`."""
        spec, heads = self.spec, self.num_heads
        n = h.shape[0]
        qkv = linear(h, self.qkv, self.qkv_bias)
        qk = qkv[:, : self.q_width + self.kv_width].view(n, heads + spec.num_kv_heads, spec.head_dim)
        v = qkv[:, self.q_width + self.kv_width : self.q_width + 2 * self.kv_width]
        if self.qk_norm is not None:
            qk = rms_norm(qk, self.qk_norm, spec.rms_norm_eps)
        if self.layer_rope:
            cos, sin = self.rope.tables(meta.positions)
        qk = self.rope.apply(qk, cos, sin)
        q, k = qk[:, :heads], qk[:, heads:]
        cache.index_copy_(0, meta.slot_mapping, torch.cat((k.reshape(n, -1), v), dim=1))
        out = None
        if meta.query_index is None and self.window is None and self.sinks is None:
            # Decode only: one token per sequence at position = context length - 1.
            out = kernels.paged_decode_attention(
                q, cache, meta.context_slots, meta.positions + 1, spec.num_kv_heads, spec.softmax_scale
            )
        if out is None:
            context = _gather(cache, meta.context_slots)  # [num_seqs, ctx, 2 * kv_width]
            shape = (*context.shape[:2], spec.num_kv_heads, spec.head_dim)
            keys = context[..., : self.kv_width].view(shape)
            values = context[..., self.kv_width :].view(shape)
            if self.window is None and self.sinks is None:
                out = _attend(q, keys, values, meta, spec.softmax_scale, gqa=spec.num_kv_heads != heads)
            else:
                out = _attend_windowed(q, keys, values, meta, spec.softmax_scale, self.window, self.sinks)
        if self.head_gate:
            gate = torch.sigmoid(qkv[:, self.q_width + 2 * self.kv_width :])  # [num_tokens, heads]
            out = (out.view(n, heads, spec.head_dim) * gate.unsqueeze(-1)).view(n, -1)
        return linear(out, self.o_proj, self.o_bias)


class MlaAttention:
    """DeepSeek multi-head latent attention; caches `[kv_lora_rank + qk_rope_head_dim]` per token."""

    def __init__(self, spec: ModelSpec, w: dict[str, torch.Tensor], rope: RotaryEmbedding) -> None:
        assert spec.mla is not None
        self.spec = spec
        self.mla = spec.mla
        self.rope = rope
        self.q_proj = w.get("q_proj")
        self.q_a_proj, self.q_a_norm, self.q_b_proj = w.get("q_a_proj"), w.get("q_a_norm"), w.get("q_b_proj")
        self.kv_a_proj, self.kv_a_norm, self.kv_b_proj = w["kv_a_proj"], w["kv_a_norm"], w["kv_b_proj"]
        self.o_proj = w["o_proj"]

    def forward(
        self,
        h: torch.Tensor,
        meta: AttentionMetadata,
        cache: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """`h: [num_tokens, hidden]` -> `[num_tokens, hidden]`; writes this step's latents into `cache`."""
        mla, heads, n = self.mla, self.spec.num_heads, h.shape[0]
        if self.q_proj is not None:
            q = linear(h, self.q_proj)
        else:
            assert self.q_a_proj is not None and self.q_a_norm is not None and self.q_b_proj is not None
            q = linear(rms_norm(linear(h, self.q_a_proj), self.q_a_norm, MLA_LATENT_NORM_EPS), self.q_b_proj)
        q = q.view(n, heads, mla.qk_nope_head_dim + mla.qk_rope_head_dim)
        q_nope, q_rope = q[..., : mla.qk_nope_head_dim], q[..., mla.qk_nope_head_dim :]
        compressed = linear(h, self.kv_a_proj)
        latent = rms_norm(compressed[:, : mla.kv_lora_rank], self.kv_a_norm, MLA_LATENT_NORM_EPS)
        k_rope = self.rope.apply(compressed[:, None, mla.kv_lora_rank :], cos, sin)
        cache.index_copy_(0, meta.slot_mapping, torch.cat((latent, k_rope.squeeze(1)), dim=1))
        query = torch.cat((q_nope, self.rope.apply(q_rope, cos, sin)), dim=-1)

        context = _gather(cache, meta.context_slots)  # [num_seqs, ctx, kv_lora_rank + rope]
        seqs, ctx = context.shape[:2]
        kv = linear(context[..., : mla.kv_lora_rank], self.kv_b_proj).view(
            seqs, ctx, heads, mla.qk_nope_head_dim + mla.v_head_dim
        )
        k_nope, values = kv[..., : mla.qk_nope_head_dim], kv[..., mla.qk_nope_head_dim :]
        k_rope_ctx = context[..., None, mla.kv_lora_rank :].expand(seqs, ctx, heads, mla.qk_rope_head_dim)
        keys = torch.cat((k_nope, k_rope_ctx), dim=-1)
        out = _attend(query, keys, values, meta, self.spec.softmax_scale, gqa=False)
        return linear(out, self.o_proj)
