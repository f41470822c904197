"""Narrow wires between processes: FFN nodes (their real frame decoder and batcher) take float8 hidden states with
per-token scales, or bfloat16 ones from a float32 model, and answer in their model dtype; tokens equal the in-process
engine on the same wire."""

from __future__ import annotations

from pathlib import Path

import pytest

from afd.model_spec import ModelSpec
from afd.sampling_params import SamplingParams
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from ffn_nodes.local_pool import local_ffn_pool
from tests.cluster_helpers import engine_over_grpc_ffn_processes
from tests.engines import inprocess_engine, uneven_placement, uneven_weights

PROMPTS = [[7], [3, 14, 15, 92, 65], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(
    ("arch", "dtype", "wire"),
    [("qwen2_moe", "bfloat16", "fp8"), ("deepseek_v3", "float32", "fp8"), ("deepseek_v3", "float32", "bf16")],
)
def test_narrow_wire_over_grpc_matches_inprocess(arch: str, dtype: str, wire: str, tiny_checkpoint, tmp_path: Path):
    directory = tiny_checkpoint(arch)
    spec = ModelSpec.from_pretrained(directory)
    placement = uneven_placement(spec, 2)
    config = EngineConfig(block_size=4, num_kv_blocks=64, dtype=dtype, microbatches=2, wire_dtype=wire)  # type: ignore[arg-type]
    expected = inprocess_engine(directory, 2, config).generate(PROMPTS, GREEDY)

    with engine_over_grpc_ffn_processes(directory, placement, config, tmp_path) as engine:
        assert engine.generate(PROMPTS, GREEDY) == expected
        stats = engine.runner.transfers
        # fp8: one byte per element and a float32 scale per token; bf16: two bytes per element
        hidden_bytes = spec.hidden_size + 4 if wire == "fp8" else 2 * spec.hidden_size
        model_bytes = 2 if dtype == "bfloat16" else 4
        sent, tokens = sum(stats.bytes_sent_totals), sum(stats.token_totals)
        assert hidden_bytes * tokens <= sent < model_bytes * spec.hidden_size * tokens * len(placement.nodes)


def test_a_float32_attention_node_with_a_bfloat16_ffn_pool(tiny_checkpoint, tmp_path: Path):
    """Pools in different dtypes (a bf16 FFN pool, e.g. on accelerators, behind a float32 attention node): the
    FFN nodes take the float32 hidden states, compute in bf16 and answer in bf16, exactly as the in-process
    engine does with bf16 shards. Before, every frame was refused as a float32 frame and the attention node
    took the live FFN node for a failed one."""
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    placement = uneven_placement(spec, 2)
    config = EngineConfig(block_size=4, num_kv_blocks=64, dtype="float32", microbatches=2)
    reference_placement, reference_transport = local_ffn_pool(directory, 2, "bfloat16", uneven_weights(2))
    expected = AttentionEngine.load(directory, reference_transport, reference_placement, config).generate(
        PROMPTS, GREEDY
    )

    with engine_over_grpc_ffn_processes(directory, placement, config, tmp_path, ffn_dtype="bfloat16") as engine:
        assert engine.generate(PROMPTS, GREEDY) == expected
        stats = engine.runner.transfers
        float32_hidden = 4 * spec.hidden_size  # the attention node's own dtype goes on the wire
        assert sum(stats.bytes_sent_totals) >= float32_hidden * sum(stats.token_totals)
