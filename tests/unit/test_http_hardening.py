"""The router's HTTP layer against hostile input (issue 15, items 2-5, 8 and 12), in process, no network.

Each test names the defect it keeps fixed: request-body limit, tokenisation off the event loop, protobuf
ranges, lone surrogates, a catch-all in the OpenAI error shape, aborting a non-streaming request whose
client went away, the API key on /afd/v1/cluster (and optionally /metrics), a /health body that matches
the spec.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from afd.builtin_model import builtin_model_dir
from afd.tokenizer import Tokenizer
from router.api_config import ApiConfig
from router.http_app import create_app
from router.metrics import RouterMetrics
from router.openai_service import OpenAIService
from tests.fake_generation_backend import FakeBackend

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


class SpyTokenizer(Tokenizer):
    """Sets `started` when an encode begins (to time /health while a big prompt is being tokenised)."""

    def __init__(self, inner: Tokenizer) -> None:
        super().__init__(inner.tokenizer, inner.config)
        self.started = threading.Event()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > 10_000:
            self.started.set()
        return super().encode(text, add_special_tokens)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_pretrained(builtin_model_dir(tmp_path_factory.mktemp("cache")))


def make_api(tokenizer, **config):
    metrics = RouterMetrics("afd-demo")
    backend = FakeBackend(tokenizer.vocab_size, metrics)
    settings = {"model_name": "afd-demo", "max_model_len": 64, "vocab_size": tokenizer.vocab_size} | config
    service = OpenAIService(ApiConfig(**settings), tokenizer, backend, metrics, lambda: {"nodes": []})
    app = create_app(service, ready=lambda: True)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router")
    return app, http, backend, service


def assert_openai_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


# ---- (2) body limit -----------------------------------------------------------------------------------
async def test_body_over_the_limit_is_413_by_content_length_and_by_counting(tokenizer):
    _, http, backend, _ = make_api(tokenizer, max_request_body_bytes=1000)
    body = json.dumps({"prompt": "the " * 1000, "max_tokens": 1}).encode()
    response = await http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 413, "larger than this server's limit of 1000 bytes")

    async def chunks():  # no Content-Length: the limit must hold while the body streams in
        for i in range(0, len(body), 100):
            yield body[i : i + 100]

    response = await http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, "--max-request-body-bytes")
    assert backend.seen == []
    ok = await http.post("/v1/completions", json={"prompt": "the file", "max_tokens": 2})
    assert ok.status_code == 200


async def test_tokenising_a_big_prompt_does_not_block_health(tokenizer):
    spy = SpyTokenizer(tokenizer)
    _, http, _, _ = make_api(spy, max_model_len=64, max_request_body_bytes=16 * 1024 * 1024)
    prompt = "the " * (2 * 1024 * 1024)  # 8 MB: over a second of tokenising on this machine
    start = time.monotonic()
    big = asyncio.ensure_future(http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}))
    assert await asyncio.to_thread(spy.started.wait, 30)
    health_start = time.monotonic()
    health = await http.get("/health")
    health_s = time.monotonic() - health_start
    response = await big
    total_s = time.monotonic() - start
    assert_openai_error(response, 400, "maximum context length is 64 tokens")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    # Before the fix /health waited for the whole tokenisation (the loop was blocked by it).
    assert health_s < 0.25 * total_s, (health_s, total_s)


# ---- (3) protobuf ranges, (4) surrogates, (12) strict types ------------------------------------------
@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"top_k": 2**31}, "top_k"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop_token_ids": [2**31]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"prompt": [2**31]}, "prompt"),
        ({"prompt": [[False]]}, "prompt"),
        ({"prompt": [1.0]}, "prompt"),
        ({"prompt": ""}, "the prompt is empty"),
        ({"prompt": "\ud800"}, "not valid Unicode"),
        ({"prompt": ["ok", "a\udfffb"]}, "not valid Unicode"),
        ({"stop": "\ud800"}, "not valid Unicode"),
        ({"n": 1.0}, "n"),
        ({"n": True}, "n"),
        ({"stream": 1}, "stream"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
async def test_out_of_range_and_wrongly_typed_fields_are_400(tokenizer, extra, fragment):
    _, http, backend, _ = make_api(tokenizer)
    body = {"prompt": "the file", "max_tokens": 2} | extra
    response = await http.post(
        "/v1/completions", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    assert_openai_error(response, 400, fragment)
    assert backend.seen == []


async def test_surrogates_in_chat_and_model_name_are_400(tokenizer):
    _, http, _, _ = make_api(tokenizer)
    for content in ("\ud800", [{"type": "text", "text": "x\udbff"}]):
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
        response = await http.post(
            "/v1/chat/completions", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        assert_openai_error(response, 400, "not valid Unicode")
    body = {"model": "\ud800", "prompt": "x", "max_tokens": 2}
    response = await http.post(
        "/v1/completions", content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    assert_openai_error(response, 400, "model", "not valid Unicode")
    response = await http.post("/v1/completions", json={"model": "modèle-ü", "prompt": "x", "max_tokens": 2})
    assert response.json()["error"]["message"] == "The model `modèle-ü` does not exist."


async def test_large_seed_and_negative_seed_are_accepted(tokenizer):
    _, http, backend, _ = make_api(tokenizer)
    for seed in (2**63 - 1, -5):
        response = await http.post("/v1/completions", json={"prompt": "the file", "max_tokens": 2, "seed": seed})
        assert response.status_code == 200 and backend.seen[-1].params.seed == seed


# ---- (4) catch-all --------------------------------------------------------------------------------------
async def test_a_bug_is_a_500_in_the_openai_shape_not_plain_text(tokenizer, caplog):
    _, http, backend, _ = make_api(tokenizer)
    backend.fail_with = RuntimeError("boom")
    response = await http.post("/v1/completions", json={"prompt": "the file", "max_tokens": 2})
    assert_openai_error(response, 500, "internal server error")
    assert "boom" in caplog.text  # the traceback is in the log, not in the answer
    stream = await http.post("/v1/completions", json={"prompt": "the file", "max_tokens": 2, "stream": True})
    assert_openai_error(stream, 500)


async def test_unknown_path_and_method_are_openai_errors(tokenizer):
    _, http, _, _ = make_api(tokenizer)
    assert_openai_error(await http.get("/v1/nothing"), 404)
    response = await http.get("/v1/completions")
    assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"


# ---- (5) non-streaming disconnect -----------------------------------------------------------------------
async def test_non_streaming_request_is_aborted_when_the_client_disconnects(tokenizer):
    app, _, backend, service = make_api(tokenizer, max_model_len=100_000)
    backend.delay_s = 0.01  # 2 tokens per 10 ms: 50,000 tokens would take minutes
    body = json.dumps({"prompt": "the file", "max_tokens": 50_000, "ignore_eos": True}).encode()
    disconnect = asyncio.Event()
    body_sent = False

    async def receive():
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }
    call = asyncio.ensure_future(app(scope, receive, send))
    async with asyncio.timeout(10):
        while not backend.running:
            await asyncio.sleep(0.01)
    disconnect.set()  # the client goes away (curl -m 2)
    t0 = time.monotonic()
    await asyncio.wait_for(call, 5)
    await backend.wait_idle(5)
    assert time.monotonic() - t0 < 2
    assert len(backend.aborted) == 1 and backend.running == set()
    assert 'vllm:num_requests_running{model_name="afd-demo"} 0.0' in service.metrics.render().decode()
    assert not any(m["type"] == "http.response.start" and m["status"] >= 500 for m in sent)


# ---- (8) the API key on /afd/v1/cluster, optionally on /metrics -----------------------------------------
@pytest.mark.parametrize("protect_metrics", [False, True])
async def test_api_key_guards_cluster_view_and_optionally_metrics(tokenizer, protect_metrics):
    _, http, _, _ = make_api(tokenizer, api_key=KEY, protect_metrics=protect_metrics)
    assert_openai_error(await http.get("/afd/v1/cluster"), 401, "API key")
    assert (await http.get("/afd/v1/cluster", headers=AUTH)).json() == {"nodes": []}
    metrics = await http.get("/metrics")
    if protect_metrics:
        assert_openai_error(metrics, 401)
        assert (await http.get("/metrics", headers=AUTH)).status_code == 200
    else:
        assert metrics.status_code == 200 and "vllm:num_requests_running" in metrics.text
    assert (await http.get("/health")).status_code == 200  # probes never need the key
    assert (await http.get("/openapi.json")).status_code == 200


# ---- (12) the spec tells the truth ---------------------------------------------------------------------
async def test_openapi_documents_errors_and_health_body(tokenizer):
    _, http, _, service = make_api(tokenizer, api_key=KEY)
    spec = (await http.get("/openapi.json")).json()
    completions = spec["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "500", "503"} <= set(completions)
    assert "422" not in completions and "HTTPValidationError" not in spec["components"]["schemas"]
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    health = spec["paths"]["/health"]["get"]["responses"]
    assert health["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/HealthStatus")
    prompt = spec["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert prompt["anyOf"][0] == {"minLength": 1, "type": "string"}
    not_ready = create_app(service, ready=lambda: False)
    response = await httpx.AsyncClient(transport=httpx.ASGITransport(app=not_ready), base_url="http://r").get("/health")
    assert response.status_code == 503 and response.json() == {"status": "unavailable"}
