"""Request placement: the controller offers only healthy nodes; the least-pressure policy ranks them."""

from __future__ import annotations

from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.wire.auth import ClusterAuth
from router.controller import Controller, ControllerConfig
from router.membership import Capacity, Load, NodeRecord, NodeState
from router.metrics import RouterMetrics
from router.policies import LeastPressurePolicy


def _node(node_id: str, us_per_token: float, kind: str, running: int = 0, kv: float = 0.0) -> NodeRecord:
    record = NodeRecord(node_id, "attention", "h:1", Capacity(device_kind=kind, attention_us_per_token=us_per_token))
    record.load = Load(num_running=running, kv_cache_usage=kv)
    record.state = NodeState.READY
    return record


def test_least_pressure_gives_a_twice_as_fast_kind_about_twice_the_work():
    # pressure = (work + 1) / speed, speed = 1 / (us per token): fast 0.1, slow 0.05
    fast, slow = _node("fast", 10.0, "gpu", running=4), _node("slow", 20.0, "cpu", running=1)
    assert LeastPressurePolicy().select([fast, slow]) is slow  # 5 / 0.1 = 50 > 2 / 0.05 = 40
    fast.load = Load(num_running=2)
    assert LeastPressurePolicy().select([fast, slow]) is fast  # 3 / 0.1 = 30 < 40


def test_least_pressure_avoids_a_nearly_full_kv_cache():
    full, free = _node("full", 10.0, "cpu", kv=0.99), _node("free", 10.0, "cpu", running=2)
    assert LeastPressurePolicy().select([full, free]) is free


def test_controller_offers_the_policy_only_ready_nodes_on_the_current_placement(tiny_checkpoint):
    seen: list[list[str]] = []

    class Recording(LeastPressurePolicy):
        def select(self, candidates):
            seen.append(sorted(n.node_id for n in candidates))
            return super().select(candidates)

    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    controller = Controller(spec, ClusterAuth(), RouterMetrics("m"), ControllerConfig(), policy=Recording())
    assert controller.pick_attention_node() is None  # no placement yet: nothing can serve
    n = spec.num_experts
    controller.placement = ExpertPlacement(n, ("ffn-0",), (tuple(range(n)),), (1.0,), version=5)
    for node_id, state, version in [
        ("a", NodeState.READY, 5),
        ("b", NodeState.DRAINING, 5),
        ("c", NodeState.DEAD, 5),
        ("d", NodeState.READY, 4),
        ("e", NodeState.READY, 6),
    ]:
        record = _node(node_id, 10.0, "cpu")
        record.state, record.placement_version = state, version
        controller.membership.add(record)
    assert controller.pick_attention_node(exclude={"e"}).node_id == "a"
    assert seen == [["a"]]
