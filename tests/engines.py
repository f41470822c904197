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
