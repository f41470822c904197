"""The OpenAI shapes of logprobs, n, echo, token ids and stop tokens, through the official client (fake backend).

The fake backend's logprobs are made up (token t: -t / vocab); what is checked here is where each value goes
in OpenAI's and vLLM's response shapes. tests/integration/test_openai_sampling.py checks the values on a cluster.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from afd.builtin_model import builtin_model_dir
from afd.tokenizer import Tokenizer
from router.api_config import ApiConfig
from router.http_app import create_app
from router.metrics import RouterMetrics
from router.openai_service import OpenAIService
from tests.fake_generation_backend import FakeBackend


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(builtin_model_dir(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def api(tokenizer):
    backend = FakeBackend(tokenizer.vocab_size)
    config = ApiConfig(model_name="afd-demo", max_model_len=64, vocab_size=tokenizer.vocab_size)
    service = OpenAIService(config, tokenizer, backend, RouterMetrics("afd-demo"), lambda: {"nodes": []})
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service, lambda: True)), base_url="http://r")
    client = openai.AsyncOpenAI(api_key="x", base_url="http://r/v1", http_client=http, max_retries=0)
    return client, backend, tokenizer


async def test_completion_logprobs_with_echo_stream_and_not(api):
    client, backend, tokenizer = api
    prompt = "the file object"
    ids = tokenizer.encode(prompt)
    args = {"model": "afd-demo", "prompt": prompt, "max_tokens": 3, "logprobs": 2, "echo": True}
    result = await client.completions.create(**args)
    choice = result.choices[0]
    out = [(ids[-1] + i) % tokenizer.vocab_size for i in (1, 2, 3)]
    assert backend.seen[-1].params.prompt_logprobs == 2 and backend.seen[-1].params.logprobs == 2
    assert choice.text == prompt + tokenizer.decode(out)
    lp = choice.logprobs
    names = [tokenizer.decode([t], skip_special_tokens=False) for t in ids + out]
    assert lp.tokens == names
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first prompt token
    assert lp.token_logprobs[1:] == pytest.approx([-t / tokenizer.vocab_size for t in (ids + out)[1:]])
    # the sampled token, then the 2 most likely (here the sampled one is the most likely: 2 entries)
    top = backend.logprob(out[-1], 2).top
    expected = {tokenizer.decode([t], skip_special_tokens=False): v for t, v in top}
    assert lp.top_logprobs[-1] == pytest.approx(expected)
    offsets = [0]
    for name in names[:-1]:
        offsets.append(offsets[-1] + len(name))
    assert lp.text_offset == offsets
    stream = await client.completions.create(stream=True, **args)
    chunks = [c.choices[0] async for c in stream if c.choices]
    assert "".join(c.text for c in chunks) == choice.text
    assert [t for c in chunks for t in c.logprobs.tokens] == lp.tokens
    assert [o for c in chunks for o in c.logprobs.text_offset] == lp.text_offset
    assert [v for c in chunks for v in c.logprobs.token_logprobs] == lp.token_logprobs


async def test_chat_logprobs_and_top_logprobs(api):
    client, backend, tokenizer = api
    args = {"model": "afd-demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
    result = await client.chat.completions.create(logprobs=True, top_logprobs=2, **args)
    content = result.choices[0].logprobs.content
    assert len(content) == 3
    tokens = [t for r in [backend.seen[-1]] for t in range(r.prompt_token_ids[-1] + 1, r.prompt_token_ids[-1] + 4)]
    assert [c.token for c in content] == [tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
    assert [c.logprob for c in content] == pytest.approx([-t / tokenizer.vocab_size for t in tokens])
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2 for c in content)
    stream = await client.chat.completions.create(logprobs=True, top_logprobs=2, stream=True, **args)
    streamed = [e for c in stream_chunks(await _collect(stream)) for e in (c.logprobs.content if c.logprobs else [])]
    assert [(e.token, e.logprob) for e in streamed] == [(c.token, c.logprob) for c in content]
    plain = await client.chat.completions.create(**args)
    assert plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="`logprobs` must be set to true"):
        await client.chat.completions.create(top_logprobs=2, **args)
    with pytest.raises(openai.BadRequestError, match="top_logprobs: Input should be less than or equal to 20"):
        await client.chat.completions.create(logprobs=True, top_logprobs=21, **args)


async def _collect(stream):
    return [c async for c in stream]


def stream_chunks(chunks):
    return [c.choices[0] for c in chunks if c.choices]


async def test_n_choices_get_their_own_index_and_derived_seeds(api):
    client, backend, _ = api
    result = await client.completions.create(model="afd-demo", prompt=[[5], [9]], max_tokens=2, n=2, seed=7)
    assert sorted(c.index for c in result.choices) == [0, 1, 2, 3]
    seeds = [r.params.seed for r in backend.seen[-4:]]
    assert sorted(seeds) == [7, 7, 8, 8]
    assert result.usage.prompt_tokens == 2  # once per prompt, not per choice (vLLM)
    chat = await client.chat.completions.create(
        model="afd-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=3, stream=True
    )
    indices = {c.choices[0].index for c in await _collect(chat) if c.choices}
    assert indices == {0, 1, 2}


async def test_return_token_ids_and_tokens_as_token_ids(api):
    client, _, _ = api
    result = await client.completions.create(
        model="afd-demo",
        prompt=[5, 6],
        max_tokens=3,
        logprobs=0,
        extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
    )
    choice = result.choices[0].model_dump()
    assert choice["prompt_token_ids"] == [5, 6] and choice["token_ids"] == [7, 8, 9]
    assert choice["logprobs"]["tokens"] == ["token_id:7", "token_id:8", "token_id:9"]
    assert list(choice["logprobs"]["top_logprobs"][0]) == ["token_id:7"]
    chat = await client.chat.completions.create(
        model="afd-demo",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        extra_body={"return_token_ids": True},
    )
    body = chat.model_dump()
    assert body["prompt_token_ids"] and len(body["choices"][0]["token_ids"]) == 2


async def test_stop_token_text_is_left_out_unless_asked(api):
    """vLLM drops the stop token's text (its id stays); include_stop_str_in_output keeps it."""
    client, _, tokenizer = api
    ids = tokenizer.encode("the file")
    stop = (ids[-1] + 2) % tokenizer.vocab_size
    args = {"model": "afd-demo", "prompt": "the file", "max_tokens": 6}
    cut = await client.completions.create(**args, extra_body={"stop_token_ids": [stop], "return_token_ids": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == tokenizer.decode([(ids[-1] + 1) % tokenizer.vocab_size])
    assert cut.choices[0].model_dump()["token_ids"][-1] == stop
    kept = await client.completions.create(
        **args, extra_body={"stop_token_ids": [stop], "include_stop_str_in_output": True}
    )
    assert kept.choices[0].text == tokenizer.decode([(ids[-1] + 1) % tokenizer.vocab_size, stop])
