"""What render produces: the objects, their wiring (selectors, ports, probes, args) and what overlays change."""

from __future__ import annotations

from typing import Any

import pytest

from afd.errors import ConfigError
from orchestration.k8s.config import ClusterConfig, parse_cluster_config
from orchestration.k8s.naming import Manifest, object_key
from orchestration.k8s.overlays import BUILTIN_MODEL_IN_IMAGE, OVERLAYS, render
from orchestration.k8s.render import dump_manifests
from tests.k8s.conftest import minimal_config

pytestmark = pytest.mark.k8s


def by_key(manifests: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    return {object_key(manifest): manifest for manifest in manifests}


def containers(manifests: list[Manifest]) -> dict[str, dict[str, Any]]:
    """Workload name -> its (only) container."""
    result = {}
    for manifest in manifests:
        if manifest["kind"] in ("StatefulSet", "Deployment"):
            [container] = manifest["spec"]["template"]["spec"]["containers"]
            result[manifest["metadata"]["name"]] = container
    return result


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_objects_of_a_two_pool_cluster(two_pool_config: ClusterConfig) -> None:
    objects = by_key(render(two_pool_config))
    assert list(objects) == [
        ("ConfigMap", "afd-config"),
        ("Service", "afd-router"), ("Service", "afd-router-cp"),
        ("Service", "afd-attn"), ("PodDisruptionBudget", "afd-attn"),
        ("Service", "afd-ffn-l40s"), ("PodDisruptionBudget", "afd-ffn-l40s"),
        ("Service", "afd-ffn-a100"), ("PodDisruptionBudget", "afd-ffn-a100"),
        ("Deployment", "afd-router"),
        ("StatefulSet", "afd-attn"), ("StatefulSet", "afd-ffn-l40s"), ("StatefulSet", "afd-ffn-a100"),
    ]  # fmt: skip
    assert all(obj["metadata"]["namespace"] == "serving" for obj in objects.values())
    assert not any(obj["kind"] == "Secret" for obj in objects.values())  # a token never lands in a manifest


def test_every_pool_is_its_own_statefulset_with_matching_service_and_budget(two_pool_config: ClusterConfig) -> None:
    objects = by_key(render(two_pool_config))
    for pool, port in (("attn", 50061), ("ffn-l40s", 50071), ("ffn-a100", 50071)):
        name = f"afd-{pool}"
        stateful_set, service, budget = (
            objects["StatefulSet", name],
            objects["Service", name],
            objects["PodDisruptionBudget", name],
        )
        selector = stateful_set["spec"]["selector"]["matchLabels"]
        assert selector["afd.dev/pool"] == pool
        assert selector.items() <= stateful_set["spec"]["template"]["metadata"]["labels"].items()
        assert service["spec"]["selector"] == selector and budget["spec"]["selector"]["matchLabels"] == selector
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
        assert stateful_set["spec"]["serviceName"] == name and stateful_set["spec"]["podManagementPolicy"] == "Parallel"
        assert budget["spec"]["maxUnavailable"] == 1
        [container] = stateful_set["spec"]["template"]["spec"]["containers"]
        assert container["ports"] == [{"name": "grpc", "containerPort": port, "protocol": "TCP"}]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}
        assert stateful_set["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60
    # Pool selectors are disjoint, so scaling or deleting one pool cannot reach another's pods.
    selectors = [
        tuple(sorted(objects["StatefulSet", f"afd-{p}"]["spec"]["selector"]["matchLabels"].items()))
        for p in ("attn", "ffn-l40s", "ffn-a100")
    ]
    assert len(set(selectors)) == 3


def test_node_command_lines_follow_the_node_contract(two_pool_config: ClusterConfig) -> None:
    by_workload = containers(render(two_pool_config))
    router, attention, ffn = by_workload["afd-router"], by_workload["afd-attn"], by_workload["afd-ffn-a100"]
    assert router["command"] == ["afd"] and router["args"][:2] == ["node", "router"]
    assert (flag(router["args"], "--http-port"), flag(router["args"], "--grpc-port")) == ("8000", "50051")
    assert flag(router["args"], "--cluster-token-file") == "/etc/afd/cluster-token/cluster-token"
    assert router["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert attention["args"][:2] == ["node", "attn"] and ffn["args"][:2] == ["node", "ffn"]
    for node in (attention, ffn):
        args = node["args"]
        assert flag(args, "--router") == "afd-router-cp:50051"
        assert (flag(args, "--node-id"), flag(args, "--advertise-host")) == ("$(POD_NAME)", "$(POD_IP)")
        assert (flag(args, "--host"), flag(args, "--device"), flag(args, "--model")) == (
            "0.0.0.0",
            "cuda",
            "/models/model",
        )
        env = {item["name"]: item["valueFrom"]["fieldRef"]["fieldPath"] for item in node["env"] if "valueFrom" in item}
        assert env == {"POD_NAME": "metadata.name", "POD_IP": "status.podIP", "POD_NAMESPACE": "metadata.namespace"}
    assert (flag(attention["args"], "--transport"), flag(attention["args"], "--microbatches")) == ("nccl", "auto")
    assert "--transport" not in ffn["args"]  # FFN nodes accept every transport the attention nodes speak


def test_accelerator_resources_selectors_and_tolerations(two_pool_config: ClusterConfig) -> None:
    stateful_set = by_key(render(two_pool_config))["StatefulSet", "afd-ffn-l40s"]
    pod = stateful_set["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False


def test_cpu_pools_request_no_device() -> None:
    config = parse_cluster_config(minimal_config())
    for container in containers(render(config)).values():
        assert all("gpu" not in key for key in container["resources"].get("limits", {}))
        assert "--device" not in container["args"] or flag(container["args"], "--device") == "cpu"


@pytest.mark.parametrize(
    ("model", "volume", "model_dir"),
    [
        (
            {"pvc": {"claimName": "ckpt", "subPath": "qwen"}},
            {"name": "model", "persistentVolumeClaim": {"claimName": "ckpt", "readOnly": True}},
            "/models/model",
        ),
        (
            {"hostPath": "/nvme/qwen"},
            {"name": "model", "hostPath": {"path": "/nvme/qwen", "type": "Directory"}},
            "/models/model",
        ),
        ({"imagePath": "/opt/models/qwen"}, None, "/opt/models/qwen"),
    ],
)
def test_model_locations(model: dict[str, Any], volume: Manifest | None, model_dir: str) -> None:
    manifests = render(parse_cluster_config(minimal_config(model=model)))
    stateful_set = by_key(manifests)["StatefulSet", "afd-attn"]
    pod = stateful_set["spec"]["template"]["spec"]
    volumes = [v for v in pod["volumes"] if v["name"] == "model"]
    assert volumes == ([volume] if volume else [])
    assert flag(pod["containers"][0]["args"], "--model") == model_dir
    mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "model"]
    if volume:
        assert mounts[0]["readOnly"] is True and mounts[0]["mountPath"] == "/models/model"
        assert mounts[0].get("subPath") == model.get("pvc", {}).get("subPath")
    else:
        assert mounts == []


def test_config_map_carries_the_config_and_no_secret() -> None:
    config = parse_cluster_config(minimal_config(clusterTokenSecret="my-token", router={"apiKeySecret": "api-keys"}))
    objects = by_key(render(config))
    text = objects["ConfigMap", "afd-config"]["data"]["cluster.yaml"]
    assert parse_cluster_config(__import__("yaml").safe_load(text)) == config
    router = containers(list(objects.values()))["afd-router"]
    assert flag(router["args"], "--api-key-file") == "/etc/afd/api-key/api-key"
    pod = objects["Deployment", "afd-router"]["spec"]["template"]["spec"]
    secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"my-token", "api-keys"}


def test_hpa_autoscaling_leaves_replicas_to_the_autoscaler() -> None:
    config = parse_cluster_config(
        minimal_config(attention={"autoscaling": {"maxReplicas": 6, "targetWaitingPerReplica": 4}})
    )
    objects = by_key(render(config))
    assert "replicas" not in objects["StatefulSet", "afd-attn"]["spec"]
    assert objects["StatefulSet", "afd-ffn"]["spec"]["replicas"] == 2
    hpa = objects["HorizontalPodAutoscaler", "afd-attn"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "afd-attn"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 6)
    [metric] = hpa["metrics"]
    assert metric["object"]["describedObject"] == {"apiVersion": "v1", "kind": "Service", "name": "afd-router"}
    assert metric["object"]["target"] == {"type": "AverageValue", "averageValue": "4"}


def test_keda_autoscaling_renders_a_scaled_object_on_the_waiting_queue() -> None:
    config = parse_cluster_config(minimal_config(attention={"autoscaling": {"provider": "keda"}}))
    objects = by_key(render(config))
    assert ("HorizontalPodAutoscaler", "afd-attn") not in objects
    scaled = objects["ScaledObject", "afd-attn"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == 'sum(vllm:num_requests_waiting{namespace="afd",service="afd-router"})'
    assert all(isinstance(value, str) for value in trigger["metadata"].values())  # KEDA metadata is map[string]string


def test_overlay_cpu_dev_puts_everything_on_cpu(example_config: ClusterConfig) -> None:
    manifests = render(example_config, "cpu-dev")
    for name, container in containers(manifests).items():
        assert container["image"] == "registry.example.com/afd:0.1.0-cpu", name
        assert flag(container["args"], "--model") == BUILTIN_MODEL_IN_IMAGE
        assert not any("gpu" in key for key in container["resources"].get("limits", {}))
        if name != "afd-router":
            assert flag(container["args"], "--device") == "cpu"
    for manifest in manifests:
        if manifest["kind"] == "StatefulSet":
            pod = manifest["spec"]["template"]["spec"]
            assert "nodeSelector" not in pod and "tolerations" not in pod
            assert all(volume["name"] not in ("model", "dshm") for volume in pod["volumes"])


@pytest.mark.parametrize(
    ("overlay", "attention", "ffn"),
    [
        ("h100-attn-l40s-ffn", "NVIDIA-H100-80GB-HBM3", "NVIDIA-L40S"),
        ("h20-attn-h100-ffn", "NVIDIA-H20", "NVIDIA-H100-80GB-HBM3"),
    ],
)
def test_hardware_mix_overlays_pin_each_pool_to_its_gpu(
    example_config: ClusterConfig, overlay: str, attention: str, ffn: str
) -> None:
    objects = by_key(render(example_config, overlay))
    product = "nvidia.com/gpu.product"
    assert objects["StatefulSet", "afd-attn"]["spec"]["template"]["spec"]["nodeSelector"] == {product: attention}
    assert objects["StatefulSet", "afd-ffn"]["spec"]["template"]["spec"]["nodeSelector"] == {product: ffn}
    assert flag(containers(list(objects.values()))["afd-attn"]["args"], "--transport") == "nccl"


def test_pool_per_gpu_kind_makes_one_ffn_pool_per_kind(example_config: ClusterConfig) -> None:
    objects = by_key(render(example_config, "pool-per-gpu-kind"))
    pools = {name: obj for (kind, name), obj in objects.items() if kind == "StatefulSet" and name != "afd-attn"}
    products = {
        name: obj["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] for name, obj in pools.items()
    }
    assert products == {
        "afd-ffn-h100": "NVIDIA-H100-80GB-HBM3",
        "afd-ffn-a100": "NVIDIA-A100-SXM4-80GB",
        "afd-ffn-l40s": "NVIDIA-L40S",
    }
    assert {name: obj["spec"]["replicas"] for name, obj in pools.items()} == dict.fromkeys(products, 2)


def test_ray_overlay_is_a_raycluster_with_a_worker_group_per_pool(two_pool_config: ClusterConfig) -> None:
    manifests = render(two_pool_config, "ray")
    assert [object_key(m) for m in manifests] == [("ConfigMap", "afd-config"), ("RayCluster", "afd")]
    spec = manifests[1]["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "afd up --ray --model /models/model --attn 1 --ffn 5 --transport nccl" in head["args"][0]
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert list(groups) == ["attn", "ffn-l40s", "ffn-a100"]
    assert groups["ffn-a100"]["replicas"] == 3
    assert groups["ffn-a100"]["rayStartParams"]["resources"] == '"{\\"afd_pool_ffn_a100\\": 1}"'
    assert groups["ffn-l40s"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L40S"}


def test_unknown_overlay_lists_the_known_ones(example_config: ClusterConfig) -> None:
    with pytest.raises(ConfigError, match=f"unknown overlay 'tpu-v5'; overlays: {', '.join(OVERLAYS)}"):
        render(example_config, "tpu-v5")


def test_dump_is_a_multi_document_stream_without_yaml_anchors(example_config: ClusterConfig) -> None:
    text = dump_manifests(render(example_config), header="title")
    assert text.startswith("# title\n") and "&id" not in text and "*id" not in text
    import yaml

    assert [doc for doc in yaml.safe_load_all(text) if doc] == render(example_config)
