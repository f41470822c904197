"""Random GLM-4.5-, MiniMax- and Qwen3-MoE-shaped checkpoints for `afd bench engine --checkpoint DIR`.

The issue's performance rows compare the engine with transformers on a mid-size random checkpoint of each
family, shaped like benchmarks/engine.py's bench_config() (hidden 1024, 8 layers, 16 query / 4 key-value heads
of 64, 32 experts top-4 of intermediate 512, vocab 32000): transformers' `from_config` with the family's own
features at that size, saved in bf16 with `save_pretrained`:

- glm4_moe: a first dense layer (intermediate 2048), a shared expert, the sigmoid router with its correction
  bias (randomised: transformers starts it at zero, which would hide it) and routed scaling 2.5, half-rotary
  heads, q/k/v bias, as GLM-4.5 publishes;
- minimax: lightning (linear) attention on 7 of every 8 layers and softmax attention on the 8th, the
  interleave MiniMax-Text-01 / M1 publish (`attn_type_list` 0,0,0,0,0,0,0,1), lightning blocks of 256;
- qwen3_moe: bench_config()'s model, written by transformers instead of afd.builtin_model's initialiser.

`python -m benchmarks.midsize_checkpoints --family glm4_moe OUT` writes one (about 1 GB) and reuses it when OUT
already holds the same checkpoint, as ensure_checkpoint does; `--size tiny` writes the same family at test size
through the same code (what the unit test loads). Then `afd bench engine --checkpoint OUT`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from afd.errors import ConfigError

SEED = 7


@dataclass(frozen=True)
class Shape:
    """The dimensions every family shares at one size."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    """Dense MLPs (GLM's first layer)."""
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    vocab_size: int
    max_position_embeddings: int
    linear_block_size: int
    """MiniMax's lightning prefill block."""


SIZES: dict[str, Shape] = {
    # bench_config() of benchmarks/engine.py.
    "mid": Shape(1024, 8, 16, 4, 64, 2048, 512, 32, 4, 32000, 4096, 256),
    # Test size: every feature kept (8 layers so MiniMax keeps its 7 + 1 interleave), blocks shorter than prompts.
    "tiny": Shape(64, 8, 4, 2, 16, 96, 32, 8, 2, 160, 256, 4),
}

FAMILIES = ("glm4_moe", "minimax", "qwen3_moe")


def family_config(family: str, shape: Shape) -> tuple[str, dict[str, Any]]:
    """(transformers config class, its keyword arguments) of `family` at `shape`."""
    common: dict[str, Any] = {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "eos_token_id": None,
    }
    if family == "glm4_moe":
        return "Glm4MoeConfig", common | {
            "intermediate_size": shape.intermediate_size,
            "moe_intermediate_size": shape.moe_intermediate_size,
            "n_routed_experts": shape.num_experts,
            "n_shared_experts": 1,
            "num_experts_per_tok": shape.top_k,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "attention_bias": True,
            "use_qk_norm": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
        }
    if family == "minimax":
        layer_types = ["full_attention" if i % 8 == 7 else "linear_attention" for i in range(shape.num_hidden_layers)]
        if "full_attention" not in layer_types:
            raise ConfigError(f"a MiniMax shape needs at least 8 layers for its softmax layer, got {layer_types}")
        return "MiniMaxConfig", common | {
            "intermediate_size": shape.moe_intermediate_size,  # MiniMax's experts are intermediate_size wide
            "num_local_experts": shape.num_experts,
            "num_experts_per_tok": shape.top_k,
            "layer_types": layer_types,
            "block_size": shape.linear_block_size,
            "rope_theta": 10000000.0,
        }
    if family == "qwen3_moe":
        return "Qwen3MoeConfig", common | {
            "intermediate_size": shape.intermediate_size,
            "moe_intermediate_size": shape.moe_intermediate_size,
            "num_experts": shape.num_experts,
            "num_experts_per_tok": shape.top_k,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rope_theta": 1000000.0,
        }
    raise ConfigError(f"unknown family {family!r}; one of {list(FAMILIES)}")


def _fingerprint(family: str, size: str, seed: int) -> dict[str, Any]:
    """What the written checkpoint is made of; a directory holding another one is rewritten."""
    import transformers

    config_class, kwargs = family_config(family, SIZES[size])
    return {
        "family": family,
        "size": size,
        "shape": asdict(SIZES[size]),
        "config_class": config_class,
        "kwargs": kwargs,
        "seed": seed,
        "transformers": transformers.__version__,
    }


MARKER = "afd-midsize.json"
"""Written last into a complete checkpoint: its fingerprint."""


def write_checkpoint(family: str, out: Path, size: str = "mid", seed: int = SEED) -> Path:
    """Write the random `family` checkpoint of `size` into `out` in bf16 (or reuse it when `out` already holds the
    same one) and return `out`. Written into a staging folder beside `out` and renamed, so an interrupted run never
    leaves half a checkpoint that looks complete."""
    import transformers

    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}; one of {list(SIZES)}")
    fingerprint = _fingerprint(family, size, seed)
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == fingerprint:
        return out
    config_class, kwargs = family_config(family, SIZES[size])
    config = getattr(transformers, config_class)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros from the initialiser would hide the bias
                buffer.copy_(torch.randn_like(buffer) * 0.05)
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):  # nn.Linear biases start at zero too
                param.copy_(torch.randn_like(param) * 0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps(fingerprint, indent=2))
        staging.chmod(0o755)  # mkdtemp makes it private; the checkpoint is not
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m benchmarks.midsize_checkpoints --family glm4_moe|minimax|qwen3_moe [--size mid|tiny] OUT`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.midsize_checkpoints", description=__doc__)
    parser.add_argument("out", type=Path, help="directory to write (reused when it holds the same checkpoint)")
    parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--size", default="mid", choices=list(SIZES), help="mid (the benchmark's) or tiny")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    written = write_checkpoint(args.family, args.out, args.size, args.seed)
    print(written)
    return written


if __name__ == "__main__":
    main()
