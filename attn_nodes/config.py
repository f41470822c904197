"""Engine configuration of an attention node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from afd.errors import ConfigError

DType = Literal["auto", "float32", "bfloat16", "float16"]
WireDType = Literal["auto", "bf16", "fp8"]
WIRE_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp8")
"""Choices of EngineConfig.wire_dtype (and of the --wire-dtype flag)."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Batching, KV cache and numeric options of one attention node's engine."""

    max_num_seqs: int = 64
    """Most requests running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks plus decodes)."""
    block_size: int = 16
    """Tokens per KV cache block."""
    num_kv_blocks: int | None = None
    """KV cache blocks; derived from kv_cache_gib when None."""
    kv_cache_gib: float = 1.0
    """Memory for the KV cache when num_kv_blocks is not given."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); the model's max_position_embeddings when None."""
    dtype: DType = "auto"
    """Compute dtype; auto takes the checkpoint's."""
    microbatches: int = 1
    """Microbatches per step; with m >= 2 one computes attention while another is on the FFN nodes."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps to respect the token budget."""
    seed: int = 0
    """Seed of the sampler for requests without their own seed."""
    wire_dtype: WireDType = "auto"
    """Hidden states on the attention->FFN wire: "fp8" = float8 e4m3 with a float32 scale per token (about
    half the bytes of bf16), "bf16" = bfloat16, "auto" = the model dtype (fp8 changes greedy tokens of the
    test checkpoints, see tests/unit/test_fp8_wire.py, so it is never chosen silently). Partial sums come
    back in the FFN node's model dtype whatever this says; FFN nodes follow what each frame carries."""

    device: str = "cpu"
    """Compute device of the attention half: cpu, cuda, cuda:N or another torch device string (see afd.devices);
    weights, KV cache and each step's tensors live there, and sampled ids are read back once per step."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "microbatches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_gib <= 0:
            raise ConfigError(f"kv_cache_gib must be positive, got {self.kv_cache_gib}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be >= 2, got {self.max_model_len}")
