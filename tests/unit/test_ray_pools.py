"""How `afd up --ray` lays out its pools from what a Ray cluster advertises (no Ray started here)."""

from __future__ import annotations

import math

import pytest

from afd.errors import ConfigError
from orchestration.k8s.kuberay import HEAD_ROUTER_RESOURCE, pool_resource
from orchestration.local_cluster import LocalClusterConfig
from orchestration.ray_cluster import RayCluster, RayOptions, assign_new_nodes, plan_pools


def _totals(machines: list[dict[str, float]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for machine in machines:
        for name, amount in machine.items():
            totals[name] = totals.get(name, 0.0) + amount
    return totals


def test_kuberay_overlay_resources_give_one_node_per_pod_with_its_cpus() -> None:
    """The `ray` overlay: a CPU head with afd_router, attention pods and two FFN pools of other hardware."""
    head = {"CPU": 2.0, HEAD_ROUTER_RESOURCE: 1.0}
    attention = [{"CPU": 8.0, "GPU": 1.0, pool_resource("attn"): 1.0} for _ in range(2)]
    l40s = [{"CPU": 16.0, "GPU": 1.0, pool_resource("l40s-ffn"): 1.0} for _ in range(3)]
    h100 = [{"CPU": 12.0, "GPU": 1.0, pool_resource("h100-ffn"): 1.0}]
    machines = [head, *attention, *l40s, *h100]
    layouts = {p.name: p for p in plan_pools(LocalClusterConfig(), RayOptions(), _totals(machines), machines)}

    assert list(layouts) == ["router", "attn", "h100_ffn", "l40s_ffn"]
    assert layouts["router"].bundle == {"afd_router": 1.0, "CPU": 2.0} and layouts["router"].strategy == "PACK"
    assert layouts["attn"].bundle == {"afd_pool_attn": 1.0, "CPU": 8.0, "GPU": 1.0}
    assert layouts["attn"].capacity == 2
    assert layouts["l40s_ffn"].bundle == {"afd_pool_l40s_ffn": 1.0, "CPU": 16.0, "GPU": 1.0}
    assert layouts["l40s_ffn"].capacity == 3 and layouts["l40s_ffn"].threads == 16
    assert layouts["h100_ffn"].capacity == 1 and layouts["h100_ffn"].threads == 12
    assert all(p.strategy == "SPREAD" for p in layouts.values() if p.role != "router")
    assert {p.role for p in layouts.values()} == {"router", "attn", "ffn"}


def test_a_machine_hosting_several_nodes_divides_its_cpus_and_threads_follow_the_config() -> None:
    machine = {
        "CPU": 6.0,
        "GPU": 2.0,
        HEAD_ROUTER_RESOURCE: 1.0,
        pool_resource("attn"): 1.0,
        pool_resource("ffn"): 2.0,
    }
    config = LocalClusterConfig(threads_per_node=3)
    layouts = {p.name: p for p in plan_pools(config, RayOptions(), machine, [machine])}
    assert layouts["ffn"].bundle == {"afd_pool_ffn": 1.0, "CPU": 1.5, "GPU": 0.5}  # 6 CPUs, 2 GPUs / 4 afd units
    assert layouts["ffn"].capacity == 2 and layouts["ffn"].threads == 3


def test_plain_ray_instance_gets_cpu_share_bundles_and_one_ffn_pool() -> None:
    machine = {"CPU": 2.0, "memory": 1e10, "node:10.0.0.1": 1.0}
    config = LocalClusterConfig(attn=1, ffn=2)
    layouts = plan_pools(config, RayOptions(cpu_share=0.25), machine, [machine])
    assert [(p.name, p.role, p.bundle, p.capacity) for p in layouts] == [
        ("router", "router", {"CPU": 0.25}, None),
        ("attn", "attn", {"CPU": 0.25}, None),
        ("ffn", "ffn", {"CPU": 0.25}, None),
    ]
    assert [p.threads for p in layouts] == [None, 1, 1]  # 2 CPUs // 3 nodes, at least 1


def test_new_ffn_nodes_go_to_the_pool_with_most_room_and_a_full_cluster_refuses() -> None:
    assert assign_new_nodes("ffn", {"h100_ffn": 1, "l40s_ffn": 3}, 3) == {"h100_ffn": 1, "l40s_ffn": 2}
    assert assign_new_nodes("ffn", {"ffn": math.inf}, 5) == {"ffn": 5}
    with pytest.raises(ConfigError, match="no room for another ffn node"):
        assign_new_nodes("ffn", {"h100_ffn": 0, "l40s_ffn": 1}, 2)


def test_bad_ray_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="cpu_share"):
        RayOptions(cpu_share=0)
    with pytest.raises(ConfigError, match="local_num_cpus"):
        RayOptions(local_num_cpus=0)
    with pytest.raises(ConfigError, match="microbatches must be auto or a positive integer"):
        RayCluster(LocalClusterConfig(microbatches="many"))
