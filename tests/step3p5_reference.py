"""StepFun Step-3.5 for the tests: the tiny checkpoint, written in the Hub layout, and its reference.

The reference (transformers' Step3p7TextModel plus an LM head, since transformers registers no causal LM for
step3p5) and the Hub <-> transformers tensor names live in benchmarks/references.py, which `afd bench engine`
uses too; this module keeps the test model's config and writes its checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.references import STEP3P5_ARCHITECTURE as ARCHITECTURE
from benchmarks.references import step3p5_reference_class as _reference_class
from benchmarks.references import step3p5_reference_config as reference_config
from benchmarks.references import step3p5_reference_model
from benchmarks.references import step3p5_to_hub_names as to_hub_names

__all__ = ["ARCHITECTURE", "CONFIG", "build_checkpoint", "reference_config", "reference_model"]

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
    return step3p5_reference_model(directory, torch.float32)
