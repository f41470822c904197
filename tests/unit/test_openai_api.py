"""The router's OpenAI API through the official `openai` client against a fake backend (no network)."""

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
    config = ApiConfig(model_name="afd-demo", max_model_len=64, vocab_size=tokenizer.vocab_size, api_key="sk-test")
    service = OpenAIService(config, tokenizer, backend, RouterMetrics("afd-demo"), lambda: {"nodes": []})
    app = create_app(service, ready=lambda: True)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")
    client = openai.AsyncOpenAI(api_key="sk-test", base_url="http://router/v1", http_client=http, max_retries=0)
    return client, backend, tokenizer, http


def _expected(tokenizer, prompt: str, n: int) -> str:
    last = tokenizer.encode(prompt)[-1]
    return tokenizer.decode([(last + i) % tokenizer.vocab_size for i in range(1, n + 1)])


async def test_completion_non_streaming(api):
    client, _, tokenizer, _ = api
    result = await client.completions.create(model="afd-demo", prompt="the file object", max_tokens=5)
    assert result.choices[0].text == _expected(tokenizer, "the file object", 5)
    assert result.choices[0].finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (3, 5, 8)


async def test_completion_streaming_with_usage(api):
    client, _, tokenizer, _ = api
    stream = await client.completions.create(
        model="afd-demo", prompt="the file object", max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert text == _expected(tokenizer, "the file object", 5)
    assert finish == "length" and usage.completion_tokens == 5


async def test_chat_streaming_and_not(api):
    client, backend, _, _ = api
    result = await client.chat.completions.create(
        model="afd-demo", messages=[{"role": "user", "content": "hello there"}], max_tokens=4
    )
    assert result.choices[0].message.role == "assistant" and result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 4
    prompt = backend.seen[-1].prompt_token_ids
    stream = await client.chat.completions.create(
        model="afd-demo", messages=[{"role": "user", "content": "hello there"}], max_tokens=4, stream=True
    )
    deltas = [chunk.choices[0].delta async for chunk in stream]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == result.choices[0].message.content
    assert backend.seen[-1].prompt_token_ids == prompt


async def test_token_id_prompts_batch_and_stop_token(api):
    client, _, _, _ = api
    result = await client.completions.create(
        model="afd-demo", prompt=[[5, 6], [100]], max_tokens=6, extra_body={"stop_token_ids": [9]}
    )
    by_index = {c.index: c for c in result.choices}
    assert by_index[0].finish_reason == "stop"  # 7, 8, 9 -> stop
    assert by_index[1].finish_reason == "length"
    assert result.usage.prompt_tokens == 3 and result.usage.completion_tokens == 3 + 6


async def test_stop_string_is_cut_and_request_aborted(api):
    client, backend, tokenizer, _ = api
    full = _expected(tokenizer, "the file object", 8)
    stop_word = full.split()[3]
    result = await client.completions.create(model="afd-demo", prompt="the file object", max_tokens=8, stop=[stop_word])
    assert result.choices[0].text == full[: full.index(stop_word)]
    assert result.choices[0].finish_reason == "stop"
    assert backend.aborted


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"model": "gpt-4"}, openai.NotFoundError, "The model `gpt-4` does not exist."),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
        ({"max_tokens": 100}, openai.BadRequestError, "maximum context length is 64 tokens"),
        ({"prompt": ""}, openai.BadRequestError, "the prompt is empty"),
        ({"prompt": [99999]}, openai.BadRequestError, "outside the vocabulary"),
        ({"temperature": -1}, openai.BadRequestError, "temperature"),
        ({"n": 0}, openai.BadRequestError, "n: Input should be greater than or equal to 1"),
        ({"logprobs": 21}, openai.BadRequestError, "logprobs: Input should be less than or equal to 20"),
        ({"presence_penalty": 2.5}, openai.BadRequestError, "presence_penalty"),
        ({"logit_bias": {"5": 101}}, openai.BadRequestError, "logit_bias.5: Input should be less than or equal"),
        ({"logit_bias": {"the": 1}}, openai.BadRequestError, "logit_bias.the: String should match pattern"),
        ({"logit_bias": {"99999": 1}}, openai.BadRequestError, "logit_bias: token ids ['99999'] are outside"),
        ({"extra_body": {"repetition_penalty": 0}}, openai.BadRequestError, "repetition_penalty"),
    ],
)
async def test_bad_requests(api, kwargs, error, message):
    client, _, _, _ = api
    args = {"model": "afd-demo", "prompt": "the file", "max_tokens": 4} | kwargs
    with pytest.raises(error) as info:
        await client.completions.create(**args)
    assert message in str(info.value)


async def test_malformed_json_and_missing_key(api):
    _, _, _, http = api
    response = await http.post(
        "/v1/completions",
        content=b"{not json",
        headers={"Authorization": "Bearer sk-test", "Content-Type": "application/json"},
    )
    assert response.status_code == 400 and "JSON" in response.text
    response = await http.post("/v1/completions", json={"model": "afd-demo", "prompt": "x"})
    assert response.status_code == 401 and "API key" in response.text
    assert (await http.get("/health")).status_code == 200  # health stays open


async def test_queue_full_is_429(api):
    client, backend, _, _ = api
    backend.overloaded = True
    with pytest.raises(openai.RateLimitError, match="queue is full"):
        await client.completions.create(model="afd-demo", prompt="the file", max_tokens=2)
    with pytest.raises(openai.RateLimitError):
        await client.completions.create(model="afd-demo", prompt="the file", max_tokens=2, stream=True)


async def test_models_and_metrics(api):
    client, _, _, http = api
    models = await client.models.list()
    assert [m.id for m in models.data] == ["afd-demo"]
    await client.completions.create(model="afd-demo", prompt="the file", max_tokens=3)
    text = (await http.get("/metrics")).text
    assert 'vllm:generation_tokens_total{model_name="afd-demo"} 3.0' in text
    assert "vllm:time_to_first_token_seconds_bucket" in text and "vllm:e2e_request_latency_seconds_count" in text
