"""apply / scale / status / delete with the official kubernetes client against kmock's API emulator over HTTP."""

from __future__ import annotations

import base64
import socket

import kmock
import pytest
from kubernetes import client as k8s

from afd.errors import ConfigError
from orchestration.k8s.client import ClusterClient
from orchestration.k8s.config import ClusterConfig, parse_cluster_config
from orchestration.k8s.kubeapi import KubeConflictError, KubeConnectionError, KubeForbiddenError, KubeNotFoundError
from orchestration.k8s.naming import object_key
from orchestration.k8s.overlays import render
from tests.k8s.apiserver import RunningApiServer
from tests.k8s.conftest import minimal_config

pytestmark = pytest.mark.k8s

STATEFULSETS = ("apps", "v1", "statefulsets")
DEPLOYMENTS = ("apps", "v1", "deployments")
SERVICES = ("", "v1", "services")
CONFIGMAPS = ("", "v1", "configmaps")
SECRETS = ("", "v1", "secrets")
PDBS = ("policy", "v1", "poddisruptionbudgets")
ALL = {"StatefulSet": STATEFULSETS, "Deployment": DEPLOYMENTS, "Service": SERVICES, "ConfigMap": CONFIGMAPS,
       "Secret": SECRETS, "PodDisruptionBudget": PDBS}  # fmt: skip


def create_namespace(api_client: k8s.ApiClient, name: str) -> None:
    k8s.CoreV1Api(api_client).create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def stored_keys(server: RunningApiServer, namespace: str) -> set[tuple[str, str]]:
    return {(kind, name) for kind, resource in ALL.items() for name in server.stored(*resource, namespace)}


def test_apply_creates_exactly_the_rendered_objects_and_a_token_secret(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    create_namespace(api_client, "serving")
    changes = cluster_client.apply(two_pool_config)

    rendered = {object_key(manifest): manifest for manifest in render(two_pool_config)}
    assert {(c.kind, c.name) for c in changes} == set(rendered) | {("Secret", "afd-cluster-token")}
    assert {c.action for c in changes} == {"created"}
    assert stored_keys(api_server, "serving") == set(rendered) | {("Secret", "afd-cluster-token")}
    assert set(api_server.stored(*STATEFULSETS, "serving")) == {"afd-attn", "afd-ffn-l40s", "afd-ffn-a100"}
    assert set(api_server.stored(*SERVICES, "serving")) == {
        "afd-router",
        "afd-router-cp",
        "afd-attn",
        "afd-ffn-l40s",
        "afd-ffn-a100",
    }
    # What reached the server is exactly what render produced (the client's model round trip loses nothing).
    for (kind, name), manifest in rendered.items():
        assert api_server.stored(*ALL[kind], "serving")[name] == manifest, (kind, name)

    ffn_a100 = api_server.stored(*STATEFULSETS, "serving")["afd-ffn-a100"]
    assert ffn_a100["spec"]["replicas"] == 3
    assert ffn_a100["metadata"]["labels"]["afd.dev/pool"] == "ffn-a100"
    pod = ffn_a100["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["containers"][0]["readinessProbe"] == {
        "grpc": {"port": 50071},
        "periodSeconds": 5,
        "failureThreshold": 3,
    }

    secret = api_server.stored(*SECRETS, "serving")["afd-cluster-token"]
    assert secret["metadata"]["labels"]["app.kubernetes.io/instance"] == "afd"
    assert len(secret["stringData"]["cluster-token"]) >= 32
    creates = [
        request for request in api_server.requests() if request.method == "POST" and request.resource is not None
    ]
    assert creates and all(request.params.get("fieldManager") == "afd" for request in creates)


def test_apply_again_updates_in_place_with_server_side_apply_and_keeps_the_token(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    create_namespace(api_client, "serving")
    cluster_client.apply(two_pool_config)
    token = api_server.stored(*SECRETS, "serving")["afd-cluster-token"]["stringData"]["cluster-token"]
    before = len(api_server.requests())

    data = two_pool_config.model_dump(mode="json", by_alias=True)
    data["image"] = "registry.example.com/afd:next"
    data["ffnPools"][0]["replicas"] = 5
    changes = cluster_client.apply(parse_cluster_config(data))

    assert {c.action for c in changes if c.kind != "Secret"} == {"configured"}
    assert [c.action for c in changes if c.kind == "Secret"] == ["kept"]
    stored = api_server.stored(*STATEFULSETS, "serving")
    assert stored["afd-ffn-l40s"]["spec"]["replicas"] == 5
    assert stored["afd-attn"]["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/afd:next"
    assert api_server.stored(*SECRETS, "serving")["afd-cluster-token"]["stringData"]["cluster-token"] == token
    patches = [r for r in api_server.requests()[before:] if r.method == "PATCH"]
    assert len(patches) == len(render(two_pool_config))
    for request in patches:
        assert request.headers["Content-Type"] == "application/apply-patch+yaml"
        assert request.params["fieldManager"] == "afd" and request.params["force"] == "true"


def test_apply_prunes_the_objects_of_a_pool_removed_from_the_config(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    create_namespace(api_client, "serving")
    cluster_client.apply(two_pool_config)
    data = two_pool_config.model_dump(mode="json", by_alias=True)
    data["ffnPools"] = data["ffnPools"][:1]
    changes = cluster_client.apply(parse_cluster_config(data))

    pruned = {(c.kind, c.name) for c in changes if c.action == "pruned"}
    assert pruned == {
        ("StatefulSet", "afd-ffn-a100"),
        ("PodDisruptionBudget", "afd-ffn-a100"),
        ("Service", "afd-ffn-a100"),
    }
    assert set(api_server.stored(*STATEFULSETS, "serving")) == {"afd-attn", "afd-ffn-l40s"}


def test_scaling_one_ffn_pool_from_2_to_4_touches_only_that_pools_scale(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    create_namespace(api_client, "serving")
    cluster_client.apply(two_pool_config)
    before = len(api_server.requests())

    result = cluster_client.scale(two_pool_config, "ffn-l40s", 4)

    assert (result.pool, result.workload, result.previous, result.replicas) == ("ffn-l40s", "afd-ffn-l40s", 2, 4)
    requests = api_server.requests()[before:]
    assert [(r.method, r.url.path) for r in requests] == [
        ("GET", "/apis/apps/v1/namespaces/serving/statefulsets/afd-ffn-l40s/scale"),
        ("PATCH", "/apis/apps/v1/namespaces/serving/statefulsets/afd-ffn-l40s/scale"),
    ]
    assert requests[1].data == {"spec": {"replicas": 4}}
    replicas = {name: obj["spec"]["replicas"] for name, obj in api_server.stored(*STATEFULSETS, "serving").items()}
    assert replicas == {"afd-attn": 1, "afd-ffn-l40s": 4, "afd-ffn-a100": 3}

    attention = cluster_client.scale(two_pool_config, "attn", 2)
    assert (attention.previous, attention.replicas, attention.warning) == (1, 2, None)
    replicas = {name: obj["spec"]["replicas"] for name, obj in api_server.stored(*STATEFULSETS, "serving").items()}
    assert replicas == {"afd-attn": 2, "afd-ffn-l40s": 4, "afd-ffn-a100": 3}


def test_scale_rejects_bad_pools_and_counts_before_any_request(
    api_server: RunningApiServer, cluster_client: ClusterClient, two_pool_config: ClusterConfig
) -> None:
    with pytest.raises(ConfigError, match=r"unknown pool 'ffn'; pools of cluster 'afd': attn, ffn-l40s, ffn-a100"):
        cluster_client.scale(two_pool_config, "ffn", 2)
    with pytest.raises(ConfigError, match="the router runs exactly one replica"):
        cluster_client.scale(two_pool_config, "router", 2)
    with pytest.raises(ConfigError, match="--replicas must be >= 0, got -1"):
        cluster_client.scale(two_pool_config, "attn", -1)
    assert api_server.requests() == []


def test_scale_of_a_cluster_never_applied_is_not_found_and_names_the_statefulset(
    cluster_client: ClusterClient, two_pool_config: ClusterConfig
) -> None:
    with pytest.raises(KubeNotFoundError) as caught:
        cluster_client.scale(two_pool_config, "ffn-a100", 4)
    message = str(caught.value)
    assert "StatefulSet scale serving/afd-ffn-a100" in message and "HTTP 404" in message
    assert "Apply the cluster first (afd k8s apply)" in message


def test_status_reports_desired_and_ready_replicas_of_each_pool(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    create_namespace(api_client, "serving")
    cluster_client.apply(two_pool_config)
    # Play the controllers: they report progress through the /status subresource.
    apps = k8s.AppsV1Api(api_client)
    apps.patch_namespaced_stateful_set_status(
        "afd-attn", "serving", {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}}
    )
    apps.patch_namespaced_stateful_set_status(
        "afd-ffn-l40s", "serving", {"status": {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 2}}
    )
    apps.patch_namespaced_deployment_status(
        "afd-router", "serving", {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}}
    )

    status = cluster_client.status(two_pool_config)

    table = {
        w.pool if w.pool != "-" else w.role: (w.kind, w.name, w.desired, w.ready, w.state) for w in status.workloads
    }
    assert table == {
        "router": ("Deployment", "afd-router", 1, 1, "ready"),
        "attn": ("StatefulSet", "afd-attn", 1, 1, "ready"),
        "ffn-l40s": ("StatefulSet", "afd-ffn-l40s", 2, 1, "progressing"),
        "ffn-a100": ("StatefulSet", "afd-ffn-a100", 3, 0, "progressing"),
    }
    products = ["NVIDIA-H100-80GB-HBM3", "NVIDIA-L40S", "NVIDIA-A100-SXM4-80GB"]
    assert [w.accelerator for w in status.workloads][1:] == [f"1x nvidia.com/gpu ({product})" for product in products]
    assert status.token_secret == "afd-cluster-token" and status.token_secret_present
    token = api_server.stored(*SECRETS, "serving")["afd-cluster-token"]["stringData"]["cluster-token"]
    assert token not in repr(status.to_dict())
    assert status.api_url == "http://afd-router.serving.svc:8000"


def test_status_shows_absent_workloads_and_leftovers_outside_the_config(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    fresh = cluster_client.status(two_pool_config)
    assert {w.state for w in fresh.workloads} == {"absent"} and not fresh.token_secret_present

    create_namespace(api_client, "serving")
    cluster_client.apply(two_pool_config)
    data = two_pool_config.model_dump(mode="json", by_alias=True)
    data["ffnPools"] = data["ffnPools"][:1]
    status = cluster_client.status(parse_cluster_config(data))
    leftovers = [(w.name, w.state) for w in status.workloads if not w.in_config]
    assert leftovers == [("afd-ffn-a100", "not in config (apply prunes it)")]


def test_delete_removes_everything_apply_created_and_nothing_else(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    create_namespace(api_client, "serving")
    core = k8s.CoreV1Api(api_client)
    core.create_namespaced_config_map(
        "serving", {"metadata": {"name": "unrelated", "labels": {"app": "other"}}, "data": {"k": "v"}}
    )
    core.create_namespaced_secret("serving", {"metadata": {"name": "user-secret"}, "stringData": {"k": "v"}})
    blue = parse_cluster_config({**two_pool_config.model_dump(mode="json", by_alias=True), "name": "blue"})
    cluster_client.apply(blue)  # another AFD cluster in the same namespace
    pre_existing = stored_keys(api_server, "serving")
    cluster_client.apply(two_pool_config)
    created = stored_keys(api_server, "serving") - pre_existing
    assert len(created) == len(render(two_pool_config)) + 1

    changes = cluster_client.delete(two_pool_config)

    assert {(c.kind, c.name) for c in changes} == created
    assert stored_keys(api_server, "serving") == pre_existing
    deletes = [r for r in api_server.requests() if r.method == "DELETE"]
    assert all(r.name.startswith("afd-") for r in deletes)
    assert cluster_client.delete(two_pool_config) == []


def test_delete_keeps_a_token_secret_the_user_provided(
    api_server: RunningApiServer, api_client: k8s.ApiClient, cluster_client: ClusterClient
) -> None:
    create_namespace(api_client, "afd")
    token = {"cluster-token": base64.b64encode(b"s3cret").decode()}  # as the server stores it
    k8s.CoreV1Api(api_client).create_namespaced_secret("afd", {"metadata": {"name": "my-token"}, "data": token})
    config = parse_cluster_config(minimal_config(clusterTokenSecret="my-token"))
    changes = cluster_client.apply(config)
    assert ("Secret", "my-token", "kept") in [(c.kind, c.name, c.action) for c in changes]
    stateful_set = api_server.stored(*STATEFULSETS, "afd")["afd-attn"]
    volumes = stateful_set["spec"]["template"]["spec"]["volumes"]
    assert {"name": "cluster-token", "secret": {"secretName": "my-token", "defaultMode": 0o440,
            "items": [{"key": "cluster-token", "path": "cluster-token"}]}} in volumes  # fmt: skip

    cluster_client.delete(config)
    assert set(api_server.stored(*SECRETS, "afd")) == {"my-token"}
    assert api_server.stored(*STATEFULSETS, "afd") == {}


def test_apply_refuses_to_take_over_an_object_it_does_not_own(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    create_namespace(api_client, "serving")
    k8s.CoreV1Api(api_client).create_namespaced_config_map(
        "serving", {"metadata": {"name": "afd-config"}, "data": {"mine": "yes"}}
    )
    with pytest.raises(KubeConflictError) as caught:
        cluster_client.apply(two_pool_config)
    message = str(caught.value)
    assert message.startswith(
        "cannot update ConfigMap serving/afd-config: it already exists and is not managed by this afd cluster"
    )
    assert "(HTTP 409)" in message and "app.kubernetes.io/instance=afd" in message
    assert api_server.stored(*CONFIGMAPS, "serving")["afd-config"]["data"] == {"mine": "yes"}
    assert not any(r.method == "PATCH" for r in api_server.requests())


def test_a_409_from_the_api_server_names_the_object(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    create_namespace(api_client, "serving")
    cluster_client.apply(two_pool_config)
    detail = 'Operation cannot be fulfilled on statefulsets.apps "afd-attn": the object has been modified'
    api_server.emulator["patch", kmock.resource(*STATEFULSETS)] << kmock.KubernetesError(
        status=409, reason="Conflict", message=detail
    )
    with pytest.raises(KubeConflictError) as caught:
        cluster_client.apply(two_pool_config)
    assert str(caught.value) == f"cannot update StatefulSet serving/afd-attn: {detail} (HTTP 409)"


def test_a_403_names_the_object_and_the_missing_permission(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    create_namespace(api_client, "serving")
    detail = 'statefulsets.apps is forbidden: User "dev" cannot create resource "statefulsets" in API group "apps"'
    api_server.emulator["post", kmock.resource(*STATEFULSETS)] << kmock.KubernetesError(
        status=403, reason="Forbidden", message=detail
    )
    with pytest.raises(KubeForbiddenError) as caught:
        cluster_client.apply(two_pool_config)
    message = str(caught.value)
    assert message.startswith(
        f"cannot create StatefulSet serving/afd-attn: {detail} (HTTP 403). The kubeconfig user needs"
    )
    assert "statefulsets/scale" in message


def test_a_missing_namespace_is_a_clear_error_unless_asked_to_create_it(
    api_server: RunningApiServer, cluster_client: ClusterClient, two_pool_config: ClusterConfig
) -> None:
    with pytest.raises(KubeNotFoundError) as caught:
        cluster_client.apply(two_pool_config)
    assert str(caught.value) == (
        "cannot use Namespace serving: it does not exist (HTTP 404). "
        "Create it (kubectl create namespace serving) or pass --create-namespace"
    )
    assert api_server.stored(*STATEFULSETS, "serving") == {}

    cluster_client.apply(two_pool_config, create_namespace=True)
    assert set(api_server.emulator.namespaces) == {"serving"}
    assert len(api_server.stored(*STATEFULSETS, "serving")) == 3


def test_a_missing_user_token_secret_is_not_found_with_the_command_to_create_it(
    api_client: k8s.ApiClient, cluster_client: ClusterClient
) -> None:
    create_namespace(api_client, "afd")
    config = parse_cluster_config(minimal_config(clusterTokenSecret="my-token"))
    with pytest.raises(KubeNotFoundError) as caught:
        cluster_client.apply(config)
    message = str(caught.value)
    assert message.startswith("cannot read Secret afd/my-token:") and "(HTTP 404)" in message
    assert "kubectl -n afd create secret generic my-token --from-literal=cluster-token=" in message


def test_an_unreachable_api_server_is_a_connection_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens there
    configuration = k8s.Configuration(host=f"http://127.0.0.1:{port}")
    configuration.retries = 0
    with k8s.ApiClient(configuration) as api_client, pytest.raises(KubeConnectionError, match=f"127.0.0.1:{port}"):
        ClusterClient(api_client).status(parse_cluster_config(minimal_config()))


def test_switching_to_the_ray_overlay_prunes_the_statefulsets_and_creates_a_raycluster(
    api_server: RunningApiServer,
    api_client: k8s.ApiClient,
    cluster_client: ClusterClient,
    two_pool_config: ClusterConfig,
) -> None:
    create_namespace(api_client, "serving")
    cluster_client.apply(two_pool_config)
    changes = cluster_client.apply(two_pool_config, overlay="ray")

    assert ("RayCluster", "afd", "created") in [(c.kind, c.name, c.action) for c in changes]
    assert {c.kind for c in changes if c.action == "pruned"} == {
        "StatefulSet",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
    }
    assert stored_keys(api_server, "serving") == {("ConfigMap", "afd-config"), ("Secret", "afd-cluster-token")}
    ray_cluster = api_server.stored("ray.io", "v1", "rayclusters", "serving")["afd"]
    assert ray_cluster == next(m for m in render(two_pool_config, "ray") if m["kind"] == "RayCluster")

    status = cluster_client.status(two_pool_config, overlay="ray")
    assert [(w.kind, w.name, w.exists) for w in status.workloads] == [("RayCluster", "afd", True)]
    with pytest.raises(ConfigError, match="with the ray overlay, KubeRay owns the pods"):
        cluster_client.scale(two_pool_config, "attn", 2, overlay="ray")

    deleted = cluster_client.delete(two_pool_config)
    assert {(c.kind, c.name) for c in deleted} == {
        ("RayCluster", "afd"),
        ("ConfigMap", "afd-config"),
        ("Secret", "afd-cluster-token"),
    }
    assert api_server.stored("ray.io", "v1", "rayclusters", "serving") == {}


def test_an_autoscaled_attention_pool_gets_its_hpa_and_scale_warns(
    api_server: RunningApiServer, api_client: k8s.ApiClient, cluster_client: ClusterClient
) -> None:
    create_namespace(api_client, "afd")
    config = parse_cluster_config(minimal_config(attention={"autoscaling": {"minReplicas": 1, "maxReplicas": 3}}))
    cluster_client.apply(config)
    hpa = api_server.stored("autoscaling", "v2", "horizontalpodautoscalers", "afd")["afd-attn"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "afd-attn"
    k8s.AutoscalingV2Api(api_client).patch_namespaced_horizontal_pod_autoscaler_status(
        "afd-attn", "afd", {"status": {"currentReplicas": 2, "desiredReplicas": 3}}
    )
    assert cluster_client.status(config).autoscaler == "HPA 1..3: current 2, desired 3"

    result = cluster_client.scale(config, "attn", 2)
    assert result.warning == "the attention pool is autoscaled (hpa); it will override this count"

    keda = parse_cluster_config(minimal_config(attention={"autoscaling": {"provider": "keda"}}))
    changes = cluster_client.apply(keda)
    assert ("ScaledObject", "afd-attn", "created") in [(c.kind, c.name, c.action) for c in changes]
    assert ("HorizontalPodAutoscaler", "afd-attn", "pruned") in [(c.kind, c.name, c.action) for c in changes]
    assert set(api_server.stored("keda.sh", "v1alpha1", "scaledobjects", "afd")) == {"afd-attn"}
