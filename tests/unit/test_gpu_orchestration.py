"""Device placement of the launchers without a GPU: `afd up --attn-device/--ffn-device` (local processes and Ray
actors), the devices `afd status` shows, and the GPU pools of the Kubernetes manifests.

A fake CUDA (torch.cuda answering "2 devices" to the calls afd.devices makes) stands in for GPUs; no node
process starts: the local launcher's spawn is replaced by one that records the command line, Ray's actor class
by one that records its options."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from afd.errors import ConfigError
from orchestration.k8s.config import load_cluster_config
from orchestration.k8s.kuberay import render_ray_cluster
from orchestration.k8s.overlays import get_overlay, render
from orchestration.local_cluster import LocalCluster, LocalClusterConfig, NodeHandle, next_device, pool_devices
from orchestration.ray_cluster import BundleSlot, RayCluster, RayOptions, plan_pools, ray_device
from orchestration.ray_node import NodeLaunch
from orchestration.status_view import cluster_table

REPO = Path(__file__).resolve().parents[2]
H200_BYTES = 143771 * 2**20  # what nvidia-smi showed for the H200 this project can borrow


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda as afd.devices sees it on a machine with two GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index: SimpleNamespace(name="NVIDIA H200", total_memory=H200_BYTES)
    )


def _no_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal of an absent one cannot be shown here")


# ---- which device each node of a pool gets -------------------------------------------------------------


def test_a_bare_cuda_spreads_a_pool_over_every_gpu_and_a_list_is_kept_in_its_order(two_gpus: None) -> None:
    assert pool_devices("cpu") == ["cpu"]
    assert pool_devices("cuda") == ["cuda:0", "cuda:1"]
    assert pool_devices("cuda:1") == ["cuda:1"]
    assert pool_devices("cuda:1, cuda:0") == ["cuda:1", "cuda:0"]
    with pytest.raises(
        ConfigError, match=r"--ffn-device 'cuda:2': cuda has 2 device\(s\), indices 0\.\.1; found: .*2 x NVIDIA H200"
    ):
        pool_devices("cuda:2", "--ffn-device")


def test_an_absent_device_is_refused_naming_what_was_found() -> None:
    _no_gpu()
    with pytest.raises(
        ConfigError, match=r"--attn-device 'cuda': no cuda device is present; found: cpu \(\d+ threads\)"
    ):
        pool_devices("cuda", "--attn-device")
    with pytest.raises(ConfigError, match="'gpu0' is not a torch device"):
        pool_devices("gpu0", "--attn-device")
    with pytest.raises(ConfigError, match="needs a device"):
        pool_devices(" , ")


def test_next_device_is_round_robin_and_refills_where_a_node_left() -> None:
    devices = ["cuda:0", "cuda:1"]
    assert [next_device(devices, used) for used in ([], ["cuda:0"], ["cuda:0", "cuda:1"])] == [
        "cuda:0",
        "cuda:1",
        "cuda:0",
    ]
    assert next_device(devices, ["cuda:1", "cuda:0", "cuda:1"]) == "cuda:0"  # after the node on cuda:0 left
    assert next_device(["cpu"], ["cpu", "cpu"]) == "cpu"


def test_nccl_needs_both_pools_on_cuda() -> None:
    with pytest.raises(ConfigError, match="--transport nccl moves activations GPU to GPU"):
        LocalClusterConfig(transport="nccl")
    with pytest.raises(ConfigError, match="--transport nccl"):
        LocalClusterConfig(transport="nccl", attn_device="cuda", ffn_device="cpu")
    LocalClusterConfig(transport="nccl", attn_device="cuda", ffn_device="cuda:0,cuda:1")  # spelling only, no GPU
    with pytest.raises(ConfigError, match="--ffn-device 'cuda:x' is not a torch device"):
        LocalClusterConfig(ffn_device="cuda:x")


class _Process:
    pid = 0

    def poll(self) -> None:
        return None


@dataclass
class _RecordingCluster(LocalCluster):
    """LocalCluster whose processes are never started: each spawn records (node id, role, args)."""

    spawned: list[tuple[str, str, list[str]]] = field(default_factory=list)

    def _start_router(self, http_port: int, grpc_port: int) -> None:
        self.grpc_port = 1

    def _spawn(self, node_id: str, role: str, args: list[str]) -> NodeHandle:
        self.spawned.append((node_id, role, args))
        return NodeHandle(node_id, role, _Process(), self.workdir / f"{node_id}.log")  # type: ignore[arg-type]

    def wait_until_ready(self, node_ids: set[str]) -> None:
        pass


def _devices_of(cluster: _RecordingCluster) -> dict[str, str | None]:
    return {
        node_id: args[args.index("--device") + 1] if "--device" in args else None
        for node_id, _, args in cluster.spawned
    }


def test_local_cluster_passes_each_node_its_device_round_robin(two_gpus: None, tmp_path: Path) -> None:
    config = LocalClusterConfig(model=tmp_path, attn=3, ffn=2, attn_device="cuda", ffn_device="cuda:1")
    cluster = _RecordingCluster(config, workdir=tmp_path)
    cluster.start()
    assert _devices_of(cluster) == {
        "ffn-0": "cuda:1",
        "ffn-1": "cuda:1",
        "attn-0": "cuda:0",
        "attn-1": "cuda:1",
        "attn-2": "cuda:0",
    }
    cluster.nodes.pop("attn-0")  # as scale() does once a removed node stopped
    cluster.scale(attn=3)
    assert _devices_of(cluster)["attn-3"] == "cuda:0"  # the GPU that has one node fewer


def test_a_cpu_cluster_starts_nodes_with_the_same_command_lines_as_before(tmp_path: Path) -> None:
    cluster = _RecordingCluster(LocalClusterConfig(model=tmp_path, attn=1, ffn=2), workdir=tmp_path)
    cluster.start()
    assert [node_id for node_id, _, _ in cluster.spawned] == ["ffn-0", "ffn-1", "attn-0"]
    assert set(_devices_of(cluster).values()) == {None}  # the node's own default, cpu


def test_mixed_pools_cuda_attention_cpu_ffn(two_gpus: None, tmp_path: Path) -> None:
    config = LocalClusterConfig(model=tmp_path, attn=1, ffn=2, attn_device="cuda:0", ffn_device="cpu")
    cluster = _RecordingCluster(config, workdir=tmp_path)
    cluster.start()
    assert _devices_of(cluster) == {"ffn-0": None, "ffn-1": None, "attn-0": "cuda:0"}


def test_start_refuses_an_absent_device_before_any_process(tmp_path: Path) -> None:
    _no_gpu()
    cluster = _RecordingCluster(LocalClusterConfig(model=tmp_path, ffn_device="cuda"), workdir=tmp_path)
    with pytest.raises(ConfigError, match=r"--ffn-device 'cuda': no cuda device is present; found: cpu"):
        cluster.start()
    assert cluster.spawned == []


def test_afd_up_refuses_an_absent_device_at_parse_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_gpu()
    from orchestration.cli import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    runner = CliRunner()
    result = runner.invoke(app, ["up", "--attn-device", "cuda", "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "no cuda device is present; found: cpu" in " ".join(result.output.split())
    result = runner.invoke(app, ["up", "--ray", "--ffn-device", "cuda:1", "--port", "0"])
    assert result.exit_code == 2, result.output
    assert "Ray assigns each actor its GPU" in " ".join(result.output.split())
    result = runner.invoke(app, ["up", "--transport", "nccl", "--port", "0"])
    assert result.exit_code == 2, result.output  # a clear error, not the ConfigError's traceback (exit 1)
    assert "--transport nccl moves activations GPU to GPU" in " ".join(result.output.split())


# ---- Ray actors --------------------------------------------------------------------------------------------


def test_ray_device_takes_a_device_type_ray_can_reserve() -> None:
    assert ray_device("cpu", "--attn-device") == "cpu"
    assert ray_device("cuda", "--attn-device") == "cuda"
    for bad, reason in (("cuda:1", "without an index"), ("cpu,cuda", "one device type"), ("xpu", "cpu or cuda")):
        with pytest.raises(ConfigError, match=reason):
            ray_device(bad, "--ffn-device")


def test_plain_ray_gpu_pools_reserve_a_gpu_per_actor_and_cpu_pools_none() -> None:
    machine = {"CPU": 16.0, "GPU": 2.0, "memory": 1e11}
    config = LocalClusterConfig(attn_device="cuda", ffn_device="cpu")
    layouts = {p.name: p for p in plan_pools(config, RayOptions(cpu_share=0.25), machine, [machine])}
    assert layouts["attn"].bundle == {"CPU": 0.25, "GPU": 1.0} and layouts["attn"].device == "cuda"
    assert layouts["ffn"].bundle == {"CPU": 0.25} and layouts["ffn"].device == "cpu"
    assert layouts["router"].bundle == {"CPU": 0.25} and layouts["router"].device == "cpu"
    shared = plan_pools(LocalClusterConfig(ffn_device="cuda"), RayOptions(gpu_share=0.5), machine, [machine])
    assert {p.name: p.bundle.get("GPU") for p in shared} == {"router": None, "attn": None, "ffn": 0.5}
    with pytest.raises(ConfigError, match="gpu_share"):
        RayOptions(gpu_share=0)


def test_kuberay_gpu_pool_on_machines_without_gpus_is_refused() -> None:
    from orchestration.k8s.kuberay import pool_resource

    cpu_workers = [{"CPU": 8.0, pool_resource("attn"): 1.0}, {"CPU": 8.0, pool_resource("ffn"): 1.0}]
    totals = {"CPU": 16.0, pool_resource("attn"): 1.0, pool_resource("ffn"): 1.0}
    with pytest.raises(ConfigError, match=r"pool 'ffn' computes on cuda, but .* no GPU"):
        plan_pools(LocalClusterConfig(ffn_device="cuda"), RayOptions(), totals, cpu_workers)


class _FakeActorClass:
    """Stands in for ray.remote(NodeActor): records .options(...) and the NodeLaunch of .remote(...)."""

    def __init__(self) -> None:
        self.started: list[tuple[dict[str, Any], NodeLaunch]] = []

    def options(self, **options: Any) -> Any:
        outer = self

        class _Bound:
            def remote(self, launch: NodeLaunch) -> Any:
                outer.started.append((options, launch))
                return SimpleNamespace(ready=SimpleNamespace(remote=lambda timeout: None))

        return _Bound()


class _FakePlacement:
    def __init__(self, layout: Any) -> None:
        self.layout, self.used = layout, 0

    def reserve(self, count: int, timeout_s: float) -> list[BundleSlot]:
        self.used += count
        return [BundleSlot(SimpleNamespace(id=self.layout.name), index) for index in range(count)]


def test_ray_actors_of_gpu_pools_ask_for_num_gpus_and_get_the_device() -> None:
    pytest.importorskip("ray")  # _spawn imports Ray's scheduling strategy (no Ray instance is started)
    machine = {"CPU": 16.0, "GPU": 2.0}
    config = LocalClusterConfig(attn=1, ffn=2, attn_device="cuda", ffn_device="cpu")
    cluster = RayCluster(config)
    try:
        cluster.pools = {p.name: _FakePlacement(p) for p in plan_pools(config, cluster.options, machine, [machine])}  # type: ignore[misc]
        cluster._router_address = "127.0.0.1:1"
        fake = cluster._remote_actor = _FakeActorClass()
        cluster._add("attn", 1)
        cluster._add("ffn", 2)
    finally:
        cluster.remove_workdir()
    by_node = {launch.node_id: (options, launch) for options, launch in fake.started}
    assert by_node["attn-0"][0]["num_gpus"] == 1.0 and by_node["attn-0"][1].device == "cuda"
    for node_id in ("ffn-0", "ffn-1"):
        options, launch = by_node[node_id]
        assert options["num_gpus"] == 0 and launch.device == "cpu"


def test_node_launch_refuses_a_device_for_the_router() -> None:
    with pytest.raises(ConfigError, match="router computes nothing on a device"):
        NodeLaunch(node_id="router", role="router", host="127.0.0.1", cluster_token="t", device="cuda")


# ---- afd status --------------------------------------------------------------------------------------------


def test_status_shows_each_nodes_device_name_and_memory() -> None:
    view = {
        "model": "m",
        "placement_version": 1,
        "nodes": [
            {"node_id": "attn-0", "role": "attention", "state": "ready", "device_kind": "NVIDIA H200",
             "device_count": 1, "device_memory_bytes": H200_BYTES, "experts": []},
            {"node_id": "ffn-0", "role": "ffn", "state": "ready", "device_kind": "cpu (8 threads)",
             "device_count": 1, "device_memory_bytes": 32 * 2**30, "experts": [0, 1]},
        ],
    }  # fmt: skip
    console = Console(file=io.StringIO(), force_terminal=True, color_system=None, width=160)
    console.print(cluster_table(view))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "NVIDIA H200, 140.4 GiB" in out
    assert "cpu (8 threads), 32 GiB" in out


# ---- Kubernetes ----------------------------------------------------------------------------------------------


def _containers(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        m["metadata"]["name"]: m["spec"]["template"]["spec"]["containers"][0]
        for m in manifests
        if m["kind"] == "StatefulSet"
    }


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_gpu_attention_cpu_ffn_overlay_gives_the_gpu_to_attention_only() -> None:
    config = load_cluster_config(REPO / "examples" / "cluster.yaml")
    containers = _containers(render(config, "h100-attn-cpu-ffn"))
    attention, ffn = containers["afd-attn"], containers["afd-ffn"]
    assert _flag(attention["args"], "--device") == "cuda" and _flag(attention["args"], "--transport") == "grpc"
    assert attention["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert _flag(ffn["args"], "--device") == "cpu"
    assert "nvidia.com/gpu" not in ffn["resources"]["limits"] and "nvidia.com/gpu" not in ffn["resources"]["requests"]


def test_every_gpu_overlay_starts_gpu_pools_with_device_cuda_and_a_gpu_limit() -> None:
    config = load_cluster_config(REPO / "examples" / "cluster.yaml")
    for name in ("h100-attn-l40s-ffn", "h20-attn-h100-ffn", "pool-per-gpu-kind"):
        for workload, container in _containers(render(config, name)).items():
            assert _flag(container["args"], "--device") == "cuda", (name, workload)
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", (name, workload)


def test_the_ray_overlay_passes_the_pools_devices_to_afd_up() -> None:
    config = load_cluster_config(REPO / "examples" / "cluster.yaml")
    head = render_ray_cluster(get_overlay("ray").apply(config))["spec"]["headGroupSpec"]["template"]["spec"]
    script = head["containers"][0]["args"][0]
    assert "--attn-device cuda --ffn-device cuda" in script
    cpu = render_ray_cluster(get_overlay("cpu-dev").apply(config))["spec"]["headGroupSpec"]["template"]["spec"]
    assert "--attn-device cpu --ffn-device cpu" in cpu["containers"][0]["args"][0]
    gpu_pools = get_overlay("pool-per-gpu-kind").apply(config)
    cpu_pool = gpu_pools.ffn_pools[0].model_copy(update={"accelerator": None})
    mixed = gpu_pools.model_copy(update={"ffn_pools": [cpu_pool, *gpu_pools.ffn_pools[1:]]})
    with pytest.raises(ConfigError, match="pools' devices differ"):
        render_ray_cluster(mixed)
