"""ClusterConfig -> Kubernetes manifests (plain dicts, in apply order).

What one cluster is made of:
- `<name>-config` ConfigMap: the validated cluster config, mounted read-only at /etc/afd/cluster.
- `<name>-router` Deployment (one replica, Recreate: the router holds the membership, two must never run) and a
  ClusterIP Service with the OpenAI API (http) and the control plane (grpc), gated by the router's /health.
- `<name>-router-cp` headless Service that publishes the router before it is ready: nodes register through it,
  and the router may only report ready once nodes have registered, so gating their address on readiness
  could deadlock.
- per pool (`attn` and every FFN pool): a StatefulSet (stable node ids from pod names, /scale subresource so
  each pool scales alone, Parallel pod management because nodes load weights independently), a headless
  Service for discovery and a PodDisruptionBudget (one node of a pool drains at a time).
- optional autoscaling of the attention pool on the router's vllm:num_requests_waiting: an HPA or a KEDA
  ScaledObject.
- optional `monitoring`: a ServiceMonitor or PodMonitor of the router (orchestration/k8s/monitoring.py).
The cluster token Secret is not rendered: a committed manifest must never carry a token. `afd k8s apply`
creates it (random) when the config names none; with plain kubectl, create it first (the README, "Run on Kubernetes").
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from orchestration.k8s.autoscaling import render_autoscaler
from orchestration.k8s.config import ATTENTION_POOL, AttentionPool, ClusterConfig, FfnPool, Placement, Resources
from orchestration.k8s.monitoring import render_monitor
from orchestration.k8s.naming import (
    API_KEY_DIR,
    API_KEY_KEY,
    CONFIG_DIR,
    CONFIG_KEY,
    MODEL_MOUNT,
    SHM_SIZE,
    TOKEN_DIR,
    TOKEN_KEY,
    Manifest,
    config_map_name,
    labels,
    metadata,
    router_control_plane_name,
    router_name,
    selector,
    token_secret_name,
    workload_name,
)


def model_dir(config: ClusterConfig) -> str:
    return config.model.image_path or MODEL_MOUNT


def container_resources(resources: Resources, accelerator: tuple[str, int] | None) -> Manifest:
    requests = dict(resources.requests)
    limits = dict(resources.limits)
    if accelerator is not None:
        # Extended resources cannot be overcommitted: requests, when given, must equal limits.
        requests[accelerator[0]] = str(accelerator[1])
        limits[accelerator[0]] = str(accelerator[1])
    result: Manifest = {}
    if requests:
        result["requests"] = requests
    if limits:
        result["limits"] = limits
    return result


def _model_volume(config: ClusterConfig) -> tuple[list[Manifest], list[Manifest]]:
    model = config.model
    if model.image_path is not None:
        return [], []
    mount: Manifest = {"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}
    if model.pvc is not None:
        volume: Manifest = {
            "name": "model",
            "persistentVolumeClaim": {"claimName": model.pvc.claim_name, "readOnly": True},
        }
        if model.pvc.sub_path:
            mount["subPath"] = model.pvc.sub_path
    else:
        volume = {"name": "model", "hostPath": {"path": model.host_path, "type": "Directory"}}
    return [volume], [mount]


def common_volumes(config: ClusterConfig, accelerated: bool) -> tuple[list[Manifest], list[Manifest]]:
    volumes, mounts = _model_volume(config)
    volumes += [
        {
            "name": "cluster-token",
            "secret": {
                "secretName": token_secret_name(config),
                "defaultMode": 0o440,
                "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}],
            },
        },
        {"name": "cluster-config", "configMap": {"name": config_map_name(config)}},
    ]
    mounts += [
        {"name": "cluster-token", "mountPath": TOKEN_DIR, "readOnly": True},
        {"name": "cluster-config", "mountPath": CONFIG_DIR, "readOnly": True},
    ]
    if accelerated:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def downward_env(extra: dict[str, str]) -> list[Manifest]:
    env: list[Manifest] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    env += [{"name": key, "value": value} for key, value in sorted(extra.items())]
    return env


def _grpc_probes(port: int) -> Manifest:
    # Weights load before the health service reports SERVING; the startup probe allows 15 minutes for it.
    return {
        "startupProbe": {"grpc": {"port": port}, "periodSeconds": 10, "failureThreshold": 90},
        "readinessProbe": {"grpc": {"port": port}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"grpc": {"port": port}, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 6},
    }


CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def pod_spec(
    config: ClusterConfig,
    placement: Placement,
    container: Manifest,
    volumes: list[Manifest],
    accelerator_product: tuple[str, str] | None = None,
    accelerator_resource: str | None = None,
) -> Manifest:
    spec: Manifest = {}
    if config.service_account:
        spec["serviceAccountName"] = config.service_account
    spec["automountServiceAccountToken"] = False  # no AFD process talks to the Kubernetes API
    spec["terminationGracePeriodSeconds"] = config.termination_grace_period_seconds
    uid = config.run_as_user
    spec["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if config.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": name} for name in config.image_pull_secrets]
    node_selector = dict(placement.node_selector)
    if accelerator_product is not None:
        node_selector[accelerator_product[0]] = accelerator_product[1]
    if node_selector:
        spec["nodeSelector"] = node_selector
    tolerations = [toleration.model_dump(by_alias=True, exclude_none=True) for toleration in placement.tolerations]
    if accelerator_resource is not None:
        # GPU node pools are commonly tainted with the device's resource name.
        automatic = {"key": accelerator_resource, "operator": "Exists", "effect": "NoSchedule"}
        if automatic not in tolerations:
            tolerations.append(automatic)
    if tolerations:
        spec["tolerations"] = tolerations
    spec["containers"] = [container]
    spec["volumes"] = volumes
    return spec


def render_config_map(config: ClusterConfig) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(config, config_map_name(config), labels(config, "config")),
        "data": {CONFIG_KEY: config.to_yaml()},
    }


def render_router(config: ClusterConfig) -> list[Manifest]:
    """The router's client Service, control-plane Service and Deployment."""
    router = config.router
    name = router_name(config)
    router_labels = labels(config, "router")
    router_selector = selector(config, "router")
    args = [
        "node", "router", "--model", model_dir(config), "--host", "0.0.0.0",
        "--http-port", str(router.http_port), "--grpc-port", str(router.grpc_port),
    ]  # fmt: skip
    if config.model.name:
        args += ["--served-model-name", config.model.name]
    args += ["--cluster-token-file", f"{TOKEN_DIR}/{TOKEN_KEY}"]
    volumes, mounts = common_volumes(config, accelerated=False)
    if router.api_key_secret:
        args += ["--api-key-file", f"{API_KEY_DIR}/{API_KEY_KEY}"]
        volumes.append(
            {
                "name": "api-key",
                "secret": {
                    "secretName": router.api_key_secret,
                    "defaultMode": 0o440,
                    "items": [{"key": API_KEY_KEY, "path": API_KEY_KEY}],
                },
            }
        )
        mounts.append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
    args += router.extra_args
    container: Manifest = {
        "name": "router",
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["afd"],
        "args": args,
        "env": downward_env({}),
        "ports": [
            {"name": "http", "containerPort": router.http_port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": router.grpc_port, "protocol": "TCP"},
        ],
        "startupProbe": {"grpc": {"port": router.grpc_port}, "periodSeconds": 5, "failureThreshold": 60},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {
            "grpc": {"port": router.grpc_port},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "resources": container_resources(router.resources, None),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mounts,
    }
    ports = [
        {"name": "http", "port": router.http_port, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"},
        {"name": "grpc", "port": router.grpc_port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
    ]
    # Scraped through the Service (not the pod) so series carry the `service` label that the HPA's Object
    # metric and the KEDA query select on.
    scrape = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(router.http_port),
        "prometheus.io/path": "/metrics",
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {**metadata(config, name, router_labels), "annotations": scrape},
        "spec": {"type": router.service_type, "selector": router_selector, "ports": ports},
    }
    control_plane = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(config, router_control_plane_name(config), router_labels),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": router_selector,
            "ports": ports[1:],
        },
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(config, name, router_labels),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": router_selector},
            "template": {
                "metadata": {"labels": router_labels},
                "spec": pod_spec(config, router, container, volumes),
            },
        },
    }
    return [service, control_plane, deployment]


def _node_args(config: ClusterConfig, pool: AttentionPool | FfnPool, role: str) -> list[str]:
    args = [
        "node", role, "--model", model_dir(config),
        "--router", f"{router_control_plane_name(config)}:{config.router.grpc_port}",
        "--host", "0.0.0.0", "--port", str(pool.port),
        "--node-id", "$(POD_NAME)", "--advertise-host", "$(POD_IP)",
    ]  # fmt: skip
    if isinstance(pool, AttentionPool):
        args += ["--transport", pool.transport, "--microbatches", str(pool.microbatches)]
    args += ["--device", pool.device, "--cluster-token-file", f"{TOKEN_DIR}/{TOKEN_KEY}"]
    return args + pool.extra_args


def render_pool(config: ClusterConfig, pool: AttentionPool | FfnPool) -> list[Manifest]:
    """The headless Service, PodDisruptionBudget and StatefulSet of one pool."""
    is_attention = isinstance(pool, AttentionPool)
    pool_name = ATTENTION_POOL if is_attention else pool.name  # type: ignore[union-attr]
    role, component = ("attn", "attention") if is_attention else ("ffn", "ffn")
    name = workload_name(config, pool_name)
    pool_labels = labels(config, component, pool_name)
    pool_selector = selector(config, component, pool_name)
    accelerator = pool.accelerator
    volumes, mounts = common_volumes(config, accelerated=accelerator is not None)
    container: Manifest = {
        "name": role,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["afd"],
        "args": _node_args(config, pool, role),
        "env": downward_env(pool.env),
        "ports": [{"name": "grpc", "containerPort": pool.port, "protocol": "TCP"}],
        **_grpc_probes(pool.port),
        "resources": container_resources(
            pool.resources, None if accelerator is None else (accelerator.resource, accelerator.count)
        ),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mounts,
    }
    product = (
        None if accelerator is None or accelerator.product is None else (accelerator.product_label, accelerator.product)
    )
    template_spec = pod_spec(
        config, pool, container, volumes, product, None if accelerator is None else accelerator.resource
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(config, name, pool_labels),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": pool_selector,
            "ports": [
                {"name": "grpc", "port": pool.port, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
            ],
        },
    }
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(config, name, pool_labels),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": pool_selector},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
    spec: Manifest = {"serviceName": name}
    autoscaled = is_attention and pool.autoscaling is not None  # type: ignore[union-attr]
    if not autoscaled:
        # With an autoscaler the replica count is its business; leaving it out keeps apply from resetting it.
        spec["replicas"] = pool.replicas
    spec.update(
        {
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "selector": {"matchLabels": pool_selector},
            "template": {"metadata": {"labels": pool_labels}, "spec": template_spec},
        }
    )
    stateful_set = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(config, name, pool_labels),
        "spec": spec,
    }
    return [service, budget, stateful_set]


def render_token_secret(config: ClusterConfig, token: str) -> Manifest:
    """The generated cluster token Secret (only `afd k8s apply` calls this; never written to disk)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(config, token_secret_name(config), labels(config, "cluster-token")),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: token},
    }


def render_manifests(config: ClusterConfig) -> list[Manifest]:
    """Every object of the cluster, in apply order (config, services and budgets, then workloads)."""
    pools = [render_pool(config, config.attention), *(render_pool(config, pool) for pool in config.ffn_pools)]
    router = render_router(config)
    manifests: list[Manifest] = [render_config_map(config), *router[:2]]
    manifests += [obj for pool in pools for obj in pool[:2]]
    manifests.append(router[2])
    manifests += [pool[2] for pool in pools]
    manifests += render_autoscaler(config)
    manifests += render_monitor(config)
    return copy.deepcopy(manifests)  # objects share label and policy dicts while being built


class _ManifestDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # shared label dicts must print in full, not as &id001 anchors


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _represent_str)


def dump_manifests(manifests: list[Manifest], header: str | None = None) -> str:
    """A multi-document YAML stream (`---` separated), keys in Kubernetes order."""
    documents = [yaml.dump(obj, Dumper=_ManifestDumper, sort_keys=False, default_flow_style=False) for obj in manifests]
    text = "---\n".join(documents)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    return text
