"""StepFun Step-3.5 for the tests: transformers' text model as the reference, checkpoints in the Hub layout.

transformers (5.x) has Step-3.5's text model only inside its Step-3.7 vision-language model: `model_type`
"step3p5" maps to `Step3p7TextConfig` and `Step3p7TextModel`, and no causal-LM class is registered for it (the
published checkpoints, `architectures: ["Step3p5ForCausalLM"]`, load through their own remote code). The
reference here is that text model plus an LM head, as `Step3p7ForConditionalGeneration` adds one, with
transformers' `generate`.

The checkpoint is written as the Hub publishes it, which is what the engine reads and which differs from
transformers' module names (transformers' Step-3.7 weight conversion maps the one to the other):
- routed experts `model.layers.N.moe.{gate,up,down}_proj.weight`, one tensor per projection stacked over the
  experts (transformers: `mlp.experts.gate_up_proj` = gate and up concatenated along dim 1, `mlp.experts.down_proj`);
- the router `moe.gate.weight` and its correction bias `moe.router_bias` (`mlp.gate.e_score_correction_bias`);
- the shared expert `share_expert.*` (`mlp.shared_experts.*`);
- config.json in the Hub's keys (`num_attention_groups`, `moe_num_experts`, `moe_top_k`, `moe_layers_enum`,
  `attention_other_setting`, per-layer `rope_theta` / `partial_rotary_factors`, MTP-padded per-layer lists),
  which transformers' config class reads too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

ARCHITECTURE = "Step3p5ForCausalLM"

# Hub-style config.json of the tiny test model: full / sliding layers (window 6 keys, shorter than the longest
# test prompt) with 4 and 6 query heads over 2 key/value heads, per-type rope (theta, half-rotary full layers,
# llama3 scaling on full layers only), two dense layers before the MoE layers, a shared expert, routed scaling,
# SwiGLU bounds small enough to bite on a dense MLP, a shared expert and the routed experts of one layer, and
# one MTP layer's entries padding the per-layer lists (the engine and the reference drop them).
CONFIG: dict[str, Any] = {
    "architectures": [ARCHITECTURE],
    "model_type": "step3p5",
    "vocab_size": 160,
    "hidden_size": 64,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
    "num_hidden_layers": 5,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 4,
    "num_attention_groups": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "moe_intermediate_size": 24,
    "share_expert_dim": 40,
    "moe_num_experts": 8,
    "moe_top_k": 3,
    "moe_layers_enum": "2,3,4,5",
    "moe_router_scaling_factor": 2.5,
    "moe_router_activation": "sigmoid",
    "use_moe_router_bias": True,
    "norm_expert_weight": True,
    "need_fp32_gate": True,
    "use_head_wise_attn_gate": True,
    "layer_types": [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
    ],
    "sliding_window": 6,
    "attention_other_setting": {
        "attention_type": "sliding_attention",
        "num_attention_heads": 6,
        "num_attention_groups": 2,
        "head_dim": 16,
    },
    "rope_theta": [500000.0, 10000.0, 10000.0, 500000.0, 10000.0, 500000.0],
    "partial_rotary_factors": [0.5, 1.0, 1.0, 0.5, 1.0, 0.5],
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 2.0,
        "original_max_position_embeddings": 16,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
    "yarn_only_types": ["full_attention"],
    "swiglu_limits": [0.0, 0.0, 0.0, 0.0, 0.1, 0.0],
    "swiglu_limits_shared": [0.0, 0.1, 0.0, 0.1, 0.0, 0.0],
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}

# transformers module name (in the reference wrapper) -> Hub name, for everything but the fused gate_up.
_RENAMES = (
    (re.compile(r"^(model\.layers\.\d+\.)mlp\.gate\.weight$"), r"\1moe.gate.weight"),
    (re.compile(r"^(model\.layers\.\d+\.)mlp\.gate\.e_score_correction_bias$"), r"\1moe.router_bias"),
    (re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.down_proj$"), r"\1moe.down_proj.weight"),
    (re.compile(r"^(model\.layers\.\d+\.)mlp\.shared_experts\."), r"\1share_expert."),
)
_GATE_UP = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.gate_up_proj$")


def _reference_class() -> type:
    from torch import nn
    from transformers import GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
    from transformers.models.step3p7.modeling_step3p7 import Step3p7PreTrainedModel, Step3p7TextModel

    class Step3p5ReferenceForCausalLM(Step3p7PreTrainedModel, GenerationMixin):  # type: ignore[misc]
        """Step3p7TextModel + LM head (the head of Step3p7ForConditionalGeneration, without the vision tower)."""

        config_class = Step3p7TextConfig

        def __init__(self, config: Step3p7TextConfig) -> None:
            super().__init__(config)
            self.model = Step3p7TextModel(config)
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(
            self,
            input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None,
            past_key_values: Any = None,
            inputs_embeds: torch.Tensor | None = None,
            use_cache: bool | None = None,
            logits_to_keep: int = 0,
            **kwargs: Any,
        ) -> CausalLMOutputWithPast:
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
            hidden = out.last_hidden_state[:, -logits_to_keep:] if logits_to_keep else out.last_hidden_state
            return CausalLMOutputWithPast(logits=self.lm_head(hidden), past_key_values=out.past_key_values)

    return Step3p5ReferenceForCausalLM


def reference_config(config: dict[str, Any]) -> Any:
    """transformers' Step3p7TextConfig from a Hub-style config.json dict."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return Step3p7TextConfig(**kwargs)


def to_hub_names(state: dict[str, torch.Tensor], moe_intermediate: int) -> dict[str, torch.Tensor]:
    """The reference's state dict in the Hub's tensor names and layout (see the module docstring)."""
    hub: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        fused = _GATE_UP.match(name)
        if fused:
            hub[fused[1] + "moe.gate_proj.weight"] = tensor[:, :moe_intermediate].contiguous()
            hub[fused[1] + "moe.up_proj.weight"] = tensor[:, moe_intermediate:].contiguous()
            continue
        for pattern, replacement in _RENAMES:
            name = pattern.sub(replacement, name)
        hub[name] = tensor.contiguous()
    return hub


def from_hub_names(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of to_hub_names: the Hub checkpoint's tensors in the reference's module names."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in hub.items():
        if name.endswith("moe.up_proj.weight"):
            continue
        if name.endswith("moe.gate_proj.weight"):
            prefix = name.removesuffix("moe.gate_proj.weight")
            state[prefix + "mlp.experts.gate_up_proj"] = torch.cat((tensor, hub[prefix + "moe.up_proj.weight"]), 1)
            continue
        name = re.sub(r"\.moe\.gate\.weight$", ".mlp.gate.weight", name)
        name = re.sub(r"\.moe\.router_bias$", ".mlp.gate.e_score_correction_bias", name)
        name = re.sub(r"\.moe\.down_proj\.weight$", ".mlp.experts.down_proj", name)
        name = name.replace(".share_expert.", ".mlp.shared_experts.")
        state[name] = tensor
    return state


def build_checkpoint(directory: Path, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """A random fp32 Step-3.5 checkpoint in the Hub layout (config.json + model.safetensors) in `directory`."""
    from safetensors.torch import save_file

    config = CONFIG | (overrides or {})
    torch.manual_seed(seed)
    model = _reference_class()(reference_config(config)).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.randn_like(param) * 0.1)  # offsets from one; zero would hide a missing 1 +
            else:
                param.normal_(0.0, 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.05)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    save_file(to_hub_names(state, config["moe_intermediate_size"]), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def reference_model(directory: Path) -> Any:
    """The reference of a checkpoint written by build_checkpoint, in eval mode, never stopping on EOS."""
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    model = _reference_class()(reference_config(config)).to(torch.float32)
    model.load_state_dict(from_hub_names(load_file(str(directory / "model.safetensors"))), strict=True)
    model.generation_config.eos_token_id = None
    return model.eval()
