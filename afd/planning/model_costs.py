"""What a model costs per decode token: parameter bytes, FLOPs and KV bytes of each half, from its ModelSpec.

The cost model needs, per layer, what the attention node reads and computes for one token (its attention
weights, the KV of the context, the gate) and what the FFN pool reads and computes (routed experts, shared
experts, dense MLPs). Layers with the same shape are grouped (`LayerClass.count`) so that a 61-layer
DeepSeek-V3 costs two evaluations, not 61. Norms, biases and rope tables are left out: they are well under 1 %
of the bytes of every supported architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

from afd.model_spec import ModelSpec


@dataclass(frozen=True, slots=True)
class LayerClass:
    """Layers that cost the same; every figure is for one layer and one token unless it says otherwise."""

    count: int
    """Layers of this shape."""
    attention_params: int
    """Parameters the attention node holds for the layer (q/k/v/o or MLA projections, the MoE gate)."""
    attention_flops_per_token: float
    """Projection FLOPs per token (2 per multiply-add), independent of the context."""
    attention_flops_per_token_ctx: float
    """Score and value FLOPs per token per context token (QK^T and PV)."""
    kv_bytes_per_token: int
    """KV-cache bytes one context token occupies in this layer (0 for a linear-attention layer)."""
    state_bytes_per_request: int
    """Recurrent state of a linear-attention layer per request (0 for softmax attention)."""
    num_experts: int
    """Routed experts (0: a dense layer)."""
    top_k: int
    """Routed experts per token."""
    expert_params: int
    """Parameters of one routed expert (gate, up, down)."""
    shared_params: int
    """Parameters of the dense MLP or the shared expert(s), split across the FFN nodes along the intermediate
    dimension, so every FFN node sees every token of such a layer."""
    expert_intermediate_size: int
    """Intermediate width of one routed expert (the shape the FFN nodes calibrate on)."""


@dataclass(frozen=True, slots=True)
class ModelCosts:
    """A model's per-token costs for the planner (all byte figures at `weight_bytes` per parameter)."""

    hidden_size: int
    """Width of the hidden state that crosses the A↔F link."""
    num_layers: int
    """Decoder layers."""
    layers: tuple[LayerClass, ...]
    """Layer shapes with their counts (sum of counts = num_layers)."""
    head_params: int
    """LM head parameters (read once per decode step)."""
    embedding_params: int
    """Embedding parameters held by the attention node (0 when tied to the LM head)."""
    weight_bytes: float
    """Bytes per parameter as the nodes hold them (2 for bf16)."""

    @property
    def attention_weight_bytes(self) -> float:
        """What one attention node holds: attention halves of every layer, embeddings, LM head."""
        params = sum(c.count * c.attention_params for c in self.layers) + self.head_params + self.embedding_params
        return params * self.weight_bytes

    @property
    def ffn_weight_bytes(self) -> float:
        """What the whole FFN pool holds (each expert once): routed experts, shared experts, dense MLPs."""
        params = sum(c.count * (c.num_experts * c.expert_params + c.shared_params) for c in self.layers)
        return params * self.weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes of one context token over all layers."""
        return sum(c.count * c.kv_bytes_per_token for c in self.layers)

    @property
    def state_bytes_per_request(self) -> int:
        """Linear-attention state of one request over all layers."""
        return sum(c.count * c.state_bytes_per_request for c in self.layers)

    @property
    def calibration_expert_params(self) -> int:
        """Parameters of the expert (or dense MLP) an FFN node times at start-up (ffn_nodes/node.py)."""
        moe = next((c for c in self.layers if c.num_experts), None)
        if moe is not None:
            return moe.expert_params
        return self.layers[0].shared_params


def model_costs(spec: ModelSpec, weight_bytes: float = 2.0, kv_bytes: float = 2.0) -> ModelCosts:
    """Per-token costs of `spec` with weights of `weight_bytes` and KV entries of `kv_bytes` per element."""
    hidden = spec.hidden_size
    classes: dict[tuple[object, ...], int] = {}
    for layer in range(spec.num_layers):
        key = _layer_key(spec, layer, kv_bytes)
        classes[key] = classes.get(key, 0) + 1
    layers = tuple(LayerClass(count, *key) for key, count in classes.items())  # type: ignore[arg-type]
    head = spec.vocab_size * hidden
    return ModelCosts(
        hidden_size=hidden,
        num_layers=spec.num_layers,
        layers=layers,
        head_params=head,
        embedding_params=0 if spec.tie_word_embeddings else head,
        weight_bytes=weight_bytes,
    )


def _layer_key(spec: ModelSpec, layer: int, kv_bytes: float) -> tuple[object, ...]:
    hidden = spec.hidden_size
    heads = spec.layer_num_heads(layer)
    ffn = spec.layers[layer]
    moe = ffn.moe
    if spec.mla is not None:
        mla = spec.mla
        qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        q = hidden * mla.q_lora_rank + mla.q_lora_rank * heads * qk if mla.q_lora_rank else hidden * heads * qk
        kv = hidden * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank * heads * (
            mla.qk_nope_head_dim + mla.v_head_dim
        )
        params = q + kv + heads * mla.v_head_dim * hidden
        # scores against the cached latent and rope key, then values from the latent (absorbed form)
        per_ctx = 2 * heads * (mla.kv_lora_rank + mla.qk_rope_head_dim) + 2 * heads * mla.kv_lora_rank
    else:
        params = hidden * heads * spec.head_dim * 2 + hidden * spec.num_kv_heads * spec.head_dim * 2
        per_ctx = 4 * heads * spec.head_dim
    linear = spec.is_linear_attention(layer)
    if moe is not None:
        params += hidden * moe.num_experts  # the gate runs on the attention node
    kv_per_token = 0 if linear else int(spec.kv_entry_width * kv_bytes)
    state = int(heads * spec.head_dim * spec.head_dim * kv_bytes) if linear else 0
    if linear:
        per_ctx = 0  # a recurrence: its cost does not grow with the context
    experts = moe.num_experts if moe is not None else 0
    top_k = moe.top_k if moe is not None else 0
    expert_inter = moe.intermediate_size if moe is not None else 0
    shared_inter = moe.shared_intermediate_size if moe is not None else ffn.dense_intermediate_size
    attention_flops = 2.0 * params + (4.0 * heads * spec.head_dim * spec.head_dim if linear else 0.0)
    return (
        params,
        attention_flops,
        float(per_ctx),
        kv_per_token,
        state,
        experts,
        top_k,
        3 * hidden * expert_inter,
        3 * hidden * shared_inter,
        expert_inter,
    )
