"""The built-in demo checkpoint: a small Qwen3-MoE with a word-level tokenizer, made on first use.

It lets `afd generate` / `afd up` run on any machine with no download. The weights are random but
deterministic (a seeded generator), written in the HF layout (config.json + model.safetensors +
tokenizer.json), so transformers can load it too. It is cached under the user cache directory, keyed by
a fingerprint of everything that determines its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers

SEED = 20260101
SPECIAL_TOKENS = ["<|endoftext|>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _words() -> list[str]:
    text = resources.files("afd").joinpath("builtin_words.txt").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def _config(vocab_size: int) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "moe_intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": None,
        "eos_token_id": 0,
        "torch_dtype": "float32",
    }


def random_qwen3_moe_weights(config: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded random weights for a Qwen3-MoE `config` dict (HF config.json keys), in Hub tensor names."""
    g = torch.Generator().manual_seed(seed)
    hidden, heads, kv_heads, head_dim = (
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    experts, inter, vocab = config["num_experts"], config["moe_intermediate_size"], config["vocab_size"]

    def normal(*shape: int, std: float = 0.05) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def ones(size: int) -> torch.Tensor:
        return torch.ones(size, dtype=dtype)

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden, std=0.5), "model.norm.weight": ones(hidden)}
    tensors["lm_head.weight"] = normal(vocab, hidden, std=0.1)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors |= {
            p + "input_layernorm.weight": ones(hidden),
            p + "post_attention_layernorm.weight": ones(hidden),
            p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim),
            p + "self_attn.q_norm.weight": ones(head_dim),
            p + "self_attn.k_norm.weight": ones(head_dim),
            p + "mlp.gate.weight": normal(experts, hidden, std=0.2),
        }
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            tensors |= {
                q + "gate_proj.weight": normal(inter, hidden),
                q + "up_proj.weight": normal(inter, hidden),
                q + "down_proj.weight": normal(hidden, inter),
            }
    return tensors


def _tokenizer(words: list[str]) -> HfTokenizer:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = HfTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


def _tokenizer_config() -> dict:
    """tokenizer_config.json. `tokenizer_class` makes transformers' AutoTokenizer load tokenizer.json as it is;
    without it AutoTokenizer picks the tokenizer of config.json's model type (Qwen2's byte-level BPE), which
    maps the demo's words to the wrong ids. The special tokens are the ones afd.tokenizer reads, so both
    agree on eos (id 0, config.json's eos_token_id), unk and the absent bos."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _config(0)["max_position_embeddings"],
    }


def fingerprint() -> str:
    """Names the cache directory: a change to anything written (weights, config, tokenizer files) is a new one,
    so a checkpoint cached by an older release is never served with new code."""
    words = _words()
    config = _config(len(SPECIAL_TOKENS) + len(words))
    blob = json.dumps([SEED, config, _tokenizer_config(), words, torch.__version__.split("+")[0]])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "afd"


def builtin_model_dir(root: Path | None = None) -> Path:
    """Directory of the built-in checkpoint, writing it first if it is not cached yet."""
    target = (root or cache_root()) / f"builtin-qwen3-moe-{fingerprint()}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    words = _words()
    config = _config(len(SPECIAL_TOKENS) + len(words))
    # Write into a temp dir and rename, so a concurrent or interrupted first use never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=".builtin-", dir=target.parent))
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_qwen3_moe_weights(config, SEED), str(staging / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer(words).save(str(staging / "tokenizer.json"))
    (staging / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    try:
        staging.rename(target)
    except OSError:  # another process won the race; its copy is identical
        for child in staging.iterdir():
            child.unlink()
        staging.rmdir()
    return target


DEMO_PROMPTS = [
    "the file object is used to read",
    "return a new list of values",
    "if the default encoding is not given",
    "this module provides a class",
]
