"""Hot-expert replication on a live local cluster (router, 1 attention, 2 FFN node processes).

The checkpoint's gate sends nearly every token to expert 0 or 1, which the balanced placement puts both
on ffn-0. With `--expert-replication on` the router must publish a new placement version in which a hot
expert is held by both nodes, greedy texts must stay those of the in-process engine, and the token-expert
pairs each FFN node computes (its own counters, summed by the router from its heartbeats) must move
closer together. Bounded: every wait has a deadline, every process is stopped by its handle.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from afd.builtin_model import builtin_model_dir
from afd.model_spec import ModelSpec
from orchestration.local_cluster import LocalCluster, LocalClusterConfig
from tests.checkpoints import build_skewed_checkpoint
from tests.engines import greedy_reference_texts

pytestmark = pytest.mark.slow

PROMPTS = [
    "the file object is used to read",
    "return a new list of values",
    "if the default encoding is not given",
    "this module provides a class",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    demo = builtin_model_dir(tmp_path_factory.mktemp("cache"))
    return build_skewed_checkpoint(tmp_path_factory.mktemp("skewed"), tokenizer_dir=demo)


def _view(cluster: LocalCluster) -> dict[str, Any]:
    return httpx.get(cluster.base_url + "/afd/v1/cluster", timeout=10).json()


def _node_pairs(view: dict[str, Any]) -> dict[str, int]:
    """Token-expert pairs each FFN node reported computing since the router started."""
    return {node: sum(counts.values()) for node, counts in view["expert_load"].items()}


def _pairs_reported(cluster: LocalCluster, total: int, timeout: float = 60.0) -> dict[str, int]:
    """The per-node totals once the nodes' heartbeats have reported `total` pairs in all (a barrier on the
    counters, not a sleep: each request's pair count is known from its token counts)."""
    deadline = time.monotonic() + timeout
    while True:
        pairs = _node_pairs(_view(cluster))
        if sum(pairs.values()) >= total:
            assert sum(pairs.values()) == total, f"more pairs reported than computed: {pairs}, expected {total}"
            return pairs
        assert time.monotonic() < deadline, f"FFN nodes reported {pairs}, expected {total} pairs in all"
        time.sleep(0.2)


class _Client:
    """Greedy completions, counting the token-expert pairs they make the FFN nodes compute."""

    def __init__(self, cluster: LocalCluster, pairs_per_token: int) -> None:
        self.client = openai.OpenAI(base_url=cluster.api_url, api_key="unused", max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id
        self.pairs_per_token = pairs_per_token
        self.pairs = 0
        """Pairs of every completion so far: each token but the last generated one runs through every layer."""

    def complete(self, prompt: str) -> str:
        response = self.client.completions.create(
            model=self.model,
            prompt=prompt,
            max_tokens=NEW_TOKENS,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        assert response.usage is not None
        self.pairs += (response.usage.prompt_tokens + response.usage.completion_tokens - 1) * self.pairs_per_token
        return response.choices[0].text


def _spread(before: dict[str, int], after: dict[str, int]) -> float:
    """max / mean of the pairs each node computed between two readings."""
    delta = {node: after.get(node, 0) - before.get(node, 0) for node in after}
    return max(delta.values()) / (sum(delta.values()) / len(delta))


def test_hot_experts_are_replicated_live_without_changing_tokens(skewed: Path):
    expected = greedy_reference_texts(skewed, PROMPTS, NEW_TOKENS)
    spec = ModelSpec.from_pretrained(skewed)
    pairs_per_token = sum(layer.moe.top_k for layer in spec.layers if layer.moe is not None)
    config = LocalClusterConfig(
        model=skewed,
        http_port=0,
        threads_per_node=1,
        start_timeout_s=120,
        expert_replication=True,
        replication_interval_s=1.0,
    )
    cluster = LocalCluster(config)
    try:
        cluster.start()
        client = _Client(cluster, pairs_per_token)
        first = _view(cluster)
        start_version = first["placement_version"]
        assert all(not node.get("replicas") for node in first["nodes"])
        assert sum(_node_pairs(first).values()) == 0
        ffn_nodes = [n["node_id"] for n in first["nodes"] if n["role"] == "ffn"]
        start = dict.fromkeys(ffn_nodes, 0)
        # the node that holds experts 0 and 1 in the balanced placement (the first to register)
        (hot,) = [n["node_id"] for n in first["nodes"] if n["role"] == "ffn" and 0 in n["experts"]]
        (cold,) = set(ffn_nodes) - {hot}

        # Phase 1: the skewed load, until the router publishes replicas (bounded).
        deadline = time.monotonic() + 180
        replicated: dict[str, Any] | None = None
        i = 0
        while replicated is None:
            assert time.monotonic() < deadline, f"no replica within the deadline; last view {_view(cluster)}"
            prompt = PROMPTS[i % len(PROMPTS)]
            assert client.complete(prompt) == expected[prompt]
            i += 1
            view = _view(cluster)
            if view["placement_version"] > start_version and any(n.get("replicas") for n in view["nodes"]):
                replicated = view
        ffn = {n["node_id"]: n for n in replicated["nodes"] if n["role"] == "ffn"}
        held_by = {e: [n for n, node in ffn.items() if e in node["experts"]] for e in (0, 1)}
        assert any(len(nodes) == 2 for nodes in held_by.values()), held_by
        # Replicas of the hot node's experts go to the cold one, 0 or 1 among them. What else the greedy plan adds
        # depends on the window's counts and on the speeds the nodes measured at start: under load one run also
        # copied expert 2 to the cold node, another (the cold node measured slower) one of the cold node's own
        # experts to the hot one, both balancing moves. So only the first direction is fixed here; the spread
        # of the pairs below is what shows the plan balanced the load.
        hot_experts = {e for n in first["nodes"] if n["node_id"] == hot for e in n["experts"]}
        cold_replicas = set(ffn[cold]["replicas"])
        assert cold_replicas <= hot_experts and cold_replicas & {0, 1}, (ffn, hot_experts)
        # every attention node switched to it before it is used for new requests
        attention = [n for n in replicated["nodes"] if n["role"] == "attention"]
        wait = time.monotonic() + 30
        while any(n["placement_version"] < replicated["placement_version"] for n in attention):
            assert time.monotonic() < wait, "the attention node did not take the replica placement"
            time.sleep(0.2)
            attention = [n for n in _view(cluster)["nodes"] if n["role"] == "attention"]
        # Phase 1's pairs, once all reported (those the nodes computed under the old placement after the switch
        # are reported too: the previous shard counts only what was addressed to it before)
        before = _pairs_reported(cluster, client.pairs)

        # Phase 2: the same prompts on the replicated placement: same texts, counts closer together.
        for prompt in PROMPTS * 2:
            assert client.complete(prompt) == expected[prompt]
        after = _pairs_reported(cluster, client.pairs)
        skew_before, skew_after = _spread(start, before), _spread(before, after)
        print(f"pairs per FFN node: {start} -> {before} -> {after}; max/mean {skew_before:.2f} -> {skew_after:.2f}")
        assert skew_after < skew_before, (start, before, after)
        assert skew_after <= 1.2, (before, after)
        assert _view(cluster)["placement_version"] >= replicated["placement_version"]
    finally:
        cluster.stop(timeout=20)
        cluster.remove_workdir()
