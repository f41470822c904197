"""Chaos under steady load: the FFN pool scaled 2 -> 4 -> 2 -> 3 and one FFN node killed with SIGKILL.

Every request must finish within its deadline with exactly the greedy text of the in-process engine (the
no-fault run): zero failed, zero hung, zero changed. The test that would have caught issue 15 (1), where a
placement change under load left an FFN node alive-looking but computing nothing, so requests hung for the
attention node's 30 s reply timeout and the node cycled dead / re-registered.

Every process is started by `LocalCluster` (what `afd up` runs) on 127.0.0.1 with ephemeral ports and is
stopped by its handle at the end.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from afd.builtin_model import builtin_model_dir
from orchestration.local_cluster import LocalCluster, LocalClusterConfig
from tests.engines import greedy_reference_texts

pytestmark = pytest.mark.slow  # still part of `make test` (pytest -q selects every marker)

PROMPTS = [
    "the file object is used to read",
    "return a new list of values",
    "if the default encoding is not given",
    "this module provides a class",
]
NEW_TOKENS = 16
REQUEST_DEADLINE_S = 20.0
"""Per request. Below the attention node's 30 s FFN reply timeout: a request that waited on a node that
computes nothing fails here as hung instead of succeeding late."""
PHASE_TIMEOUT_S = 90.0
"""How long each phase may take to produce its results (a new node starts in it: imports, load, calibrate)."""


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builtin_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def expected(model: Path) -> dict[str, str]:
    """Greedy completions of PROMPTS from the single-process engine: the no-fault run."""
    return greedy_reference_texts(model, PROMPTS, NEW_TOKENS)


class SteadyLoad:
    """Greedy completions in a loop on a few threads; each result, failure and overrun of the deadline kept."""

    def __init__(self, cluster: LocalCluster, threads: int = 3) -> None:
        self.client = openai.OpenAI(
            base_url=cluster.api_url, api_key="unused", max_retries=0, timeout=REQUEST_DEADLINE_S
        )
        self.model = self.client.models.list().data[0].id
        self.results: list[tuple[str, str]] = []
        self.failures: list[str] = []
        self.hung: list[str] = []
        self.slowest_s = 0.0
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._futures = [self._pool.submit(self._run, i) for i in range(threads)]

    def _run(self, offset: int) -> None:
        i = offset
        while not self._stop.is_set():
            prompt = PROMPTS[i % len(PROMPTS)]
            started = time.monotonic()
            try:
                stream = self.client.completions.create(
                    model=self.model,
                    prompt=prompt,
                    max_tokens=NEW_TOKENS,
                    temperature=0.0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
                took = time.monotonic() - started
                self.slowest_s = max(self.slowest_s, took)
                if took > REQUEST_DEADLINE_S:  # the client's timeout is per read; the deadline is per request
                    self.hung.append(f"{prompt!r} took {took:.1f} s")
                self.results.append((prompt, text))
            except openai.APITimeoutError:
                self.hung.append(f"{prompt!r}: no answer within {REQUEST_DEADLINE_S} s")
            except Exception as exc:  # recorded and asserted on by the test
                self.failures.append(f"{type(exc).__name__}: {exc}")
            i += 1

    def wait_for_more(self, count: int, what: str) -> None:
        """Until `count` more requests finished (successfully or not), bounded by PHASE_TIMEOUT_S."""
        target = len(self.results) + len(self.failures) + len(self.hung) + count
        deadline = time.monotonic() + PHASE_TIMEOUT_S
        while len(self.results) + len(self.failures) + len(self.hung) < target:
            assert time.monotonic() < deadline, f"timed out waiting for results {what}"
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result(timeout=2 * REQUEST_DEADLINE_S)
        self._pool.shutdown()


def _ready_ffn(cluster: LocalCluster) -> list[dict]:
    return [n for n in cluster.cluster()["nodes"] if n["role"] == "ffn" and n["state"] == "ready"]


@pytest.fixture
def cluster(model: Path, request: pytest.FixtureRequest):
    """A local cluster of 1 attention and 2 FFN nodes; its node logs are kept when the test fails."""
    config = LocalClusterConfig(model=model, http_port=0, threads_per_node=1, start_timeout_s=120, ffn=2)
    cluster = LocalCluster(config)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop(timeout=20)
        report = getattr(request.node, "report_call", None)
        if report is not None and report.failed:
            print(f"node logs of the failed test kept in {cluster.workdir}")  # shown with the failure
        else:
            cluster.remove_workdir()


def test_scaling_and_a_killed_ffn_node_under_load_change_nothing(cluster: LocalCluster, expected) -> None:
    load = SteadyLoad(cluster)
    try:
        load.wait_for_more(3, "before any change")
        for size in (4, 2, 3):
            cluster.scale(ffn=size)
            assert len([n for n in _ready_ffn(cluster) if n["experts"]]) == size
            load.wait_for_more(4, f"after scaling the FFN pool to {size}")
        victim = cluster.nodes[min(h.node_id for h in cluster.nodes.values() if h.role == "ffn")]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        load.wait_for_more(6, f"after {victim.node_id} was killed")
    finally:
        load.stop()
    changed = [(prompt, text) for prompt, text in load.results if text != expected[prompt]]
    assert load.failures == [] and load.hung == [] and changed == [], (load.failures, load.hung, changed)
    live = _ready_ffn(cluster)
    assert len(live) == 2 and victim.node_id not in {n["node_id"] for n in live}
    assert sorted(e for n in live for e in n["experts"]) == list(range(16))
    print(f"{len(load.results)} requests, the slowest took {load.slowest_s:.1f} s")
