"""Heartbeat figures become per-node and per-layer metrics, and the cluster view carries the expert load.

What the Grafana dashboard (deploy/grafana/afd-dashboard.json) and `afd status --watch/--expert-heatmap`
read: per attention node KV use and batch, per FFN node busy fraction and expert tokens, A<->F bytes per
layer; a node that leaves has its gauges removed instead of showing its last value forever.
"""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.wire.auth import ClusterAuth
from afd.wire.generated import afd_cluster_pb2 as pb
from router.controller import Controller, ControllerConfig
from router.membership import Capacity, NodeRecord, NodeState
from router.metrics import RouterMetrics


def _samples(metrics: RouterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _controller(tiny_checkpoint) -> tuple[Controller, RouterMetrics, int]:
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    metrics = RouterMetrics("m")
    controller = Controller(spec, ClusterAuth(), metrics, ControllerConfig())
    n = spec.num_experts
    placement = ExpertPlacement(
        n, ("ffn-0", "ffn-1"), (tuple(range(n // 2)), tuple(range(n // 2, n))), (1.0, 1.0), version=3
    )
    controller.load_metrics.remember(placement)
    controller.placement = placement
    for node_id, role in (("attn-0", "attention"), ("ffn-0", "ffn"), ("ffn-1", "ffn")):
        controller.membership.add(NodeRecord(node_id, role, "127.0.0.1:1", Capacity(), state=NodeState.READY))
    return controller, metrics, n


def _beat(controller: Controller, node_id: str, load: pb.NodeLoad) -> None:
    request = pb.HeartbeatRequest(node_id=node_id, load=load, placement_version=3)
    asyncio.run(controller.heartbeat(request))


def test_heartbeats_become_per_node_and_per_layer_series(tiny_checkpoint):
    controller, metrics, n = _controller(tiny_checkpoint)
    transfers = [
        pb.LayerTransfer(layer=0, round_trips=2, seconds=0.01, bytes_sent=100, bytes_received=60),
        pb.LayerTransfer(layer=1, round_trips=2, seconds=0.02, bytes_sent=300, bytes_received=80),
    ]
    _beat(controller, "attn-0", pb.NodeLoad(num_running=3, num_waiting=1, kv_cache_usage=0.25, transfers=transfers))
    _beat(controller, "ffn-1", pb.NodeLoad(busy_fraction=0.5, expert_token_counts=[0, 7] + [0] * (n // 2 - 2)))
    found = _samples(metrics)
    assert found[("afd:node_requests_running", (("node_id", "attn-0"),))] == 3
    assert found[("afd:node_requests_waiting", (("node_id", "attn-0"),))] == 1
    assert found[("afd:node_kv_cache_usage_perc", (("node_id", "attn-0"),))] == 0.25
    assert found[("afd:ffn_busy_fraction", (("node_id", "ffn-1"),))] == 0.5
    per_layer = "afd:layer_activation_bytes_total"
    assert found[(per_layer, (("direction", "attention_to_ffn"), ("layer", "1")))] == 300
    assert found[(per_layer, (("direction", "ffn_to_attention"), ("layer", "0")))] == 60
    # the per-layer split adds up to the existing cluster-wide counter
    assert found[("afd:activation_bytes_total", (("direction", "attention_to_ffn"),))] == 400
    expert = str(n // 2 + 1)  # ffn-1's second local expert
    assert found[("afd:ffn_expert_tokens_total", (("expert", expert), ("node_id", "ffn-1")))] == 7
    assert ("afd:node_tokens_per_second", (("node_id", "ffn-1"), ("role", "ffn"))) in found
    assert ("afd:node_kv_cache_usage_perc", (("node_id", "ffn-1"),)) not in found  # FFN nodes hold no KV


def test_cluster_view_carries_expert_load_of_live_nodes(tiny_checkpoint):
    controller, _, n = _controller(tiny_checkpoint)
    _beat(controller, "ffn-0", pb.NodeLoad(expert_token_counts=[4, 0, 2] + [0] * (n // 2 - 3)))
    _beat(controller, "ffn-0", pb.NodeLoad(expert_token_counts=[1] + [0] * (n // 2 - 1)))
    _beat(controller, "ffn-1", pb.NodeLoad(expert_token_counts=[0] * (n // 2 - 1) + [9]))
    view = controller.status()
    assert view["num_experts"] == n
    assert view["expert_load"] == {"ffn-0": {"0": 5, "2": 2}, "ffn-1": {str(n - 1): 9}}
    controller.membership.get("ffn-1").state = NodeState.LEFT
    assert controller.status()["expert_load"] == {"ffn-0": {"0": 5, "2": 2}}


def test_a_departed_node_has_its_gauges_removed(tiny_checkpoint):
    controller, metrics, _ = _controller(tiny_checkpoint)
    _beat(controller, "attn-0", pb.NodeLoad(num_running=2, kv_cache_usage=0.5))
    _beat(controller, "ffn-0", pb.NodeLoad(busy_fraction=0.9))
    asyncio.run(controller.declare_dead("ffn-0", "test"))
    asyncio.run(controller.leave(pb.LeaveRequest(node_id="attn-0")))  # draining: still serving, still shown
    found = {name for name, labels in _samples(metrics) if ("node_id", "ffn-0") in labels}
    assert "afd:ffn_busy_fraction" not in found and "afd:node_tokens_per_second" not in found
    assert ("afd:node_kv_cache_usage_perc", (("node_id", "attn-0"),)) in _samples(metrics)
