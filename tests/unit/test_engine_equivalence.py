"""The AFD engine (attention half + N FFN shards) reproduces transformers token for token."""

from __future__ import annotations

import pytest
import torch

from afd.sampling_params import SamplingParams
from attn_nodes.attention_metadata import SequenceChunk
from attn_nodes.config import EngineConfig
from tests.checkpoints import ARCHITECTURES, reference_greedy, reference_model
from tests.engines import inprocess_engine

PROMPTS = [
    [7],
    [3, 14, 15, 92, 65],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
]
NEW_TOKENS = 10
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
# fp32 end to end; the only differences are summation order (partials per shard, attention kernels).
LOGITS_ATOL = 2e-4


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    cache = {}

    def get(arch):
        if arch not in cache:
            directory = tiny_checkpoint(arch)
            model = reference_model(directory)
            tokens = [reference_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
            with torch.no_grad():
                logits = [model(torch.tensor([p])).logits[0, -1] for p in PROMPTS]
            cache[arch] = (directory, tokens, logits)
        return cache[arch]

    return get


@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_tokens_match_transformers(arch, num_shards, references):
    directory, expected, _ = references(arch)
    engine = inprocess_engine(directory, num_shards, EngineConfig(block_size=4, num_kv_blocks=64))
    assert engine.generate(PROMPTS, GREEDY) == expected
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "every block returns to the pool"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_first_step_logits_match_transformers(arch, references):
    directory, _, expected_logits = references(arch)
    engine = inprocess_engine(directory, 2, EngineConfig(block_size=4, num_kv_blocks=64))
    for prompt, expected in zip(PROMPTS, expected_logits, strict=True):
        request_id = engine.add_request(prompt, GREEDY)
        request = engine.requests[request_id]
        assert engine.kv.allocate(request_id, len(prompt))
        chunk = SequenceChunk(engine.kv.block_ids(request_id), 0, len(prompt), engine.kv.state_slot(request_id))
        (logits,) = engine.runner.forward([engine.runner.prepare([chunk], [prompt], [True])])
        torch.testing.assert_close(logits[0], expected, atol=LOGITS_ATOL, rtol=0)
        engine.abort(request.request_id)


@pytest.mark.parametrize("microbatches", [2, 3])
def test_microbatches_do_not_change_tokens(microbatches, references):
    directory, expected, _ = references("qwen3_moe")
    config = EngineConfig(block_size=4, num_kv_blocks=64, microbatches=microbatches)
    assert inprocess_engine(directory, 2, config).generate(PROMPTS, GREEDY) == expected


def test_chunked_prefill_matches(references):
    directory, expected, _ = references("deepseek_v3")
    config = EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=6)
    assert inprocess_engine(directory, 2, config).generate(PROMPTS, GREEDY) == expected


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen2", "step3p5"])
def test_sliding_windows_across_prefill_chunks_and_microbatches(arch, references):
    """A 6-key window whose keys come from earlier prefill chunks (5-token chunks of a 19-token prompt), and
    microbatches that each build their own window mask."""
    directory, expected, _ = references(arch)
    chunked = EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=5)
    assert inprocess_engine(directory, 3, chunked).generate(PROMPTS, GREEDY) == expected
    split = EngineConfig(block_size=4, num_kv_blocks=64, microbatches=2)
    assert inprocess_engine(directory, 2, split).generate(PROMPTS, GREEDY) == expected
