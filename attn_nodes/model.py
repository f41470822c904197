"""The attention half of the model: embeddings, per-layer attention + norms + MoE gate, final norm, LM head.

Loaded from the checkpoint with only the tensors this role owns. The per-layer method does the
attention side of DESIGN.md's split: input norm, attention (KV cache here), residual add,
post-attention norm and gate top-k; the FFN nodes' partial sums are added by the caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from afd.checkpoint import CheckpointReader
from afd.kernels import linear, packed_linear
from afd.model_spec import ModelSpec, MoeSpec
from afd.tensor_names import TensorNames
from attn_nodes.attention import GqaAttention, MlaAttention, rms_norm
from attn_nodes.attention_metadata import AttentionMetadata
from attn_nodes.linear_attention import LightningAttention, decay_tables
from attn_nodes.moe_gate import GateWeights, Routing, route
from attn_nodes.rope import RotaryEmbedding


@dataclass(slots=True)
class AttentionLayer:
    """One decoder layer's attention-side weights."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    attention: GqaAttention | MlaAttention | LightningAttention
    gate: GateWeights | None
    moe: MoeSpec | None
    residual_scales: tuple[float, float, float] | None = None
    """MiniMax: (alpha, beta) around this layer's attention and the MLP's alpha (see ResidualScales); the
    residual is then the normalised input. None: the usual pre-norm residual."""


class AttentionHalfModel:
    """Everything of the model except the MLPs/experts."""

    def __init__(
        self,
        spec: ModelSpec,
        embed: torch.Tensor,
        final_norm: torch.Tensor,
        lm_head: torch.Tensor,
        layers: list[AttentionLayer],
        rope: RotaryEmbedding,
    ) -> None:
        self.spec = spec
        self.embed_tokens = embed
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.layers = layers
        self.rope = rope
        self.dtype = embed.dtype
        self.device = embed.device
        """Where every weight, the KV cache and each step's tensors live (the node's --device)."""
        packed_linear.allow(self._projection_weights())  # they live as long as the model: the tuner may pack them

    def _projection_weights(self) -> Iterator[torch.Tensor]:
        """The LM head and every attention projection matrix (the weights `linear` multiplies each step)."""
        yield self.lm_head
        for layer in self.layers:
            yield from (value for value in vars(layer.attention).values() if isinstance(value, torch.Tensor))

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        max_positions: int,
        dtype: torch.dtype | None = None,
        spec: ModelSpec | None = None,
        reader: CheckpointReader | None = None,
        device: torch.device | str = "cpu",
    ) -> AttentionHalfModel:
        """`device`: where the weights go (read straight onto it); a given `reader` must place them there."""
        spec = spec or ModelSpec.from_pretrained(model_dir)
        reader = reader or CheckpointReader(model_dir, dtype=dtype, device=device)
        names = TensorNames(spec)
        embed = reader.get(names.embed, (spec.vocab_size, spec.hidden_size))
        rope = RotaryEmbedding(spec.rope, max_positions, embed.dtype, embed.device)
        sliding_rope = (
            RotaryEmbedding(spec.sliding_rope, max_positions, embed.dtype, embed.device) if spec.sliding_rope else None
        )
        layers = []
        for layer in range(spec.num_layers):
            shapes = _attention_shapes(spec, spec.layer_num_heads(layer))
            w = {key: reader.get(name, shapes.get(key)) for key, name in names.attention(layer).items()}
            if spec.norm_offset:
                w |= {key: _offset_norm(w[key]) for key in ("input_norm", "post_norm", "q_norm", "k_norm") if key in w}
            if spec.is_linear_attention(layer):
                attention: GqaAttention | MlaAttention | LightningAttention = LightningAttention(
                    spec, layer, w, _stored_decays(reader, names, spec, layer)
                )
            elif spec.mla:
                attention = MlaAttention(spec, w, rope)
            else:
                own_rope = sliding_rope if sliding_rope is not None and layer in spec.sliding_layers else None
                attention = GqaAttention(
                    spec,
                    w,
                    own_rope or rope,
                    window=spec.attention_window(layer),
                    num_heads=spec.layer_num_heads(layer),
                    layer_rope=own_rope is not None,
                )
            moe = spec.moe(layer)
            gate = None
            if moe is not None:
                r = names.router(layer)
                gate = GateWeights(
                    weight=reader.get(r["gate"], (moe.num_experts, spec.hidden_size)),
                    correction_bias=reader.get(r["correction_bias"], (moe.num_experts,)).float()
                    if "correction_bias" in r
                    else None,
                    shared_gate=reader.get(r["shared_gate"], (1, spec.hidden_size)) if "shared_gate" in r else None,
                    bias=reader.get(r["bias"], (moe.num_experts,)) if "bias" in r else None,
                )
            layers.append(AttentionLayer(w["input_norm"], w["post_norm"], attention, gate, moe))
            if spec.residual_scales is not None:
                s = spec.residual_scales
                linear = spec.is_linear_attention(layer)
                layers[-1].residual_scales = (
                    s.linear_attn_alpha if linear else s.full_attn_alpha,
                    s.linear_attn_beta if linear else s.full_attn_beta,
                    s.mlp_alpha,
                )
        final_norm = reader.get(names.final_norm, (spec.hidden_size,))
        if spec.norm_offset:
            final_norm = _offset_norm(final_norm)
        lm_head = embed if spec.tie_word_embeddings else reader.get(names.lm_head, (spec.vocab_size, spec.hidden_size))
        return cls(spec, embed, final_norm, lm_head, layers, rope)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`token_ids: [num_tokens] int64` -> residual stream `[num_tokens, hidden]` (model dtype)."""
        return F.embedding(token_ids, self.embed_tokens)

    def attention_half(
        self,
        layer: int,
        residual: torch.Tensor,
        meta: AttentionMetadata,
        cache: torch.Tensor,
        rope_tables: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, Routing | None]:
        """Attention side of `layer`; adds the attention output into `residual` in place.

        residual: `[num_tokens, hidden]` model dtype. Returns the post-attention-norm hidden states
        `[num_tokens, hidden]` to send to the FFN nodes and, for MoE layers, the gate's choice.
        """
        weights = self.layers[layer]
        x = rms_norm(residual, weights.input_norm, self.spec.rms_norm_eps)
        if weights.residual_scales is None:
            residual += weights.attention.forward(x, meta, cache, *rope_tables)
            h = rms_norm(residual, weights.post_norm, self.spec.rms_norm_eps)
        else:
            # MiniMax: each sublayer's residual is its normalised input, scaled; the FFN partials the caller adds
            # are already scaled by the MLP's beta (the routing weights carry it).
            attn_alpha, attn_beta, mlp_alpha = weights.residual_scales
            residual.copy_(x * attn_alpha + weights.attention.forward(x, meta, cache, *rope_tables) * attn_beta)
            h = rms_norm(residual, weights.post_norm, self.spec.rms_norm_eps)
            residual.copy_(h * mlp_alpha)
        if weights.gate is None or weights.moe is None:
            return h, None
        return h, route(h, weights.gate, weights.moe)

    def logits(self, residual: torch.Tensor) -> torch.Tensor:
        """`[num_rows, hidden]` final residual rows -> `[num_rows, vocab] float32` logits."""
        return linear(rms_norm(residual, self.final_norm, self.spec.rms_norm_eps), self.lm_head).float()


def _stored_decays(
    reader: CheckpointReader, names: TensorNames, spec: ModelSpec, layer: int
) -> dict[str, torch.Tensor] | None:
    """The decay tables a checkpoint stores for lightning layer `layer` (transformers saves them), or None when
    it stores none; their shapes must be those the config implies, as transformers checks when loading."""
    stored = names.linear_attention_decays(layer)
    if not all(reader.has(name) for name in stored.values()):
        return None
    expected = {key: tuple(t.shape) for key, t in decay_tables(spec, layer).items()}
    return {key: reader.get(name, expected[key]).float() for key, name in stored.items()}


def _offset_norm(weight: torch.Tensor) -> torch.Tensor:
    """The scale of a norm stored as an offset from one (ModelSpec.norm_offset), kept in float32: the reference
    scales the float32 normalised input by 1 + weight before rounding (see attention.rms_norm)."""
    return 1.0 + weight.float()


def _attention_shapes(spec: ModelSpec, num_heads: int | None = None) -> dict[str, tuple[int, ...]]:
    """Expected shape of every attention-side tensor, so a mismatched checkpoint fails at load; `num_heads`:
    the layer's query heads (spec.layer_num_heads), spec.num_heads when None."""
    hidden = spec.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"input_norm": (hidden,), "post_norm": (hidden,)}
    if spec.mla is not None:
        m, heads = spec.mla, spec.num_heads
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        shapes |= {
            "q_proj": (heads * qk, hidden),
            "q_b_proj": (heads * qk, m.q_lora_rank or 0),
            "q_a_proj": (m.q_lora_rank or 0, hidden),
            "q_a_norm": (m.q_lora_rank or 0,),
            "kv_a_proj": (m.kv_lora_rank + m.qk_rope_head_dim, hidden),
            "kv_a_norm": (m.kv_lora_rank,),
            "kv_b_proj": (heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
            "o_proj": (hidden, heads * m.v_head_dim),
        }
        return shapes
    heads = num_heads or spec.num_heads
    q, kv = heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    return shapes | {
        "q_proj": (q, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "q_bias": (q,),
        "k_bias": (kv,),
        "v_bias": (kv,),
        "o_proj": (hidden, q),
        "o_bias": (hidden,),
        "q_norm": (spec.head_dim,),
        "k_norm": (spec.head_dim,),
        "sinks": (heads,),
        "g_proj": (heads, hidden),
        "qkv_proj": (3 * q, hidden),
        "output_gate": (q, hidden),
        "attn_norm": (q,),
        "out_proj": (hidden, q),
    }
