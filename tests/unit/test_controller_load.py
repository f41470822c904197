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
        controller.load_metrics.remember(placement)
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


def test_register_refuses_a_node_whose_checkpoint_differs(tiny_checkpoint):
    from afd.model_spec import model_fingerprint

    directory = tiny_checkpoint("qwen3_moe")
    ours = model_fingerprint(directory)
    controller = Controller(
        ModelSpec.from_pretrained(directory),
        ClusterAuth(),
        RouterMetrics("m"),
        ControllerConfig(),
        model_fingerprint=ours,
    )

    def register(fingerprint: str) -> None:
        request = pb.RegisterRequest(
            node_id="attn-0", role=pb.ROLE_ATTENTION, address="127.0.0.1:1", model_fingerprint=fingerprint
        )
        asyncio.run(controller.register(request))

    for wrong in (model_fingerprint(tiny_checkpoint("llama")), ""):
        try:
            register(wrong)
        except ValueError as exc:
            assert "every node must be started with the same --model" in str(exc)
        else:
            raise AssertionError(f"fingerprint {wrong!r} was accepted")
    assert controller.membership.get("attn-0") is None
    register(ours)
    assert controller.membership.get("attn-0") is not None


def test_fingerprint_ignores_formatting_and_save_metadata_but_not_the_architecture(tmp_path, tiny_checkpoint):
    import json
    import shutil

    from afd.model_spec import model_fingerprint

    directory = tiny_checkpoint("qwen3_moe")
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    config = json.loads((copy / "config.json").read_text())
    config["transformers_version"] = "0.0.0"
    (copy / "config.json").write_text(json.dumps(config, indent=7, sort_keys=False))
    assert model_fingerprint(copy) == model_fingerprint(directory)
    config["num_hidden_layers"] += 1
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy) != model_fingerprint(directory)
