"""transformers references of the checkpoints the engine serves, for the tests and `afd bench engine`.

`reference_model(directory, dtype)` gives the transformers model of any supported checkpoint, or raises
ReferenceUnavailable with a one-line reason (the benchmark then skips its transformers column):

- most families load through `AutoModelForCausalLM`;
- StepFun Step-3.5 has no causal-LM class in transformers (5.x): `model_type` "step3p5" maps to
  `Step3p7TextConfig` / `Step3p7TextModel`, the text model inside the Step-3.7 vision-language model, and the
  published checkpoints (`architectures: ["Step3p5ForCausalLM"]`) load through their own remote code. The
  reference here is that text model plus an LM head, as `Step3p7ForConditionalGeneration` adds one, with
  transformers' `generate`, reading the checkpoint in the Hub layout (below);
- whatever transformers fails to load (an fp8 block-scaled checkpoint without accelerate installed, say) becomes
  ReferenceUnavailable with the first line of its error.

The Hub layout of Step-3.5 differs from transformers' module names (transformers' Step-3.7 weight conversion
maps the one to the other):
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

STEP3P5_ARCHITECTURE = "Step3p5ForCausalLM"


class ReferenceUnavailable(RuntimeError):
    """transformers cannot run this checkpoint as a like-for-like reference; the message says why, in one line."""


# transformers module name (in the reference wrapper) -> Hub name, for everything but the fused gate_up.
_RENAMES = (
    (re.compile(r"^(model\.layers\.\d+\.)mlp\.gate\.weight$"), r"\1moe.gate.weight"),
    (re.compile(r"^(model\.layers\.\d+\.)mlp\.gate\.e_score_correction_bias$"), r"\1moe.router_bias"),
    (re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.down_proj$"), r"\1moe.down_proj.weight"),
    (re.compile(r"^(model\.layers\.\d+\.)mlp\.shared_experts\."), r"\1share_expert."),
)
_GATE_UP = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.gate_up_proj$")


def step3p5_reference_class() -> type:
    """Step3p7TextModel + LM head as a transformers causal LM (GenerationMixin)."""
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


def step3p5_reference_config(config: dict[str, Any]) -> Any:
    """transformers' Step3p7TextConfig from a Hub-style config.json dict."""
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig

    kwargs = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return Step3p7TextConfig(**kwargs)


def step3p5_to_hub_names(state: dict[str, torch.Tensor], moe_intermediate: int) -> dict[str, torch.Tensor]:
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


def step3p5_from_hub_names(hub: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of step3p5_to_hub_names: the Hub checkpoint's tensors in the reference's module names."""
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


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files (one file, or the shards of an index)."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ReferenceUnavailable(f"no *.safetensors file in {directory}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def step3p5_reference_model(directory: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The Step-3.5 reference of a Hub-layout checkpoint in `dtype`, in eval mode, never stopping on EOS."""
    config = json.loads((directory / "config.json").read_text())
    model = step3p5_reference_class()(step3p5_reference_config(config)).to(dtype)
    model.load_state_dict(step3p5_from_hub_names(_read_tensors(directory)), strict=True)
    model.generation_config.eos_token_id = None
    return model.eval()


def reference_model(directory: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers model of any supported checkpoint in `dtype`, in eval mode, never stopping on EOS;
    ReferenceUnavailable (one-line reason) where transformers cannot load it."""
    import transformers

    config = json.loads((directory / "config.json").read_text())
    if config.get("architectures") == [STEP3P5_ARCHITECTURE]:
        return step3p5_reference_model(directory, dtype)
    quantization = config.get("quantization_config") or {}
    what = f"{quantization.get('quant_method', 'quantised')} checkpoint" if quantization else "checkpoint"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ReferenceUnavailable(
            f"transformers {transformers.__version__} cannot load this {what} ({type(exc).__name__}: {reason})"
        ) from exc
    model.generation_config.eos_token_id = None
    return model.eval()
