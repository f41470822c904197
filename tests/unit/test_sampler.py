"""Sampling: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import collections

import pytest
import torch

from afd.errors import RequestError
from afd.sampling_params import SamplingParams
from attn_nodes.sampler import Sampler

LOGITS = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0, 2.5]])


def _draw(params, n=400, seed=0):
    sampler = Sampler(seed)
    return collections.Counter(sampler.sample(LOGITS.expand(n, -1).clone(), [params] * n, [None] * n))


def test_greedy_takes_argmax():
    assert Sampler().sample(LOGITS, [SamplingParams(temperature=0.0)], [None]) == [1]


def test_top_k_keeps_only_the_k_best():
    assert set(_draw(SamplingParams(temperature=1.0, top_k=2))) == {1, 5}


def test_top_p_keeps_the_nucleus():
    probs = LOGITS.softmax(-1)[0]
    # token 1 alone has p < 0.5, tokens 1 + 5 exceed it: the nucleus for top_p=0.5 is {1, 5}.
    assert probs[1] < 0.5 < probs[1] + probs[5]
    assert set(_draw(SamplingParams(temperature=1.0, top_p=0.5))) == {1, 5}


def test_low_temperature_concentrates_and_high_spreads():
    cold = _draw(SamplingParams(temperature=0.05))
    hot = _draw(SamplingParams(temperature=5.0))
    assert cold[1] == 400
    assert len(hot) == 6


def test_sampling_follows_the_distribution():
    counts = _draw(SamplingParams(temperature=1.0), n=4000)
    probs = LOGITS.softmax(-1)[0]
    for token in range(6):
        assert abs(counts[token] / 4000 - probs[token].item()) < 0.03


def test_per_request_seed_is_reproducible_and_independent_of_batch():
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = Sampler(0).sample(LOGITS, [params], [torch.Generator().manual_seed(1234)])
    others = SamplingParams(temperature=1.0)
    batched = Sampler(99).sample(
        LOGITS.expand(3, -1).clone(), [others, params, others], [None, torch.Generator().manual_seed(1234), None]
    )
    assert batched[1] == alone[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -5}, "top_k must be"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_seeded_request_resumed_elsewhere_samples_what_it_would_have(tiny_checkpoint):
    """Migration re-prefills a request with its output so far on another engine; its seeded draws must go
    on as if it had never moved (the generator is derived from (seed, position), not carried)."""
    from attn_nodes.config import EngineConfig
    from tests.engines import inprocess_engine

    config = EngineConfig(block_size=4, num_kv_blocks=64, dtype="float32")
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=77, ignore_eos=True)
    prompt = [3, 14, 15, 92]
    whole = inprocess_engine(tiny_checkpoint("qwen3_moe"), 2, config).generate([prompt], params)[0]
    other = inprocess_engine(tiny_checkpoint("qwen3_moe"), 2, config)  # a second node, fresh sampler state
    request_id = other.add_request(prompt, params, "migrated", resume_output_token_ids=whole[:5])
    rest: list[int] = []
    while other.has_unfinished():
        rest += [t for out in other.step() if out.request_id == request_id for t in out.new_token_ids]
    assert whole[:5] + rest == whole
    unseeded = SamplingParams(max_tokens=12, temperature=1.0, seed=78, ignore_eos=True)
    assert inprocess_engine(tiny_checkpoint("qwen3_moe"), 2, config).generate([prompt], unseeded)[0] != whole


def test_position_seeds_differ_for_neighbouring_seeds_and_positions():
    from attn_nodes.request import position_seed

    seeds = {position_seed(seed, position) for seed in range(50) for position in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)
