"""Checkpoint tensor names per architecture family, as they appear in Hub safetensors files.

Kept apart from the model spec so that the role-pruned loaders on both sides ask one place which
tensors they own, and a test can assert exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

from afd.model_spec import ModelSpec


@dataclass(frozen=True, slots=True)
class GatedMlpNames:
    """The three matrices of a SwiGLU MLP: down(silu(gate(x)) * up(x))."""

    gate: str
    up: str
    down: str


@dataclass(frozen=True, slots=True)
class FusedExpertNames:
    """gpt-oss stores a layer's routed experts as four stacked tensors, one row per expert.

    gate_up: `[num_experts, hidden, 2 * intermediate]` with gate and up columns interleaved (gate at even
    columns); gate_up_bias: `[num_experts, 2 * intermediate]` interleaved the same way;
    down: `[num_experts, intermediate, hidden]`; down_bias: `[num_experts, hidden]`.
    """

    gate_up: str
    gate_up_bias: str
    down: str
    down_bias: str


class TensorNames:
    """Names of every tensor a role may read, for one model spec."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._moe_block = "block_sparse_moe" if spec.family in ("mixtral", "minimax") else "mlp"
        if spec.family == "step3p5":
            self._moe_block = "moe"

    embed = "model.embed_tokens.weight"
    final_norm = "model.norm.weight"

    @property
    def lm_head(self) -> str:
        return self.embed if self.spec.tie_word_embeddings else "lm_head.weight"

    def layer(self, layer: int) -> str:
        return f"model.layers.{layer}."

    def attention(self, layer: int) -> dict[str, str]:
        """Attention-side tensors of one layer (norms, projections) keyed by role-local name."""
        p = self.layer(layer)
        if self.spec.is_linear_attention(layer):
            return {
                "input_norm": p + "input_layernorm.weight",
                "post_norm": p + "post_attention_layernorm.weight",
                **self.linear_attention(layer),
            }
        names = {
            "input_norm": p + "input_layernorm.weight",
            "post_norm": p + "post_attention_layernorm.weight",
            "o_proj": p + "self_attn.o_proj.weight",
        }
        if self.spec.o_bias:
            names["o_bias"] = p + "self_attn.o_proj.bias"
        mla = self.spec.mla
        if mla is not None:
            a = p + "self_attn."
            if mla.q_lora_rank is None:
                names["q_proj"] = a + "q_proj.weight"
            else:
                names |= {
                    "q_a_proj": a + "q_a_proj.weight",
                    "q_a_norm": a + "q_a_layernorm.weight",
                    "q_b_proj": a + "q_b_proj.weight",
                }
            names |= {
                "kv_a_proj": a + "kv_a_proj_with_mqa.weight",
                "kv_a_norm": a + "kv_a_layernorm.weight",
                "kv_b_proj": a + "kv_b_proj.weight",
            }
            return names
        for proj in ("q", "k", "v"):
            names[f"{proj}_proj"] = p + f"self_attn.{proj}_proj.weight"
            if self.spec.qkv_bias:
                names[f"{proj}_bias"] = p + f"self_attn.{proj}_proj.bias"
        if self.spec.qk_norm:
            names["q_norm"] = p + "self_attn.q_norm.weight"
            names["k_norm"] = p + "self_attn.k_norm.weight"
        if self.spec.attention_sinks:
            names["sinks"] = p + "self_attn.sinks"
        if self.spec.head_gate:
            names["g_proj"] = p + "self_attn.g_proj.weight"
        return names

    def linear_attention(self, layer: int) -> dict[str, str]:
        """MiniMax lightning-attention projections of `layer`: fused q/k/v `[3 * heads * head_dim, hidden]` (per
        head q, k, v), output gate `[heads * head_dim, hidden]`, the norm over all heads, output projection."""
        a = self.layer(layer) + "self_attn."
        return {
            "qkv_proj": a + "qkv_proj.weight",
            "output_gate": a + "output_gate.weight",
            "attn_norm": a + "norm.weight",
            "out_proj": a + "out_proj.weight",
        }

    def linear_attention_decays(self, layer: int) -> dict[str, str]:
        """The decay tables transformers saves beside a lightning layer's weights (persistent buffers, derived from
        the config); read when a checkpoint has them, since the reference then uses the stored values."""
        a = self.layer(layer) + "self_attn."
        return {key: a + key for key in ("slope_rate", "query_decay", "key_decay", "diagonal_decay")}

    def router(self, layer: int) -> dict[str, str]:
        """Gate tensors of an MoE layer; they live on the attention side (top-k happens there)."""
        moe = self.spec.moe(layer)
        if moe is None:
            return {}
        p = self.layer(layer) + self._moe_block + "."
        if self.spec.family == "gpt_oss":
            return {"gate": p + "router.weight", "bias": p + "router.bias"}
        names = {"gate": p + "gate.weight"}
        if moe.correction_bias:
            bias = "router_bias" if self.spec.family == "step3p5" else "gate.e_score_correction_bias"
            names["correction_bias"] = p + bias
        if moe.shared_gate:
            names["shared_gate"] = p + "shared_expert_gate.weight"
        return names

    def fused_experts(self, layer: int) -> FusedExpertNames | None:
        """The stacked expert tensors of `layer` for families that store experts that way (gpt-oss), else None."""
        if self.spec.family != "gpt_oss" or self.spec.moe(layer) is None:
            return None
        p = f"{self.layer(layer)}{self._moe_block}.experts."
        return FusedExpertNames(p + "gate_up_proj", p + "gate_up_proj_bias", p + "down_proj", p + "down_proj_bias")

    def stacked_experts(self, layer: int) -> GatedMlpNames | None:
        """Step-3.5 stores each projection of a layer's routed experts as one tensor, one row per expert: gate and
        up `[num_experts, intermediate, hidden]`, down `[num_experts, hidden, intermediate]`; None elsewhere."""
        if self.spec.family != "step3p5" or self.spec.moe(layer) is None:
            return None
        return _gated(f"{self.layer(layer)}{self._moe_block}.")

    def expert(self, layer: int, expert: int) -> GatedMlpNames:
        if self.fused_experts(layer) is not None:
            raise ValueError(f"{self.spec.architecture} stores experts fused; use fused_experts({layer})")
        if self.stacked_experts(layer) is not None:
            raise ValueError(f"{self.spec.architecture} stacks its experts; use stacked_experts({layer})")
        p = f"{self.layer(layer)}{self._moe_block}.experts.{expert}."
        if self.spec.family in ("mixtral", "minimax"):
            return GatedMlpNames(p + "w1.weight", p + "w3.weight", p + "w2.weight")
        return _gated(p)

    def shared_expert(self, layer: int) -> GatedMlpNames:
        if self.spec.family == "step3p5":
            return _gated(f"{self.layer(layer)}share_expert.")
        block = "shared_expert" if self.spec.family == "qwen2_moe" else "shared_experts"
        return _gated(f"{self.layer(layer)}mlp.{block}.")

    def dense_mlp(self, layer: int) -> GatedMlpNames:
        return _gated(self.layer(layer) + "mlp.")

    def attention_role(self) -> list[str]:
        """Every tensor the attention role reads (MiniMax's decay tables only where the checkpoint stores them)."""
        names = [self.embed, self.final_norm, self.lm_head]
        for layer in range(self.spec.num_layers):
            names += self.attention(layer).values()
            if self.spec.is_linear_attention(layer):
                names += self.linear_attention_decays(layer).values()
            names += self.router(layer).values()
        return list(dict.fromkeys(names))


def _gated(prefix: str) -> GatedMlpNames:
    return GatedMlpNames(prefix + "gate_proj.weight", prefix + "up_proj.weight", prefix + "down_proj.weight")
