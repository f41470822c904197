"""A few hundred hostile HTTP requests against the router's API over a real socket (issue 15's hostile test).

The router app runs in uvicorn on 127.0.0.1 (ephemeral port) in a thread of this process, with a fake
generation backend that is slow enough for disconnects to land mid-generation. One keep-alive client sends
every malformed request: broken JSON, non-UTF-8 bytes, out-of-range numbers, lone surrogates, wrong types,
oversized bodies (declared and streamed), missing keys. Other clients drop streams mid-way and give up on
non-streaming requests. Asserted: no 5xx, the OpenAI error shape on every 4xx, the keep-alive connection
never reset (every request of the main client goes out from the same local port), no request left running
(`vllm:num_requests_running` back to 0, the backend's own count too), and a normal completion answered
exactly as before the barrage.

`test_hostile_requests_against_a_real_cluster` (slow) runs the same barrage against `LocalCluster` (what
`afd up` runs), where running requests and KV usage come from the attention node's heartbeats.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from afd.builtin_model import builtin_model_dir
from afd.tokenizer import Tokenizer
from router.api_config import ApiConfig
from router.http_app import create_app
from router.metrics import RouterMetrics
from router.openai_service import OpenAIService
from tests.fake_generation_backend import FakeBackend

KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 64 * 1024
NORMAL = {"prompt": "the file object is used to read", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


@contextlib.contextmanager
def serve(app, timeout: float = 20.0) -> Iterator[str]:
    """uvicorn on 127.0.0.1:0 in a thread; yields the base URL; stopped on exit."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


# ---- the barrage ------------------------------------------------------------------------------------------
BAD_INTS = [2**31, 2**63, -(2**63) - 1, 10**40, -(10**40), -7]
BAD_VALUES = [None, True, "x", [], {}, 1.5, [1, "a"], {"a": [1]}]
FIELDS = ["prompt", "max_tokens", "top_k", "seed", "n", "stop", "stop_token_ids", "stream", "temperature", "top_p"]
SURROGATES = ["\\ud800", "a\\udfffb", "\\udbff\\udbff", "ok\\ud83d"]


def _hostile_bodies(rng: random.Random, model: str) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """(path, raw body, extra headers) of malformed or out-of-range requests; deterministic for `rng`."""
    json_headers = {"Content-Type": "application/json"}
    valid = json.dumps({"model": model, **NORMAL}).encode()
    for _ in range(40):  # broken JSON: truncations, garbage, non-UTF-8
        cut = rng.randrange(1, len(valid) - 1)
        yield "/v1/completions", valid[:cut], json_headers
    for raw in (b"", b"{", b"}", b"[]", b"null", b"1", b'"prompt"', b"\xff\xfe\x00", b'{"prompt": "\xff"}', b"NaN"):
        yield "/v1/completions", raw, json_headers
    yield "/v1/completions", valid, {"Content-Type": "text/plain"}
    for field in ("top_k", "seed", "max_tokens", "n", "stop_token_ids", "prompt"):  # out-of-range numbers
        for value in BAD_INTS:
            wrapped = [value] if field in ("stop_token_ids", "prompt") else value
            yield "/v1/completions", json.dumps({**NORMAL, field: wrapped}).encode(), json_headers
    for field in ("temperature", "top_p", "max_tokens"):
        for literal in ("NaN", "Infinity", "-Infinity", "1e400"):
            body = json.dumps({**NORMAL, field: 0}).replace(f'"{field}": 0', f'"{field}": {literal}')
            yield "/v1/completions", body.encode(), json_headers
    templates = [  # "@" is replaced by the surrogate's JSON escape
        ("/v1/completions", {"prompt": "@", "max_tokens": 2}),
        ("/v1/completions", {"prompt": ["ok", "@"], "max_tokens": 2}),
        ("/v1/completions", {"prompt": "ok", "stop": "@", "max_tokens": 2}),
        ("/v1/completions", {"model": "@", "prompt": "ok"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "@"}], "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "@"}]}]}),
    ]
    for text in SURROGATES:  # lone surrogates, written as JSON escapes
        for path, template in templates:
            yield path, json.dumps(template).replace("@", text).encode(), json_headers
    for field in FIELDS:  # wrong types
        for value in BAD_VALUES:
            yield "/v1/completions", json.dumps({**NORMAL, field: value}).encode(), json_headers
    for messages in (None, [], [{}], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 5}], "hi"):
        yield "/v1/chat/completions", json.dumps({"messages": messages}).encode(), json_headers
    for _ in range(100):  # random mixes of fields with random values
        body = {f: rng.choice(BAD_VALUES + BAD_INTS + ["the file"]) for f in rng.sample(FIELDS, 3)}
        yield rng.choice(["/v1/completions", "/v1/chat/completions"]), json.dumps(body).encode(), json_headers


def barrage(base_url: str, model: str, headers: dict[str, str], body_limit: int) -> dict[str, int]:
    """Send every hostile request on one keep-alive client; returns counts by status. Asserts as it goes."""
    rng = random.Random(15)
    statuses: dict[str, int] = {}
    ports: set[int] = set()
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:

        def check(response: httpx.Response) -> None:
            stream = response.extensions["network_stream"]
            ports.add(stream.get_extra_info("client_addr")[1])
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            assert response.status_code < 500, (response.request.content[:200], response.text)
            if response.status_code >= 400:
                assert response.headers["content-type"] == "application/json", response.text
                error = response.json()["error"]
                assert set(error) >= {"message", "type", "code"} and error["code"] == response.status_code

        for path, raw, extra in _hostile_bodies(rng, model):
            check(client.post(path, content=raw, headers=extra))
        # Oversized bodies: declared by Content-Length, and streamed without one.
        big = json.dumps({"prompt": "the " * body_limit, "max_tokens": 1}).encode()
        response = client.post("/v1/completions", content=big, headers={"Content-Type": "application/json"})
        assert response.status_code == 413
        check(response)
        response = client.post("/v1/completions", content=iter([big[i : i + 8192] for i in range(0, len(big), 8192)]))
        assert response.status_code == 413
        check(response)
        # A missing or wrong key, unknown paths and methods.
        for bad in ({"Authorization": "Bearer wrong"}, {"Authorization": ""}):
            check(client.post("/v1/completions", json=NORMAL, headers=bad))
        check(client.get("/v1/nothing"))
        check(client.delete("/v1/completions"))
        check(client.get("/afd/v1/cluster"))
        check(client.get("/health"))
    assert len(ports) == 1, f"the keep-alive connection was dropped: requests went out from ports {sorted(ports)}"
    return statuses


def drop_streams_and_disconnect(base_url: str, headers: dict[str, str], count: int = 6) -> None:
    """Streams read a little and then closed; non-streaming requests whose client gives up."""
    long = {**NORMAL, "max_tokens": 2000, "ignore_eos": True, "temperature": 1.0}
    for _ in range(count):
        with (
            httpx.Client(base_url=base_url, headers=headers, timeout=30) as client,
            client.stream("POST", "/v1/completions", json={**long, "stream": True}) as response,
        ):
            assert response.status_code == 200
            for _line in zip(range(3), response.iter_lines(), strict=False):
                pass
        with httpx.Client(base_url=base_url, headers=headers, timeout=0.3) as client, pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=long)


def metric(base_url: str, headers: dict[str, str], name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=10).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    return sum(values)


def wait_idle(base_url: str, headers: dict[str, str], names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(metric(base_url, headers, n) != 0 for n in names):
        now = {n: metric(base_url, headers, n) for n in names}
        assert time.monotonic() < deadline, f"requests left running after the barrage: {now}"
        time.sleep(0.1)


# ---- against the router app with a fake backend (fast) -----------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    tokenizer = Tokenizer.from_pretrained(builtin_model_dir(tmp_path_factory.mktemp("cache")))
    assert tokenizer is not None
    return tokenizer


def test_hostile_requests_against_the_router_app(tokenizer):
    metrics = RouterMetrics("afd-demo")
    backend = FakeBackend(tokenizer.vocab_size, metrics, delay_s=0.005)
    config = ApiConfig("afd-demo", 4096, tokenizer.vocab_size, api_key=KEY, max_request_body_bytes=BODY_LIMIT)
    service = OpenAIService(config, tokenizer, backend, metrics, lambda: {"nodes": []})
    try:
        with serve(create_app(service, ready=lambda: True)) as base_url:
            before = httpx.post(f"{base_url}/v1/completions", json=NORMAL, headers=AUTH, timeout=30).json()
            statuses = barrage(base_url, "afd-demo", AUTH, BODY_LIMIT)
            drop_streams_and_disconnect(base_url, AUTH)
            wait_idle(base_url, AUTH, ["vllm:num_requests_running"], timeout=10)
            assert backend.running == set()
            after = httpx.post(f"{base_url}/v1/completions", json=NORMAL, headers=AUTH, timeout=30).json()
    finally:
        service.close()
    assert sum(statuses.values()) >= 300 and set(statuses) <= {"200", "400", "401", "404", "405", "413"}, statuses
    assert after["choices"] == before["choices"] and after["usage"] == before["usage"]
    assert len(backend.aborted) >= 12  # every dropped stream and every abandoned non-streaming request


# ---- against a real local cluster (slow) ------------------------------------------------------------------
@pytest.mark.slow
def test_hostile_requests_against_a_real_cluster(tmp_path: Path):
    from orchestration.local_cluster import LocalCluster, LocalClusterConfig

    model = builtin_model_dir(tmp_path / "cache")
    key_file = tmp_path / "api-key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    cluster = LocalCluster(
        LocalClusterConfig(model=model, http_port=0, threads_per_node=1, start_timeout_s=120, api_key_file=key_file)
    )
    try:
        cluster.start()
        base_url = cluster.base_url
        served = httpx.get(f"{base_url}/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
        normal = {**NORMAL, "model": served}
        before = httpx.post(f"{base_url}/v1/completions", json=normal, headers=AUTH, timeout=60).json()
        barrage(base_url, served, AUTH, 2 * 1024 * 1024)
        drop_streams_and_disconnect(base_url, AUTH, count=2)
        wait_idle(base_url, AUTH, ["vllm:num_requests_running", "vllm:kv_cache_usage_perc"], timeout=30)
        after = httpx.post(f"{base_url}/v1/completions", json=normal, headers=AUTH, timeout=60).json()
        assert after["choices"] == before["choices"]
    finally:
        cluster.stop(timeout=20)
        cluster.remove_workdir()
