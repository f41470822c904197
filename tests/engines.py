"""Builds an in-process AFD engine (1 attention half + N FFN shards) for tests."""

from __future__ import annotations

from pathlib import Path

from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from ffn_nodes.local_pool import local_ffn_pool


def uneven_weights(num_shards: int) -> list[float]:
    """Shard i gets weight i+1, so expert counts and MLP slices differ between shards."""
    return [float(i + 1) for i in range(num_shards)]


def inprocess_engine(model_dir: Path, num_shards: int, config: EngineConfig | None = None) -> AttentionEngine:
    config = config or EngineConfig()
    placement, transport = local_ffn_pool(model_dir, num_shards, config.dtype, uneven_weights(num_shards))
    return AttentionEngine.load(model_dir, transport, placement, config)


def uneven_placement(spec: ModelSpec, num_shards: int) -> ExpertPlacement:
    """The placement `inprocess_engine` uses, for tests that start FFN shards elsewhere."""
    nodes = [f"ffn-{i}" for i in range(num_shards)]
    return ExpertPlacement.balanced(spec.num_experts, nodes, uneven_weights(num_shards))


def greedy_reference_texts(model_dir: Path, prompts: list[str], new_tokens: int) -> dict[str, str]:
    """Prompt -> the greedy completion (`new_tokens`, ignore_eos) of the single-process engine with 2 FFN shards:
    what every cluster path must reproduce."""
    from afd.sampling_params import SamplingParams
    from afd.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(model_dir)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outputs = inprocess_engine(model_dir, 2).generate([tokenizer.encode(p) for p in prompts], params)
    return {p: tokenizer.decode(o) for p, o in zip(prompts, outputs, strict=True)}
