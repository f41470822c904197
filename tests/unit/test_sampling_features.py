"""Logprobs, penalties, min_tokens and logit_bias: the sampler's math, and the engine's prompt logprobs."""

from __future__ import annotations

import pytest
import torch

from afd.errors import RequestError
from afd.sampling_params import SamplingParams
from afd.wire.sampling_proto import logprobs_from_proto, logprobs_to_proto, sampling_from_proto, sampling_to_proto
from attn_nodes.config import EngineConfig
from attn_nodes.sampler import Sampler, SamplingRow
from router.text_stream import TextStream
from tests.engines import inprocess_engine

LOGITS = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0, 2.5], [1.0, -2.0, 0.5, 0.0, 3.0, -1.0]])
GREEDY = SamplingParams(temperature=0.0)


def test_plain_batch_takes_no_log_softmax_and_copies_nothing(monkeypatch):
    """The cost-free path: no request asks for logprobs or penalties."""

    def refuse(*args, **kwargs):
        raise AssertionError("called on the plain path")

    monkeypatch.setattr(torch.Tensor, "log_softmax", refuse)
    monkeypatch.setattr(torch.Tensor, "index_copy", refuse)
    result = Sampler().sample_rows(LOGITS, [SamplingRow(GREEDY), SamplingRow(SamplingParams(temperature=0.7))])
    assert result.token_ids[0] == 1 and result.logprobs == [None, None]


def test_logprobs_are_raw_log_softmax_whatever_the_temperature_and_penalties():
    params = SamplingParams(temperature=0.5, logprobs=3, frequency_penalty=2.0, logit_bias=((0, 5.0),))
    row = SamplingRow(params, torch.Generator().manual_seed(3), output_token_ids=[1, 1])
    result = Sampler().sample_rows(LOGITS[:1], [row])
    token, lp = result.token_ids[0], result.logprobs[0]
    raw = LOGITS[0].log_softmax(-1)
    assert lp is not None and lp.token_id == token
    assert lp.logprob == pytest.approx(raw[token].item())
    assert lp.rank == int((raw > raw[token]).sum()) + 1
    assert [t for t, _ in lp.top] == [1, 5, 2]
    assert [v for _, v in lp.top] == pytest.approx(raw[[1, 5, 2]].tolist())


def test_penalties_follow_openai_and_hf_and_leave_other_rows_alone():
    sampler = Sampler()
    plain = SamplingRow(GREEDY)
    # frequency: token 1 seen 3 times -> 3.0 - 3 * 0.5 = 1.5, below 2.5 (token 5) -> greedy picks 5
    frequency = SamplingRow(SamplingParams(temperature=0.0, frequency_penalty=0.5), output_token_ids=[1, 1, 1])
    assert sampler.sample_rows(LOGITS, [frequency, plain]).token_ids == [5, 4]
    # presence: once is enough: 3.0 - 0.6 = 2.4 < 2.5
    presence = SamplingRow(SamplingParams(temperature=0.0, presence_penalty=0.6), output_token_ids=[1])
    assert sampler.sample_rows(LOGITS, [plain, presence]).token_ids == [1, 4]
    # repetition (prompt tokens count too): 3.0 / 2 = 1.5 -> token 5; negative logits are multiplied
    repetition = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    processed = sampler._process(LOGITS[:1].clone(), [SamplingRow(repetition, None, [1, 4], [])])
    assert processed[0].tolist() == [0.0, 1.5, 2.0, 1.0, -2.0, 2.5]
    # a negative frequency penalty encourages repeats
    again = SamplingRow(SamplingParams(temperature=0.0, frequency_penalty=-2.0), output_token_ids=[3, 3])
    assert sampler.sample_rows(LOGITS[:1], [again]).token_ids == [3]
    assert torch.equal(LOGITS, torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0, 2.5], [1.0, -2.0, 0.5, 0.0, 3.0, -1.0]]))


def test_min_tokens_bans_eos_and_stop_tokens_until_reached_and_logit_bias_forces():
    sampler = Sampler(eos_token_ids=(1,))
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(5,), max_tokens=4)
    assert sampler.sample_rows(LOGITS[:1], [SamplingRow(params, output_token_ids=[7])]).token_ids == [2]
    assert sampler.sample_rows(LOGITS[:1], [SamplingRow(params, output_token_ids=[7, 7])]).token_ids == [1]
    ignoring = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler.sample_rows(LOGITS[:1], [SamplingRow(ignoring, output_token_ids=[])]).token_ids == [1]
    forced = SamplingParams(temperature=0.0, logit_bias=((4, 100.0),))
    assert sampler.sample_rows(LOGITS[:1], [SamplingRow(forced)]).token_ids == [4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logprobs": 21}, "logprobs must be an integer in 0..20"),
        ({"prompt_logprobs": -1}, "prompt_logprobs must be an integer in 0..20"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in"),
        ({"frequency_penalty": -3.0}, "frequency_penalty must be in"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"min_tokens": 17}, "min_tokens (17) must be at most max_tokens (16)"),
        ({"logit_bias": ((3, 150.0),)}, "logit_bias of token 3 must be in"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias token id -1 is negative"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**kwargs)


def test_params_and_logprobs_round_trip_the_wire():
    params = SamplingParams(
        max_tokens=9,
        seed=-5,
        logprobs=0,
        prompt_logprobs=2,
        presence_penalty=0.5,
        frequency_penalty=-1.5,
        repetition_penalty=1.25,
        min_tokens=3,
        logit_bias=((3, -100.0), (7, 2.5)),
    )
    assert sampling_from_proto(sampling_to_proto(params)) == params
    assert sampling_from_proto(sampling_to_proto(SamplingParams())) == SamplingParams()
    result = Sampler().sample_rows(LOGITS, [SamplingRow(SamplingParams(temperature=0.0, logprobs=2))] * 2)
    entries = [lp for lp in result.logprobs if lp is not None]
    back = logprobs_from_proto(logprobs_to_proto(entries))
    assert [(e.token_id, e.rank, [t for t, _ in e.top]) for e in back] == [(1, 1, [1, 5]), (4, 1, [4, 0])]
    assert [e.logprob for e in back] == pytest.approx([e.logprob for e in entries])


def _run(engine, prompt, params):
    rid = engine.add_request(prompt, params)
    outputs = []
    while engine.has_unfinished():
        outputs += [o for o in engine.step() if o.request_id == rid]
    return outputs


@pytest.mark.parametrize("chunk", [None, 3])
def test_engine_prompt_logprobs_score_each_prompt_token_by_the_logits_before_it(tiny_checkpoint, chunk):
    """The logprob the engine gives output token t after prompt P equals the prompt logprob of t in P + [t]
    (and chunked prefill scores the same)."""
    config = EngineConfig(max_num_batched_tokens=chunk) if chunk else EngineConfig()
    engine = inprocess_engine(tiny_checkpoint("qwen3_moe"), 2, config)
    prompt = [5, 17, 3, 99, 42, 8, 1]
    first = _run(engine, prompt, SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))
    tokens = [t for o in first for t in o.new_token_ids]
    logprobs = [lp for o in first for lp in o.logprobs or []]
    assert len(logprobs) == 3 and [lp.token_id for lp in logprobs] == tokens
    assert all(lp.rank == 1 and lp.top[0][0] == lp.token_id for lp in logprobs)  # greedy: the most likely
    scored = _run(engine, prompt + tokens[:2], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2))
    prompt_lps = scored[0].prompt_logprobs
    assert prompt_lps is not None and len(prompt_lps) == len(prompt) + 1
    assert [lp.token_id for lp in prompt_lps] == (prompt + tokens[:2])[1:]
    for mine, theirs in zip(prompt_lps[-2:], logprobs[:2], strict=True):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]


def test_engine_batch_mixing_penalised_and_plain_requests(tiny_checkpoint):
    engine = inprocess_engine(tiny_checkpoint("qwen3_moe"), 2)
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    penalised = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=2.0)
    prompt = [5, 17, 3]
    alone = engine.generate([prompt], plain)[0]
    together = engine.generate([prompt, prompt], [plain, penalised])
    assert together[0] == alone
    assert together[1] != alone
    # the penalty's documented direction: fewer repeated tokens
    assert len(together[1]) - len(set(together[1])) <= len(alone) - len(set(alone))
    forced = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, logit_bias=((77, 100.0),)))[0]
    assert forced == [77] * 4
    with pytest.raises(RequestError, match="logit_bias token ids"):
        engine.add_request(prompt, SamplingParams(logit_bias=((10**6, 1.0),)))


def test_include_stop_str_keeps_the_matched_stop_string():
    class Words:
        def stream_decoder(self):
            class D:
                def step(self, token_id):
                    return f"w{token_id} "

            return D()

    dropped = TextStream(Words(), ["w3"])  # type: ignore[arg-type]
    kept = TextStream(Words(), ["w3"], include_stop=True)  # type: ignore[arg-type]
    assert dropped.add([1, 2, 3, 4]) == "w1 w2 " and dropped.stopped
    assert kept.add([1, 2, 3, 4]) == "w1 w2 w3" and kept.stopped
