"""vLLM's /tokenize, /detokenize and /version, and /v1/models/{id}, on the router's app (no network).

Before: all four answered 404. The shapes follow vLLM's serving_tokenization (count, max_model_len, tokens,
token_strs; prompt) and OpenAI's model retrieval (`client.models.retrieve`).
"""

from __future__ import annotations

import httpx
import openai
import pytest

import afd
from afd.builtin_model import builtin_model_dir
from afd.tokenizer import Tokenizer
from router.api_config import ApiConfig
from router.http_app import create_app
from router.metrics import RouterMetrics
from router.openai_service import OpenAIService
from tests.fake_generation_backend import FakeBackend

KEY = "sk-test"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(builtin_model_dir(tmp_path_factory.mktemp("cache")))


def _app(tokenizer, name="afd-demo", api_key=KEY):
    vocab = tokenizer.vocab_size if tokenizer else 1000
    config = ApiConfig(model_name=name, max_model_len=64, vocab_size=vocab, api_key=api_key)
    service = OpenAIService(config, tokenizer, FakeBackend(vocab), RouterMetrics(name), lambda: {"nodes": []})
    return service, create_app(service, ready=lambda: True)


@pytest.fixture
async def http(tokenizer):
    service, app = _app(tokenizer)
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r", headers=headers) as c:
        yield c
    service.close()


async def test_tokenize_a_prompt(http, tokenizer):
    text = "the file object is returned by the function"
    answer = (await http.post("/tokenize", json={"model": "afd-demo", "prompt": text})).json()
    ids = tokenizer.encode(text)
    assert answer == {"count": len(ids), "max_model_len": 64, "tokens": ids, "token_strs": None}
    assert len(ids) == 8


async def test_tokenize_with_token_strs_and_unknown_words(http, tokenizer):
    answer = (await http.post("/tokenize", json={"prompt": "the zebra file", "return_token_strs": True})).json()
    assert answer["token_strs"] == ["the", "<unk>", "file"]
    assert answer["tokens"] == tokenizer.encode("the zebra file")


async def test_tokenize_chat_messages_as_chat_completions_would(http, tokenizer):
    messages = [{"role": "user", "content": "the file object"}]
    answer = (await http.post("/tokenize", json={"messages": messages})).json()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "the file object"}])
    assert answer["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    assert answer["tokens"][-1] == tokenizer.token_id("<|assistant|>")
    no_prompt = (await http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False})).json()
    assert no_prompt["count"] == answer["count"] - 1


async def test_tokenize_does_not_refuse_a_prompt_longer_than_the_context(http):
    answer = (await http.post("/tokenize", json={"prompt": "the " * 100})).json()
    assert answer["count"] == 100 and answer["max_model_len"] == 64


async def test_detokenize_round_trips(http, tokenizer):
    ids = tokenizer.encode("return a new list of values")
    answer = (await http.post("/detokenize", json={"model": "afd-demo", "tokens": ids})).json()
    assert answer == {"prompt": "return a new list of values"}


async def test_detokenize_names_the_bad_token_id(http, tokenizer):
    vocab = tokenizer.vocab_size
    response = await http.post("/detokenize", json={"tokens": [5, vocab + 7, vocab]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tokens" and error["type"] == "BadRequestError"
    assert f"token id {vocab + 7} (tokens[1]) is outside the vocabulary of {vocab} tokens" in error["message"]
    negative = await http.post("/detokenize", json={"tokens": [-1]})
    assert negative.status_code == 400 and "tokens.0" in negative.json()["error"]["message"]


async def test_unknown_model_is_a_404_everywhere(http):
    for path, body in [("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})]:
        response = await http.post(path, json={"model": "gpt-4", **body})
        assert response.status_code == 404
        assert response.json()["error"] == {
            "message": "The model `gpt-4` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }


async def test_no_tokenizer_is_a_clear_400():
    service, app = _app(None, api_key=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as http:
        response = await http.post("/tokenize", json={"prompt": "x"})
    service.close()
    assert response.status_code == 400 and "no tokenizer" in response.json()["error"]["message"]


async def test_version(http):
    assert (await http.get("/version")).json() == {"version": afd.__version__}


async def test_tokenizer_endpoints_need_the_key_and_version_does_not(tokenizer):
    service, app = _app(tokenizer)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as http:
        assert (await http.post("/tokenize", json={"prompt": "x"})).status_code == 401
        assert (await http.post("/detokenize", json={"tokens": [1]})).status_code == 401
        assert (await http.get("/v1/models/afd-demo")).status_code == 401
        assert (await http.get("/version")).status_code == 200
    service.close()


async def test_models_retrieve_with_the_official_client(tokenizer):
    service, app = _app(tokenizer, name="Qwen/Qwen3-30B-A3B")
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r")
    client = openai.AsyncOpenAI(api_key=KEY, base_url="http://r/v1", http_client=http, max_retries=0)
    card = await client.models.retrieve("Qwen/Qwen3-30B-A3B")
    assert card.id == "Qwen/Qwen3-30B-A3B" and card.object == "model"
    assert card.model_extra["max_model_len"] == 64
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await client.models.retrieve("gpt-4")
    await http.aclose()
    service.close()


def test_the_new_endpoints_are_in_the_openapi_document(tokenizer):
    _, app = _app(tokenizer)
    paths = app.openapi()["paths"]
    assert {"/tokenize", "/detokenize", "/version", "/v1/models/{model_id}"} <= set(paths)
    assert set(paths["/tokenize"]["post"]["responses"]) == {"200", "400", "401", "404", "413"}
    assert set(paths["/v1/models/{model_id}"]["get"]["responses"]) == {"200", "401", "404"}
