"""Tiny random checkpoints of every supported architecture, written with transformers' save_pretrained.

Each config exercises the architecture's peculiarities: dense layers inside MoE models, shared experts,
group-limited routing, the V3 correction bias, MLA with and without q compression, rope scaling
(yarn, llama3, linear), tied embeddings, qkv bias and q/k norm. Built once per test session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from tests import step3p5_reference

COMMON: dict[str, Any] = {
    "vocab_size": 160,
    "hidden_size": 64,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
}

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {
            **COMMON,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "intermediate_size": 96,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            **COMMON,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
            "intermediate_size": 96,
        },
    ),
    "mixtral": (
        "MixtralConfig",
        {
            **COMMON,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 6,
            "num_experts_per_tok": 2,
            "intermediate_size": 48,
        },
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        {
            **COMMON,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_routed_experts": 8,
            "n_shared_experts": 2,
            "num_experts_per_tok": 2,
            "n_group": 4,
            "topk_group": 2,
            "topk_method": "group_limited_greedy",
            "routed_scaling_factor": 1.5,
            "first_k_dense_replace": 1,
            "moe_intermediate_size": 24,
            "intermediate_size": 96,
            "kv_lora_rank": 16,
            "q_lora_rank": None,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 12,
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        {
            **COMMON,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 3,
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "first_k_dense_replace": 1,
            "moe_intermediate_size": 24,
            "intermediate_size": 96,
            "kv_lora_rank": 16,
            "q_lora_rank": 24,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 12,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "beta_fast": 32,
                "beta_slow": 1,
            },
        },
    ),
    "llama": (
        "LlamaConfig",
        {
            **COMMON,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen3": (
        "Qwen3Config",
        {
            **COMMON,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 96,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
    # QwQ / Qwen2.5: q/k/v bias; the sliding window (off in the published models) on layer 1 only, shorter
    # than the longest test prompt, so the SDPA path of a windowed layer is checked too.
    "qwen2": (
        "Qwen2Config",
        {
            **COMMON,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "use_sliding_window": True,
            "sliding_window": 6,
            "max_window_layers": 1,
        },
    ),
    # GLM-4.5: half-rotary heads, q/k norm, q/k/v bias, one dense layer first, shared expert, sigmoid router with
    # correction bias and group-limited top-k (4 groups, 2 kept), routed scaling.
    "glm4_moe": (
        "Glm4MoeConfig",
        {
            **COMMON,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 96,
            "moe_intermediate_size": 24,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 3,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 2.5,
            "use_qk_norm": True,
            "attention_bias": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        },
    ),
    # Step-3.5: no transformers causal-LM class; tests.step3p5_reference builds it (Hub layout) and its reference.
    "step3p5": ("Step3p5ForCausalLM", {}),
    # gpt-oss: sliding (6 keys) / full / sliding layers, attention sinks, q/k/v/o bias, router bias, expert biases,
    # a SwiGLU clamp small enough to bite on these activations, yarn rope without truncation.
    "gpt_oss": (
        "GptOssConfig",
        {
            **COMMON,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 32,
            "num_local_experts": 6,
            "num_experts_per_tok": 2,
            "sliding_window": 6,
            "swiglu_limit": 0.1,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    # MiniMax-M1 / Text-01: lightning (linear) layers on both sides of a softmax layer and two in a row, a
    # 4-token prefill block (every test prompt but one spans several, the last one partial), residual factors
    # away from 1 on every sublayer kind, and a config eps unlike the 1e-6 of the lightning layers' own norm.
    "minimax": (
        "MiniMaxConfig",
        {
            **COMMON,
            "rms_norm_eps": 1e-5,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 48,
            "num_local_experts": 6,
            "num_experts_per_tok": 2,
            "layer_types": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
            "block_size": 4,
            "full_attn_alpha_factor": 1.5,
            "full_attn_beta_factor": 0.75,
            "linear_attn_alpha_factor": 1.25,
            "linear_attn_beta_factor": 1.5,
            "mlp_alpha_factor": 1.25,
            "mlp_beta_factor": 0.75,
        },
    ),
}

# Parameters the transformers initialisers leave at zero (or near it) whose effect the tests must see.
RANDOMISED_SUFFIXES = (
    "e_score_correction_bias",
    "self_attn.sinks",
    "router.bias",
    "experts.gate_up_proj_bias",
    "experts.down_proj_bias",
    "_proj.bias",  # q/k/v/o projection biases (nn.Linear biases start at zero)
)

ARCHITECTURES = tuple(CONFIGS)


def build_checkpoint(name: str, directory: Path, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Write a random fp32 checkpoint of architecture `name` into `directory` (created) and return it;
    `overrides` replace entries of its test config."""
    import transformers

    if name == "step3p5":
        return step3p5_reference.build_checkpoint(directory, seed, overrides)
    config_class, kwargs = CONFIGS[name]
    config = getattr(transformers, config_class)(**(kwargs | (overrides or {})))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for module_name, buffer in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.05)  # exercise the V3 bias (zeros by default)
        for module_name, param in model.named_parameters():
            if module_name.endswith(RANDOMISED_SUFFIXES):
                param.copy_(torch.randn_like(param) * (1.0 if module_name.endswith("sinks") else 0.05))
    model.save_pretrained(directory)
    return directory


def build_with_tokenizer(name: str, directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A tiny checkpoint of `name` sized to the vocabulary of the checkpoint in `tokenizer_dir` (the demo model),
    with its tokenizer files copied, so that a whole cluster (router tokenising text, OpenAI API) serves it."""
    import json
    import shutil

    vocab_size = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    build_checkpoint(name, directory, seed, overrides={"vocab_size": vocab_size})
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / file, directory / file)
    return directory


def reference_model(directory: Path) -> Any:
    """The transformers model of a checkpoint, in eval mode, never stopping on EOS."""
    import transformers

    if json.loads((directory / "config.json").read_text()).get("architectures") == [step3p5_reference.ARCHITECTURE]:
        return step3p5_reference.reference_model(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


def reference_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


# DeepSeek-V3 in the fp8 block format its releases publish. Every Linear dimension is chosen so that some
# blocks are partial (hidden 192 = 1.5 blocks of 128, moe_intermediate 160, q_lora_rank 136) and the dense
# MLP (288) and shared expert (160) slices of uneven FFN shards start and end inside a block.
FP8_DEEPSEEK_V3: dict[str, Any] = {
    **CONFIGS["deepseek_v3"][1],
    "hidden_size": 192,
    "moe_intermediate_size": 160,
    "intermediate_size": 288,
    "q_lora_rank": 136,
}


def build_fp8_checkpoint(directory: Path, seed: int = 0, block: tuple[int, int] = (128, 128)) -> tuple[Path, Path]:
    """A random bf16 DeepSeek-V3 quantised to fp8 with `block` scales: (`directory/fp8`, two shards and an index,
    as published) and the same weights dequantised to fp32 (`directory/dequantized`, for transformers).

    The reference dequantisation below multiplies each block by its scale with plain slicing, on purpose
    sharing no code with afd.quantized_weights.
    """
    import transformers
    from safetensors import safe_open
    from safetensors.torch import save_file

    from benchmarks.load_memory import write_fp8_checkpoint

    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**FP8_DEEPSEEK_V3)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for module_name, buffer in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.05)
    model.save_pretrained(directory / "bf16")
    fp8 = write_fp8_checkpoint(directory / "bf16", directory / "fp8", block, max_shard_bytes=1 << 20)

    dequantized: dict[str, torch.Tensor] = {}
    bm, bn = block
    for shard in sorted(fp8.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        for name, tensor in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            weight = tensor.float()
            if tensor.dtype == torch.float8_e4m3fn:
                scale = tensors[name + "_scale_inv"]
                for i in range(scale.shape[0]):
                    for j in range(scale.shape[1]):
                        weight[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] *= scale[i, j]
            dequantized[name] = weight
    reference = directory / "dequantized"
    reference.mkdir()
    save_file(dequantized, str(reference / "model.safetensors"), metadata={"format": "pt"})
    reference_config = json.loads((fp8 / "config.json").read_text())
    del reference_config["quantization_config"]
    reference_config["torch_dtype"] = "float32"
    (reference / "config.json").write_text(json.dumps(reference_config, indent=2))
    return fp8, reference


def build_skewed_checkpoint(
    directory: Path, tokenizer_dir: Path | None = None, seed: int = 0, hot_experts: tuple[int, ...] = (0, 1)
) -> Path:
    """The tiny qwen3_moe whose gate sends (nearly) every token to one of `hot_experts` (see
    benchmarks/skewed_checkpoint.py), in `directory/skewed`; sized to and with the tokenizer of the checkpoint
    in `tokenizer_dir` when given (a cluster test serving text)."""
    from benchmarks.skewed_checkpoint import write_skewed_checkpoint

    base = directory / "base"
    if tokenizer_dir is not None:
        build_with_tokenizer("qwen3_moe", base, tokenizer_dir, seed)
    else:
        build_checkpoint("qwen3_moe", base, seed)
    return write_skewed_checkpoint(base, directory / "skewed", hot_experts, seed=seed)
