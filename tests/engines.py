"""Builds an in-process AFD engine (1 attention half + N FFN shards) for tests."""

from __future__ import annotations

from pathlib import Path

from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.transport import InProcessTransport
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from ffn_nodes.shard import FfnShard


def uneven_placement(spec: ModelSpec, num_shards: int) -> ExpertPlacement:
    """Shard i gets weight i+1, so expert counts and MLP slices differ between shards."""
    weights = [float(i + 1) for i in range(num_shards)]
    return ExpertPlacement.balanced(spec.num_experts, [f"ffn-{i}" for i in range(num_shards)], weights)


def inprocess_engine(model_dir: Path, num_shards: int, config: EngineConfig | None = None) -> AttentionEngine:
    spec = ModelSpec.from_pretrained(model_dir)
    placement = uneven_placement(spec, num_shards)
    shards = {node: FfnShard.load(model_dir, placement, node) for node in placement.nodes}
    return AttentionEngine.load(model_dir, InProcessTransport(shards), placement, config)
