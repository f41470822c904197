"""Bad requests get clear errors and leave the engine serving."""

from __future__ import annotations

import pytest

from afd.errors import RequestError
from afd.sampling_params import SamplingParams
from attn_nodes.config import EngineConfig
from tests.engines import inprocess_engine


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return inprocess_engine(tiny_checkpoint("llama"), 2, EngineConfig(block_size=4, num_kv_blocks=16, max_model_len=64))


def test_empty_prompt(engine):
    with pytest.raises(RequestError, match="prompt must contain at least one token"):
        engine.add_request([], SamplingParams())


def test_prompt_longer_than_context(engine):
    with pytest.raises(RequestError, match="prompt has 64 tokens; the context holds 64"):
        engine.add_request([1] * 64, SamplingParams())


def test_tokens_outside_vocabulary(engine):
    with pytest.raises(RequestError, match=r"outside the vocabulary \[0, 160\)"):
        engine.add_request([1, 160], SamplingParams())


def test_request_larger_than_the_whole_cache(tiny_checkpoint):
    small = inprocess_engine(tiny_checkpoint("llama"), 1, EngineConfig(block_size=4, num_kv_blocks=8))
    small.add_request([1] * 22, SamplingParams(max_tokens=10))  # 32 tokens = 8 blocks: fits
    with pytest.raises(RequestError, match="request needs 9 KV blocks, the cache has 8"):
        small.add_request([1] * 23, SamplingParams(max_tokens=10))


def test_duplicate_request_id(engine):
    engine.add_request([1, 2], SamplingParams(max_tokens=1), "dup")
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request([1, 2], SamplingParams(max_tokens=1), "dup")
    engine.abort("dup")


def test_engine_keeps_serving_after_bad_input(engine):
    with pytest.raises(RequestError):
        engine.add_request([], SamplingParams())
    (tokens,) = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(tokens) == 3


def test_generation_stops_at_context_length(engine):
    (tokens,) = engine.generate([[1] * 60], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    assert len(tokens) == 4  # 60 + 4 = max_model_len 64
