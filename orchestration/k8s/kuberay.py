"""ClusterConfig -> a KubeRay RayCluster that runs `afd up --ray` on its head (the `ray` overlay).

For users who run Ray on Kubernetes already: instead of a StatefulSet per pool, KubeRay keeps one worker
group per pool, each pinned to its accelerator type (node selector on the GPU-product label, device limits)
and advertising a custom Ray resource `afd_pool_<pool>` (plus `afd_router` on the head), so the Ray launcher
can place every node actor on the hardware its pool names. The head starts Ray in the background, waits for
the GCS, then runs `afd up --ray` in the foreground: if the launcher exits, the head pod restarts.
"""

from __future__ import annotations

import json
import shlex

from afd.errors import ConfigError
from orchestration.k8s.config import ATTENTION_POOL, AttentionPool, ClusterConfig, FfnPool
from orchestration.k8s.naming import Manifest, labels, metadata
from orchestration.k8s.render import (
    CONTAINER_SECURITY,
    common_volumes,
    container_resources,
    downward_env,
    model_dir,
    pod_spec,
)

RAY_GCS_PORT = 6379
HEAD_ROUTER_RESOURCE = "afd_router"


def pool_resource(pool: str) -> str:
    """The custom Ray resource a pool's worker group advertises (one unit per pod)."""
    return "afd_pool_" + pool.replace("-", "_")


def ray_resources_param(resources: dict[str, int]) -> str:
    """rayStartParams `resources` in the quoted form KubeRay splices into `ray start --resources=...`."""
    return '"' + json.dumps(resources, sort_keys=True).replace('"', '\\"') + '"'


def head_service_name(config: ClusterConfig) -> str:
    """The Service KubeRay creates for the head; it exposes the head container's ports, the API included."""
    return f"{config.name}-head-svc"


def _ffn_device(config: ClusterConfig) -> str:
    """The one `--ffn-device` of `afd up --ray`: every FFN pool's device (Ray gives each actor its pool's GPU)."""
    devices = {pool.name: pool.device for pool in config.ffn_pools}
    if len(set(devices.values())) > 1:
        raise ConfigError(
            f"the ray overlay runs one `afd up --ray --ffn-device` for every FFN pool, but the pools' devices "
            f"differ ({devices}); render without the ray overlay (a StatefulSet per pool) for mixed FFN pools"
        )
    return next(iter(devices.values()), "cpu")


def _head_script(config: ClusterConfig) -> str:
    attention = config.attention
    up_args = [
        "afd", "up", "--ray", "--model", model_dir(config),
        "--attn", str(attention.replicas), "--ffn", str(sum(pool.replicas for pool in config.ffn_pools)),
        "--transport", attention.transport, "--microbatches", str(attention.microbatches),
        "--attn-device", attention.device, "--ffn-device", _ffn_device(config),
        *config.ray.extra_up_args,
    ]  # fmt: skip
    gcs = f"127.0.0.1:{RAY_GCS_PORT}"
    return "\n".join(
        [
            "ulimit -n 65536",
            "$KUBERAY_GEN_RAY_START_CMD &",
            f"for attempt in $(seq 1 120); do ray health-check --address {gcs} && break; sleep 1; done",
            f"RAY_ADDRESS={gcs} exec {shlex.join(up_args)}",
        ]
    )


def _worker_group(config: ClusterConfig, pool: AttentionPool | FfnPool) -> Manifest:
    is_attention = isinstance(pool, AttentionPool)
    pool_name = ATTENTION_POOL if is_attention else pool.name  # type: ignore[union-attr]
    component = "attention" if is_attention else "ffn"
    accelerator = pool.accelerator
    volumes, mounts = common_volumes(config, accelerated=accelerator is not None)
    container: Manifest = {
        "name": "ray-worker",
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["/bin/bash", "-lc", "--"],
        "args": ["ulimit -n 65536; exec $KUBERAY_GEN_RAY_START_CMD"],
        "env": downward_env(pool.env),
        "resources": container_resources(
            pool.resources, None if accelerator is None else (accelerator.resource, accelerator.count)
        ),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mounts,
    }
    product = (
        None if accelerator is None or accelerator.product is None else (accelerator.product_label, accelerator.product)
    )
    replicas = pool.replicas
    low, high = replicas, replicas
    if is_attention and pool.autoscaling is not None:  # type: ignore[union-attr]
        low, high = pool.autoscaling.min_replicas, pool.autoscaling.max_replicas  # type: ignore[union-attr]
        replicas = min(max(replicas, low), high)
    return {
        "groupName": pool_name,
        "replicas": replicas,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {"resources": ray_resources_param({pool_resource(pool_name): 1})},
        "template": {
            "metadata": {"labels": labels(config, component, pool_name)},
            "spec": pod_spec(
                config, pool, container, volumes, product, None if accelerator is None else accelerator.resource
            ),
        },
    }


def render_ray_cluster(config: ClusterConfig) -> Manifest:
    """The RayCluster: a CPU head (GCS, router actor, `afd up --ray`) and one worker group per pool."""
    volumes, mounts = common_volumes(config, accelerated=False)
    head_container: Manifest = {
        "name": "ray-head",
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["/bin/bash", "-lc", "--"],
        "args": [_head_script(config)],
        "env": downward_env({}),
        "ports": [
            {"name": "gcs-server", "containerPort": RAY_GCS_PORT, "protocol": "TCP"},
            {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"},
            {"name": "client", "containerPort": 10001, "protocol": "TCP"},
            {"name": "http", "containerPort": config.router.http_port, "protocol": "TCP"},
        ],
        # No readiness probe of our own: workers join through the head Service, which must not wait for the API.
        "resources": container_resources(config.ray.head_resources, None),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mounts,
    }
    head_labels = labels(config, "ray-head")
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {
            **metadata(config, config.name, labels(config, "ray")),
            # KubeRay >= 1.1: run the container command as written, with the generated `ray start` in
            # $KUBERAY_GEN_RAY_START_CMD.
            "annotations": {"ray.io/overwrite-container-cmd": "true"},
        },
        "spec": {
            "rayVersion": config.ray.version,
            "enableInTreeAutoscaling": False,
            "headGroupSpec": {
                "serviceType": config.router.service_type,
                "rayStartParams": {
                    "dashboard-host": "0.0.0.0",
                    "resources": ray_resources_param({HEAD_ROUTER_RESOURCE: 1}),
                },
                "template": {
                    "metadata": {"labels": head_labels},
                    "spec": pod_spec(config, config.router, head_container, volumes),
                },
            },
            "workerGroupSpecs": [_worker_group(config, config.attention)]
            + [_worker_group(config, pool) for pool in config.ffn_pools],
        },
    }
