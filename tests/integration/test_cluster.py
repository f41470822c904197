"""The local cluster end to end: OpenAI clients, live scaling under load, and nodes killed with SIGKILL.

Every process is started by `LocalCluster` (what `afd up` runs) on 127.0.0.1 with ephemeral ports and
stopped by its handle at the end of the test. Greedy outputs are compared with the in-process engine.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time

import httpx
import openai
import pytest

from afd.builtin_model import builtin_model_dir
from benchmarks.serve_cluster import exchange_totals
from orchestration.local_cluster import LocalCluster, LocalClusterConfig
from tests.engines import greedy_reference_texts

pytestmark = pytest.mark.slow

PROMPTS = [
    "the file object is used to read",
    "return a new list of values",
    "if the default encoding is not given",
    "this module provides a class",
    "the current directory and the path",
    "an integer value or a string",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return builtin_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def expected(model):
    """Greedy completions of PROMPTS from the single-process engine."""
    return greedy_reference_texts(model, PROMPTS, NEW_TOKENS)


@pytest.fixture
def cluster(model, request):
    clusters = []

    def start(**kwargs):
        config = LocalClusterConfig(model=model, http_port=0, threads_per_node=1, start_timeout_s=120, **kwargs)
        cluster = LocalCluster(config)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield start
    report = getattr(request.node, "report_call", None)
    for cluster in clusters:
        cluster.stop(timeout=20)
        if report is not None and report.failed:
            print(f"node logs of the failed test kept in {cluster.workdir}")  # shown with the failure
        else:
            cluster.remove_workdir()


def _client(cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.api_url, api_key="unused", max_retries=0, timeout=120)


def _complete(client: openai.OpenAI, prompt: str, stream: bool = False) -> str:
    kwargs = {
        "model": "ignored",
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "extra_body": {"ignore_eos": True},
    }
    model = client.models.list().data[0].id
    kwargs["model"] = model
    if not stream:
        return client.completions.create(**kwargs).choices[0].text
    return "".join(chunk.choices[0].text for chunk in client.completions.create(stream=True, **kwargs) if chunk.choices)


class Load:
    """Greedy requests in a loop on a few threads, recording every result and failure."""

    def __init__(self, cluster: LocalCluster, threads: int = 3, stream: bool = True) -> None:
        self.client = _client(cluster)
        self.results: list[tuple[str, str]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._futures = [self._pool.submit(self._run, i, stream) for i in range(threads)]

    def _run(self, offset: int, stream: bool) -> None:
        i = offset
        while not self._stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            try:
                self.results.append((prompt, _complete(self.client, prompt, stream)))
            except Exception as exc:  # recorded and asserted on by the test
                self.failures.append(f"{type(exc).__name__}: {exc}")
            i += 1

    def stop(self, timeout: float = 120) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=timeout)
        self._pool.shutdown()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_openai_clients_get_the_reference_tokens(cluster, expected):
    c = cluster()
    client = _client(c)
    for prompt in PROMPTS[:3]:
        assert _complete(client, prompt) == expected[prompt]
        assert _complete(client, prompt, stream=True) == expected[prompt]
    chat = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": "hello there"}], max_tokens=5
    )
    assert chat.choices[0].finish_reason in ("length", "stop") and chat.usage.completion_tokens >= 1
    view = c.cluster()
    roles = sorted(n["role"] for n in view["nodes"])
    assert roles == ["attention", "ffn", "ffn"]
    held = sorted(e for n in view["nodes"] for e in n["experts"])
    assert held == list(range(16))
    _wait_for(lambda: "afd:layer_round_trips_total" in httpx.get(c.base_url + "/metrics").text, 10, "heartbeats")
    metrics = httpx.get(c.base_url + "/metrics").text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        'afd:activation_bytes_total{direction="attention_to_ffn"}',
        'afd:layer_round_trip_seconds_total{layer="3"}',
        'afd:layer_wait_seconds_total{layer="3"}',
        "afd:ffn_busy_fraction",
        "afd:expert_tokens_total",
    ):
        assert name in metrics, name
    # the blocked part of each exchange reaches the router, and is a part of it (what `afd bench cluster` reports)
    totals = exchange_totals(c.base_url)
    assert totals["round_trips"] > 0
    assert 0 < totals["wait_seconds"] <= totals["seconds"]


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_channel_transports_serve_the_reference_tokens_and_scale(cluster, expected, transport):
    """The data plane over shared memory / gloo: same tokens as in-process, FFN scale-up and a kill -9."""
    c = cluster(transport=transport, microbatches="2")  # ping-pong across processes
    client = _client(c)
    assert _complete(client, PROMPTS[0], stream=True) == expected[PROMPTS[0]]
    c.scale(ffn=3)
    assert len([n for n in c.cluster()["nodes"] if n["role"] == "ffn" and n["experts"]]) == 3
    for prompt in PROMPTS[1:3]:
        assert _complete(client, prompt) == expected[prompt]
    victim = c.nodes["ffn-0"]
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    assert _complete(client, PROMPTS[3]) == expected[PROMPTS[3]]
    live = [n for n in c.cluster()["nodes"] if n["role"] == "ffn" and n["state"] == "ready"]
    assert sorted(e for n in live for e in n["experts"]) == list(range(16))


def test_live_scaling_under_load_fails_nothing(cluster, expected):
    c = cluster()
    load = Load(c)
    try:
        _wait_for(lambda: len(load.results) >= 3, 60, "first results")
        c.scale(ffn=3)
        assert len([n for n in c.cluster()["nodes"] if n["role"] == "ffn" and n["experts"]]) == 3
        c.scale(attn=2)
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 3, 60, "results after scale-up")
        c.scale(ffn=2)
        c.scale(attn=1)
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 3, 60, "results after scale-down")
    finally:
        load.stop()
    assert load.failures == []
    assert all(text == expected[prompt] for prompt, text in load.results)
    view = c.cluster()
    live = [n for n in view["nodes"] if n["state"] == "ready"]
    assert sorted(n["role"] for n in live) == ["attention", "ffn", "ffn"]
    assert sorted(e for n in live for e in n["experts"]) == list(range(16))


def test_killed_ffn_node_is_survived(cluster, expected):
    c = cluster(ffn=3)
    load = Load(c)
    try:
        _wait_for(lambda: len(load.results) >= 3, 60, "first results")
        victim = c.nodes["ffn-1"]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 6, 90, "results after the FFN node died")
    finally:
        load.stop()
    assert load.failures == []
    assert all(text == expected[prompt] for prompt, text in load.results)
    view = {n["node_id"]: n for n in c.cluster()["nodes"]}
    assert view["ffn-1"]["state"] == "dead" and not view["ffn-1"]["experts"]
    assert sorted(e for n in view.values() for e in n["experts"]) == list(range(16))


def test_killed_attention_node_requests_migrate(cluster, expected):
    c = cluster(attn=2)
    load = Load(c, threads=4, stream=True)
    try:
        _wait_for(lambda: len(load.results) >= 4, 60, "first results")
        victim = c.nodes["attn-0"]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 6, 90, "results after the attention node died")
    finally:
        load.stop()
    # Streams that were on the dead node continued on the other one: same text, nothing duplicated or lost.
    assert load.failures == []
    assert all(text == expected[prompt] for prompt, text in load.results)


def test_router_restart_fails_in_flight_requests_clearly(cluster):
    c = cluster()
    client = _client(c)
    streaming = threading.Event()
    done = threading.Event()
    errors: list[Exception] = []

    def long_request() -> None:
        try:
            # Long enough to be mid-stream when the router dies, however fast the machine is.
            stream = client.completions.create(
                model=client.models.list().data[0].id,
                prompt=PROMPTS[0],
                max_tokens=1000,
                temperature=0.0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for _chunk in stream:
                streaming.set()
        except Exception as exc:
            errors.append(exc)
        done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    assert streaming.wait(60), "the first token never arrived"
    c.router.process.send_signal(signal.SIGKILL)
    assert done.wait(30), "the client hung after the router died"
    thread.join()
    assert errors and isinstance(errors[0], (openai.APIConnectionError, openai.APIError)), errors
    c.restart_router()  # nodes notice (NOT_FOUND on heartbeat) and register with the new router
    assert _complete(_client(c), PROMPTS[1])


def test_frozen_ffn_node_stalls_requests_only_until_the_router_declares_it_dead(cluster, expected):
    """SIGSTOP keeps the node's connections open but it never answers. The router declares it dead after
    its node timeout (6 s); in-flight steps must end then, not at the 30 s reply timeout, and the attention
    node's heartbeats must go on meanwhile (it must not be declared dead itself)."""
    c = cluster(ffn=3)
    load = Load(c, threads=2)
    victim = c.nodes["ffn-1"]
    try:
        _wait_for(lambda: len(load.results) >= 3, 60, "first results")
        victim.process.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 4, 60, "results after the FFN node froze")
        recovered_after = time.monotonic() - frozen_at
    finally:
        load.stop()
        victim.process.send_signal(signal.SIGKILL)  # works on a stopped process; stop() then only reaps
        victim.process.wait(10)
    assert load.failures == []
    assert all(text == expected[prompt] for prompt, text in load.results)
    assert recovered_after < 20.0, f"requests stalled {recovered_after:.1f} s (the reply timeout is 30 s)"
    router_log = c.router.log_path.read_text(errors="replace")
    # withdrawn as a straggler by the attention node's deadlines (afd/transport/deadlines.py), or dead
    assert "node ffn-1 declared dead" in router_log or "node ffn-1 degraded" in router_log
    assert "node attn-0 declared dead" not in router_log, "the attention node's heartbeats waited on the step"
