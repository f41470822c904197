"""Paged KV cache accounting and continuous batching under join, leave and preemption."""

from __future__ import annotations

import pytest

from afd.sampling_params import SamplingParams
from attn_nodes.config import EngineConfig
from attn_nodes.kv_cache import KVCacheManager
from attn_nodes.request import Request
from attn_nodes.scheduler import Scheduler
from tests.checkpoints import reference_greedy, reference_model
from tests.engines import inprocess_engine


def test_block_accounting():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    assert kv.allocate("a", 9)  # 3 blocks
    assert kv.allocate("b", 4)  # 1 block
    assert kv.num_free_blocks == 6
    assert kv.allocate("a", 12)  # still 3 blocks
    assert kv.allocate("a", 13) and len(kv.block_ids("a")) == 4
    assert not kv.allocate("c", 24)  # 6 blocks > 5 free: nothing taken
    assert kv.num_free_blocks == 5 and "c" not in kv._tables
    assert not set(kv.block_ids("a")) & set(kv.block_ids("b"))
    kv.free("a")
    kv.free("b")
    kv.free("b")  # idempotent
    assert kv.num_free_blocks == 10 and kv.usage == 0.0


def _requests(n, prompt_len, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [Request(f"r{i}", list(range(1, prompt_len + 1)), params) for i in range(n)]


def _run(scheduler, steps):
    """Simulate steps: every scheduled chunk is computed; completing chunks append a token."""
    for _ in range(steps):
        for chunk in scheduler.schedule():
            completes = chunk.completes_sequence
            chunk.request.num_computed_tokens += chunk.num_tokens
            if completes:
                request = chunk.request
                request.output_token_ids.append(0)
                if len(request.output_token_ids) >= request.params.max_tokens:
                    scheduler.finish(request, "length")


def test_scheduler_admits_within_limits_and_returns_blocks():
    config = EngineConfig(block_size=4, num_kv_blocks=64, max_num_seqs=3, max_num_batched_tokens=32)
    kv = KVCacheManager(64, 4)
    scheduler = Scheduler(config, kv)
    for request in _requests(5, 10, 5):
        scheduler.add(request)
    first = scheduler.schedule()
    assert len(first) == 3 and sum(c.num_tokens for c in first) <= 32  # max_num_seqs and token budget
    assert [c.num_tokens for c in first] == [10, 10, 10]
    for chunk in first:
        chunk.request.num_computed_tokens += chunk.num_tokens
        chunk.request.output_token_ids.append(0)
    _run(scheduler, 40)
    assert scheduler.num_unfinished == 0
    assert kv.num_free_blocks == 64


def test_preemption_when_blocks_run_out():
    # 5 blocks of 4 tokens; two requests of 6 prompt tokens growing to 14 tokens cannot both fit.
    config = EngineConfig(block_size=4, num_kv_blocks=5, max_num_batched_tokens=64)
    kv = KVCacheManager(5, 4)
    scheduler = Scheduler(config, kv)
    a, b = _requests(2, 6, 8)
    scheduler.add(a)
    scheduler.add(b)
    preempted_seen = False
    for _ in range(60):
        _run(scheduler, 1)
        preempted_seen |= b.num_preemptions > 0
        used = sum(len(kv._tables.get(r.request_id, [])) for r in (a, b))
        assert used + kv.num_free_blocks == 5  # no block leaked or double-counted
        if scheduler.num_unfinished == 0:
            break
    assert preempted_seen, "the later request should have been preempted"
    assert a.num_preemptions == 0
    assert len(a.output_token_ids) == len(b.output_token_ids) == 8
    assert kv.num_free_blocks == 5


def test_chunked_prefill_splits_long_prompts():
    config = EngineConfig(block_size=4, num_kv_blocks=64, max_num_batched_tokens=8)
    scheduler = Scheduler(config, KVCacheManager(64, 4))
    (request,) = _requests(1, 20, 1)
    scheduler.add(request)
    sizes = []
    for _ in range(3):
        (chunk,) = scheduler.schedule()
        sizes.append((chunk.num_tokens, chunk.completes_sequence))
        request.num_computed_tokens += chunk.num_tokens
    assert sizes == [(8, False), (8, False), (4, True)]


@pytest.fixture(scope="module")
def qwen3(tiny_checkpoint):
    directory = tiny_checkpoint("qwen3_moe")
    return directory, reference_model(directory)


def test_preempted_requests_recompute_to_identical_tokens(qwen3):
    directory, reference = qwen3
    prompts = [list(range(3 + i, 12 + i)) for i in range(6)]
    expected = [reference_greedy(reference, p, 14) for p in prompts]
    # 12 blocks of 4 = 48 slots for 6 requests that grow to 23 tokens each: preemption is unavoidable.
    engine = inprocess_engine(directory, 2, EngineConfig(block_size=4, num_kv_blocks=12))
    params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    assert engine.generate(prompts, params) == expected
    assert engine.scheduler.num_preemptions_total > 0
    assert engine.kv.num_free_blocks == 12


def test_requests_join_and_leave_between_steps(qwen3):
    directory, reference = qwen3
    engine = inprocess_engine(directory, 3, EngineConfig(block_size=4, num_kv_blocks=64))
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = {"early": [5, 6, 7], "late": [40, 41, 42, 43, 44], "aborted": [9, 9, 9]}
    got = {name: [] for name in prompts}
    engine.add_request(prompts["early"], params, "early")
    engine.add_request(prompts["aborted"], params, "aborted")
    for step in range(40):
        if step == 3:
            engine.add_request(prompts["late"], params, "late")
            engine.abort("aborted")
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
        if not engine.has_unfinished():
            break
    assert got["early"] == reference_greedy(reference, prompts["early"], 8)
    assert got["late"] == reference_greedy(reference, prompts["late"], 8)
    assert len(got["aborted"]) == 3
    assert engine.kv.num_free_blocks == 64


def test_long_sequence_over_many_blocks_matches_contiguous_reference(qwen3):
    directory, reference = qwen3
    prompt = [(i * 7) % 150 + 1 for i in range(90)]
    engine = inprocess_engine(directory, 2, EngineConfig(block_size=4, num_kv_blocks=40))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    (tokens,) = engine.generate([prompt], params)
    assert tokens == reference_greedy(reference, prompt, 40)  # 130 tokens over 33 blocks
