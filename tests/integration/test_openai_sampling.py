"""Logprobs, n, penalties, min_tokens, logit_bias and token ids with the official `openai` client against a real
cluster (router + 1 attention + 2 FFN node processes, what `afd up` starts).

The logprob references are the log-softmax of the logits the single-process engine samples from (read off
its sampler), so the values the API returns are checked against the model, not against our own formatting.
"""

from __future__ import annotations

import math

import openai
import pytest
import torch

from afd.builtin_model import builtin_model_dir
from afd.model_spec import ModelSpec
from afd.sampling_params import SamplingParams
from afd.tokenizer import Tokenizer
from orchestration.local_cluster import LocalCluster, LocalClusterConfig
from tests.engines import inprocess_engine

pytestmark = pytest.mark.slow

PROMPT = "the file object is used to read"
NEW_TOKENS = 6
TOLERANCE = 2e-3
"""Cluster vs single process: the FFN partial sums add up in another order."""


def _start(model) -> LocalCluster:
    config = LocalClusterConfig(model=model, http_port=0, threads_per_node=1, start_timeout_s=120)
    cluster = LocalCluster(config)
    try:
        cluster.start()
    except BaseException:
        cluster.stop(timeout=20)
        raise
    return cluster


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return builtin_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def client(model):
    cluster = _start(model)
    try:
        yield openai.OpenAI(base_url=cluster.api_url, api_key="unused", max_retries=0, timeout=120)
    finally:
        cluster.stop(timeout=20)
        cluster.remove_workdir()


def _reference(model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of the single-process engine and the log-softmax of the logits each was sampled from."""
    engine = inprocess_engine(model, 2)
    rows: list[torch.Tensor] = []
    sample = engine.sampler.sample_rows

    def spy(logits, sampling_rows):
        rows.append(logits[0].float().log_softmax(-1))
        return sample(logits, sampling_rows)

    engine.sampler.sample_rows = spy  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate([prompt_ids], params)[0], rows


def _model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_completion_logprobs_are_the_models_stream_and_not(client, model):
    tokenizer = Tokenizer.from_pretrained(model)
    tokens, rows = _reference(model, tokenizer.encode(PROMPT), NEW_TOKENS)
    args = {
        "model": _model_name(client),
        "prompt": PROMPT,
        "max_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "logprobs": 3,
        "extra_body": {"ignore_eos": True, "return_token_ids": True},
    }
    result = client.completions.create(**args).choices[0]
    assert result.model_dump()["token_ids"] == tokens
    lp = result.logprobs
    assert lp.tokens == [tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
    for i, token in enumerate(tokens):
        assert lp.token_logprobs[i] == pytest.approx(rows[i][token].item(), abs=TOLERANCE)
        values, ids = rows[i].topk(3)
        expected = {
            tokenizer.decode([t], skip_special_tokens=False): v
            for t, v in zip(ids.tolist(), values.tolist(), strict=True)
        }
        assert lp.top_logprobs[i] == pytest.approx(expected, abs=TOLERANCE)
    streamed = [c.choices[0] for c in client.completions.create(stream=True, **args) if c.choices]
    assert [v for c in streamed for v in c.logprobs.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)
    assert "".join(c.text for c in streamed) == result.text


def test_echo_scores_the_prompt_like_the_output(client, model):
    """Echo with logprobs: the prompt's first token gets None, and the logprob of prompt token t after P is the
    logprob the model gave t when it generated it after P."""
    tokenizer = Tokenizer.from_pretrained(model)
    ids = tokenizer.encode(PROMPT)
    name = _model_name(client)
    first = client.completions.create(model=name, prompt=ids, max_tokens=1, temperature=0.0, logprobs=0)
    token = first.choices[0].model_dump()["logprobs"]
    generated = tokenizer.encode(first.choices[0].text, add_special_tokens=False)
    echoed = client.completions.create(
        model=name, prompt=ids + generated, max_tokens=1, temperature=0.0, logprobs=1, echo=True
    ).choices[0]
    lp = echoed.logprobs
    assert echoed.text.startswith(tokenizer.decode(ids + generated))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) + len(generated) + 1
    assert lp.token_logprobs[len(ids)] == pytest.approx(token["token_logprobs"][0], abs=TOLERANCE)


def test_chat_logprobs_are_the_models_stream_and_not(client, model):
    tokenizer = Tokenizer.from_pretrained(model)
    args = {
        "model": _model_name(client),
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 2,
        "extra_body": {"ignore_eos": True, "return_token_ids": True},
    }
    result = client.chat.completions.create(**args)
    tokens, rows = _reference(model, result.model_dump()["prompt_token_ids"], NEW_TOKENS)
    assert result.choices[0].model_dump()["token_ids"] == tokens
    content = result.choices[0].logprobs.content
    for i, token in enumerate(tokens):
        assert content[i].logprob == pytest.approx(rows[i][token].item(), abs=TOLERANCE)
        values, ids = rows[i].topk(2)
        assert [t.token for t in content[i].top_logprobs] == [
            tokenizer.decode([t], skip_special_tokens=False) for t in ids.tolist()
        ]
        assert [t.logprob for t in content[i].top_logprobs] == pytest.approx(values.tolist(), abs=TOLERANCE)
    streamed = [
        e
        for c in client.chat.completions.create(stream=True, **args)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-6)


def test_n_with_a_seed_gives_different_reproducible_choices(client):
    args = {"model": _model_name(client), "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "n": 2, "seed": 11}
    first = client.completions.create(**args)
    again = client.completions.create(**args)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(first.choices, key=lambda c: c.index)] == [0, 1]
    assert texts[0] != texts[1]
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts


def test_penalties_and_logit_bias_change_greedy_output_as_documented(client, model):
    tokenizer = Tokenizer.from_pretrained(model)
    name = _model_name(client)

    def tokens(**extra) -> list[int]:
        body = {"ignore_eos": True, "return_token_ids": True, **extra.pop("extra_body", {})}
        result = client.completions.create(
            model=name, prompt=PROMPT, max_tokens=24, temperature=0.0, extra_body=body, **extra
        )
        return result.choices[0].model_dump()["token_ids"]

    def repeats(ids: list[int]) -> int:
        return len(ids) - len(set(ids))

    plain = tokens()
    assert repeats(plain) > 0, "the test needs a greedy output that repeats itself"
    assert repeats(tokens(frequency_penalty=2.0)) < repeats(plain)
    assert repeats(tokens(presence_penalty=2.0)) < repeats(plain)
    assert repeats(tokens(extra_body={"repetition_penalty": 3.0})) < repeats(plain)
    # encouraging repeats does the opposite
    assert repeats(tokens(frequency_penalty=-2.0)) > repeats(plain)
    forced = tokenizer.encode("file", add_special_tokens=False)[0]
    assert tokens(logit_bias={str(forced): 100}) == [forced] * 24


def test_min_tokens_holds_off_eos(client, model):
    eos = ModelSpec.from_pretrained(model).eos_token_ids[0]
    name = _model_name(client)

    def run(**extra):
        body = {"return_token_ids": True, **extra}
        return client.completions.create(
            model=name, prompt=PROMPT, max_tokens=10, temperature=0.0, logit_bias={str(eos): 100}, extra_body=body
        ).choices[0]

    eager = run()
    assert eager.finish_reason == "stop" and eager.model_dump()["token_ids"] == [eos]
    held = run(min_tokens=4)
    ids = held.model_dump()["token_ids"]
    assert held.finish_reason == "stop" and len(ids) == 5 and ids[-1] == eos and eos not in ids[:4]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {"3": 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1000000": 1}}, "logit_bias"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ],
)
def test_bad_values_are_400s_that_name_the_field(client, kwargs, field):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=_model_name(client), prompt=PROMPT, max_tokens=2, **kwargs)
    assert field in str(info.value)


def test_chat_top_logprobs_21_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model=_model_name(client), messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21
        )


def test_tokenizer_less_checkpoint_returns_the_engines_token_ids(tiny_checkpoint):
    model = tiny_checkpoint("qwen3_moe")
    assert Tokenizer.from_pretrained(model) is None
    prompt = [5, 17, 3, 99, 42]
    expected, rows = _reference(model, prompt, NEW_TOKENS)
    cluster = _start(model)
    try:
        client = openai.OpenAI(base_url=cluster.api_url, api_key="unused", max_retries=0, timeout=120)
        result = client.completions.create(
            model=_model_name(client),
            prompt=prompt,
            max_tokens=NEW_TOKENS,
            temperature=0.0,
            logprobs=1,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        choice = result.choices[0].model_dump()
        assert choice["text"] == ""
        assert choice["prompt_token_ids"] == prompt
        assert choice["token_ids"] == expected
        assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in expected]
        got = choice["logprobs"]["token_logprobs"]
        assert all(
            math.isclose(g, rows[i][t].item(), abs_tol=TOLERANCE)
            for i, (g, t) in enumerate(zip(got, expected, strict=True))
        )
    finally:
        cluster.stop(timeout=20)
        cluster.remove_workdir()
