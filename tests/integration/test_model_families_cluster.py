"""gpt-oss through the local cluster `afd up` starts: 2 attention nodes, 3 FFN nodes, one FFN node killed with
SIGKILL mid-stream.

gpt-oss is the new family whose FFN side differs most (fused expert tensors read by rows, biased clamped
experts) and whose attention side differs most (sliding windows shorter than the prompts plus the tokens
generated, sinks): the survivors re-load the dead node's experts from the fused tensors. Greedy texts are
compared with the in-process engine, which test_engine_equivalence proves token-identical to transformers.
"""

from __future__ import annotations

import signal

import pytest

from afd.builtin_model import builtin_model_dir
from afd.model_spec import ModelSpec
from orchestration.local_cluster import LocalCluster, LocalClusterConfig
from tests.checkpoints import build_with_tokenizer
from tests.engines import greedy_reference_texts
from tests.integration.test_cluster import NEW_TOKENS, PROMPTS, Load, _wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(request):
    """Starts a LocalCluster; stops it after the test and keeps its node logs when the test failed."""
    clusters = []

    def start(config: LocalClusterConfig) -> LocalCluster:
        cluster = LocalCluster(config)
        clusters.append(cluster)
        cluster.start()
        return cluster

    yield start
    report = getattr(request.node, "report_call", None)
    for cluster in clusters:
        cluster.stop(timeout=20)
        if report is not None and report.failed:
            print(f"node logs of the failed test kept in {cluster.workdir}")
        else:
            cluster.remove_workdir()


def test_gpt_oss_cluster_survives_a_killed_ffn_node(tmp_path_factory, cluster):
    demo = builtin_model_dir(tmp_path_factory.mktemp("cache"))
    model = build_with_tokenizer("gpt_oss", tmp_path_factory.mktemp("gpt_oss"), demo)
    spec = ModelSpec.from_pretrained(model)
    assert spec.sliding_window < min(len(p.split()) for p in PROMPTS) + NEW_TOKENS
    expected = greedy_reference_texts(model, PROMPTS, NEW_TOKENS)

    c = cluster(LocalClusterConfig(model=model, attn=2, ffn=3, http_port=0, threads_per_node=1, start_timeout_s=120))
    load = Load(c)
    try:
        _wait_for(lambda: len(load.results) >= 3, 90, "first results")
        victim = c.nodes["ffn-1"]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 6, 120, "results after the FFN node died")
    finally:
        load.stop()
    assert load.failures == []
    assert load.results and all(text == expected[prompt] for prompt, text in load.results)
    view = {n["node_id"]: n for n in c.cluster()["nodes"]}
    assert sorted(n["role"] for n in view.values() if n["state"] == "ready") == ["attention"] * 2 + ["ffn"] * 2
    assert view["ffn-1"]["state"] == "dead" and not view["ffn-1"]["experts"]
    assert sorted(e for n in view.values() for e in n["experts"]) == list(range(spec.num_experts))


def test_minimax_cluster_survives_a_killed_ffn_node(tmp_path_factory, cluster):
    """MiniMax: each attention node keeps its requests' lightning-attention states beside the paged cache of the
    softmax layer; prompts span several 4-token lightning blocks. An FFN node dies mid-stream: no request fails,
    the texts equal the in-process engine's, and the survivors hold every expert."""
    demo = builtin_model_dir(tmp_path_factory.mktemp("cache"))
    model = build_with_tokenizer("minimax", tmp_path_factory.mktemp("minimax"), demo)
    spec = ModelSpec.from_pretrained(model)
    assert spec.linear_attention is not None
    assert spec.linear_attention.block_size < min(len(p.split()) for p in PROMPTS)
    expected = greedy_reference_texts(model, PROMPTS, NEW_TOKENS)

    c = cluster(LocalClusterConfig(model=model, attn=2, ffn=3, http_port=0, threads_per_node=1, start_timeout_s=120))
    load = Load(c)
    try:
        _wait_for(lambda: len(load.results) >= 3, 90, "first results")
        victim = c.nodes["ffn-2"]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        before = len(load.results)
        _wait_for(lambda: len(load.results) >= before + 6, 120, "results after the FFN node died")
    finally:
        load.stop()
    assert load.failures == []
    assert load.results and all(text == expected[prompt] for prompt, text in load.results)
    view = {n["node_id"]: n for n in c.cluster()["nodes"]}
    assert sorted(n["role"] for n in view.values() if n["state"] == "ready") == ["attention"] * 2 + ["ffn"] * 2
    assert view["ffn-2"]["state"] == "dead" and not view["ffn-2"]["experts"]
    assert sorted(e for n in view.values() for e in n["experts"]) == list(range(spec.num_experts))
