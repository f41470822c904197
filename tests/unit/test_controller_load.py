"""The router's controller maps an FFN node's expert counts onto the placement the node computed under."""

from __future__ import annotations

import asyncio

from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.wire.auth import ClusterAuth
from afd.wire.generated import afd_cluster_pb2 as pb
from router.controller import Controller, ControllerConfig
from router.membership import Capacity, NodeRecord, NodeState
from router.metrics import RouterMetrics


def _expert_tokens(metrics: RouterMetrics) -> dict[int, float]:
    counts = {}
    for metric in metrics.expert_tokens.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                counts[int(sample.labels["expert"])] = sample.value
    return counts


def test_expert_counts_follow_the_reported_placement_version_not_the_current_one(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    metrics = RouterMetrics("m")
    controller = Controller(spec, ClusterAuth(), metrics, ControllerConfig())
    n = spec.num_experts
    old = ExpertPlacement(
        n, ("ffn-0", "ffn-1"), (tuple(range(n // 2)), tuple(range(n // 2, n))), (1.0, 1.0), version=10
    )
    new = ExpertPlacement(
        n, ("ffn-0", "ffn-1"), (tuple(range(n // 2, n)), tuple(range(n // 2))), (1.0, 1.0), version=11
    )
    for placement in (old, new):
        controller._remember(placement)
    controller.placement = new
    controller.membership.add(NodeRecord("ffn-0", "ffn", "127.0.0.1:1", Capacity(), state=NodeState.READY))

    async def beat(version: int, counts: list[int]) -> None:
        load = pb.NodeLoad(expert_token_counts=counts)
        await controller.heartbeat(pb.HeartbeatRequest(node_id="ffn-0", load=load, placement_version=version))

    # ffn-0 still computed under v10 (it held experts 0..n/2-1 then): 5 tokens on its first local expert
    asyncio.run(beat(10, [5] + [0] * (n // 2 - 1)))
    assert _expert_tokens(metrics) == {0: 5.0}
    asyncio.run(beat(11, [0, 3] + [0] * (n // 2 - 2)))
    assert _expert_tokens(metrics) == {0: 5.0, n // 2 + 1: 3.0}
    asyncio.run(beat(7, [9] * (n // 2)))  # a version the router never planned: dropped, not misattributed
    assert _expert_tokens(metrics) == {0: 5.0, n // 2 + 1: 3.0}


def test_status_shows_each_nodes_measured_cost_with_its_context_length(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    controller = Controller(spec, ClusterAuth(), RouterMetrics("m"), ControllerConfig())
    attention = Capacity(attention_us_per_token=12.5, attention_context_len=128)
    controller.membership.add(NodeRecord("attn-0", "attention", "127.0.0.1:1", attention, state=NodeState.READY))
    controller.membership.add(NodeRecord("ffn-0", "ffn", "127.0.0.1:2", Capacity(ffn_us_per_token_expert=3.0)))
    nodes = {n["node_id"]: n for n in controller.status()["nodes"]}
    assert nodes["attn-0"]["measured_us"] == {"per_token": 12.5, "at_context_len": 128}
    assert nodes["ffn-0"]["measured_us"] == {"per_token_expert": 3.0}
