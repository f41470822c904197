"""The router's half of straggler handling (router/stragglers.py, router/controller.py) and the measured link
in the microbatch plan (router/microbatch_plan.py): fake clock, no network."""

from __future__ import annotations

import asyncio

import pytest

from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.wire.auth import ClusterAuth
from afd.wire.generated import afd_cluster_pb2 as pb
from router.controller import Controller, ControllerConfig
from router.membership import Capacity, Load, NodeRecord, NodeState
from router.metrics import RouterMetrics
from router.microbatch_plan import plan_for_node, step_costs
from router.stragglers import DegradedNodes, StragglerConfig, drifted


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _beats(nodes: DegradedNodes, clock: FakeClock, node: str, until: float, every: float = 1.0) -> None:
    while clock.now + every <= until + 1e-9:
        clock.now += every
        nodes.heard(node)


def test_a_degraded_node_returns_after_its_hold_of_regular_heartbeats():
    clock = FakeClock()
    nodes = DegradedNodes(StragglerConfig(hold_s=10.0), heartbeat_interval_s=1.0, clock=clock)
    start = clock.now
    nodes.mark("ffn-1", "late")
    _beats(nodes, clock, "ffn-1", start + 9)
    assert nodes.ready_to_return() == []
    _beats(nodes, clock, "ffn-1", start + 10)
    assert nodes.ready_to_return() == ["ffn-1"]


def test_a_frozen_node_starts_its_hold_when_it_heartbeats_again():
    clock = FakeClock()
    nodes = DegradedNodes(StragglerConfig(hold_s=10.0), heartbeat_interval_s=1.0, clock=clock)
    start = clock.now
    nodes.mark("ffn-1", "late")
    clock.now = start + 30  # SIGSTOP: no heartbeat for 30 s
    assert nodes.ready_to_return() == [], "silent: not back even though its hold has passed"
    nodes.heard("ffn-1")  # SIGCONT
    _beats(nodes, clock, "ffn-1", start + 39)
    assert nodes.ready_to_return() == []
    _beats(nodes, clock, "ffn-1", start + 40)
    assert nodes.ready_to_return() == ["ffn-1"]


def test_a_node_degraded_again_soon_after_it_came_back_waits_longer():
    clock = FakeClock()
    config = StragglerConfig(hold_s=10.0, backoff=2.0, max_hold_s=25.0, strike_memory_s=100.0)
    nodes = DegradedNodes(config, heartbeat_interval_s=1.0, clock=clock)
    assert nodes.mark("ffn-1", "late") == 10.0
    nodes.returned("ffn-1")
    clock.now += 50
    assert nodes.mark("ffn-1", "late again") == 20.0
    nodes.returned("ffn-1")
    clock.now += 50
    assert nodes.mark("ffn-1", "and again") == 25.0  # capped
    nodes.returned("ffn-1")
    clock.now += 101
    assert nodes.mark("ffn-1", "much later") == 10.0  # the strikes are forgotten


def test_never_the_last_node_nor_more_than_the_allowed_fraction():
    nodes = DegradedNodes(StragglerConfig(max_degraded_fraction=0.5), heartbeat_interval_s=1.0)
    assert not nodes.may_degrade("ffn-0", ["ffn-0"])
    assert nodes.may_degrade("ffn-0", ["ffn-0", "ffn-1"])
    nodes.mark("ffn-0", "late")
    assert not nodes.may_degrade("ffn-1", ["ffn-1"])
    assert not nodes.may_degrade("ffn-0", ["ffn-1"]), "already out"
    with pytest.raises(ConfigError):
        StragglerConfig(max_degraded_fraction=1.0)
    with pytest.raises(ConfigError):
        StragglerConfig(hold_s=10.0, max_hold_s=5.0)


def test_drift_compares_a_node_with_the_others_median():
    reports = {"ffn-0": [(1000.0, 100)], "ffn-1": [(1100.0, 100), (900.0, 100)], "ffn-2": [(4000.0, 100)]}
    assert drifted(reports, 3.0, 64) == {"ffn-2": pytest.approx(4000.0 / 1000.0)}
    assert drifted(reports, 5.0, 64) == {}
    assert drifted({"ffn-0": [(1000.0, 100)], "ffn-1": [(4000.0, 10)]}, 3.0, 64) == {}, "too few exchanges"
    assert drifted({"ffn-0": [(1000.0, 100)], "ffn-1": [(4000.0, 100)]}, 3.0, 64) == {"ffn-1": 4.0}
    assert drifted(reports, 0.0, 64) == {}


def _controller(spec: ModelSpec, clock: FakeClock, ffn: int = 3) -> Controller:
    controller = Controller(
        spec, ClusterAuth(), RouterMetrics("m"), ControllerConfig(stragglers=StragglerConfig(hold_s=10.0))
    )
    controller.degraded.clock = clock
    loaded: list[int] = []

    async def broadcast_ffn(placement):
        loaded.append(placement.version)
        return {}

    async def broadcast_attention(placement):
        return None

    controller._broadcast_ffn = broadcast_ffn  # type: ignore[method-assign]
    controller._broadcast_attention = broadcast_attention  # type: ignore[method-assign]
    for i in range(ffn):
        controller.membership.add(NodeRecord(f"ffn-{i}", "ffn", f"127.0.0.1:{10 + i}", Capacity()))
    return controller


def test_controller_moves_a_stragglers_experts_away_and_brings_them_back(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    clock = FakeClock()
    controller = _controller(spec, clock)

    async def scenario() -> None:
        await controller.rebalance("start")
        first = controller.placement
        assert first is not None and "ffn-1" in first.nodes
        report = pb.PeerFailureReport(reporter_id="attn-0", peer_id="ffn-1", error="late", degraded=True)
        response = await controller.report_peer_failure(report)
        moved = controller.placement
        assert moved is not None and moved.version > first.version
        assert "ffn-1" not in moved.nodes and sorted(e for ids in moved.experts for e in ids) == list(
            range(spec.num_experts)
        )
        assert list(response.placement.degraded_nodes) == ["ffn-1"]
        assert list(response.placement.dead_nodes) == []
        record = controller.membership.get("ffn-1")
        assert record is not None and record.state is NodeState.DEGRADED and record.alive
        status = {n["node_id"]: n for n in controller.status()["nodes"]}
        assert status["ffn-1"]["state"] == "degraded" and status["ffn-1"]["degraded"]["reason"].endswith("late")
        # a second report of the same node changes nothing
        await controller.report_peer_failure(report)
        assert controller.placement.version == moved.version
        # heartbeats on time for the hold: back at the next placement version
        for _ in range(10):
            clock.now += 1.0
            await controller.heartbeat(pb.HeartbeatRequest(node_id="ffn-1", load=pb.NodeLoad()))
            if clock.now - 1000.0 < 10:
                await controller.check_stragglers()
                assert "ffn-1" not in controller.placement.nodes
        await controller.check_stragglers()
        back = controller.placement
        assert back.version > moved.version and "ffn-1" in back.nodes and back.experts[back.index("ffn-1")]
        assert controller.membership.get("ffn-1").state is NodeState.READY

    asyncio.run(scenario())


def test_controller_degrades_a_node_whose_measured_exchanges_drifted(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    controller = _controller(spec, FakeClock())

    async def scenario() -> None:
        await controller.rebalance("start")
        controller.membership.add(NodeRecord("attn-0", "attention", "127.0.0.1:1", Capacity(), state=NodeState.READY))
        capacity = pb.CapacityProfile(link_bytes_per_second=5e6, link_latency_us=4000.0)
        for peer, mean_us in (("ffn-0", 1000.0), ("ffn-1", 1200.0), ("ffn-2", 5000.0)):
            capacity.peer_links.add(peer_id=peer, mean_exchange_us=mean_us, exchanges=200)
        await controller.heartbeat(pb.HeartbeatRequest(node_id="attn-0", load=pb.NodeLoad(), capacity=capacity))
        record = controller.membership.get("attn-0")
        assert record.capacity.link_bytes_per_second == 5e6 and record.capacity.link_latency_us == 4000.0
        await controller.check_stragglers()
        assert "ffn-2" not in controller.placement.nodes
        assert controller.membership.get("ffn-2").state is NodeState.DEGRADED

    asyncio.run(scenario())


def test_microbatch_plan_sees_the_measured_link():
    costs = step_costs(8, 10.0, 5.0, 2, 2, 1024, link_bytes_per_second=0.0)
    assert costs.transfer_us == 0.0
    # 2 * 8 tokens * 2 nodes * 1024 * 2 bytes = 65536 bytes at 65.536 MB/s = 1000 us, plus 500 us per exchange
    costs = step_costs(8, 10.0, 5.0, 2, 2, 1024, link_bytes_per_second=65.536e6, link_latency_us=500.0)
    assert costs.transfer_us == pytest.approx(1500.0)
    attention = NodeRecord(
        "attn-0",
        "attention",
        "10.0.0.1:1",
        Capacity(device_kind="gpu", attention_us_per_token=10.0, max_num_seqs=8),
        load=Load(num_running=8),
    )
    ffn = [
        NodeRecord(f"ffn-{i}", "ffn", f"10.0.0.{2 + i}:1", Capacity("gpu", ffn_us_per_token_expert=5.0))
        for i in range(2)
    ]
    assert plan_for_node(attention, ffn, top_k=2, hidden_size=1024) == 2  # free link: plain ping-pong
    attention.capacity.link_bytes_per_second = 65.536e6
    attention.capacity.link_latency_us = 500.0
    # T_comm 1500 us over T_compute 80 us: m = 2 * (1 + 1500 / 80), capped at 4
    assert plan_for_node(attention, ffn, top_k=2, hidden_size=1024) == 4
