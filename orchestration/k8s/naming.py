"""Names, labels and paths shared by every rendered object (and by the client that finds them again)."""

from __future__ import annotations

from typing import Any

from orchestration.k8s.config import ClusterConfig

Manifest = dict[str, Any]

MODEL_MOUNT = "/models/model"
"""Where a PVC or hostPath checkpoint is mounted in every container."""
TOKEN_DIR = "/etc/afd/cluster-token"
TOKEN_KEY = "cluster-token"
API_KEY_DIR = "/etc/afd/api-key"
API_KEY_KEY = "api-key"
CONFIG_DIR = "/etc/afd/cluster"
CONFIG_KEY = "cluster.yaml"
POOL_LABEL = "afd.dev/pool"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGER = "afd"
SHM_SIZE = "2Gi"
"""Memory-backed /dev/shm for accelerator pods: NCCL and torch need more than the runtime's 64 MiB default."""


def router_name(config: ClusterConfig) -> str:
    return f"{config.name}-router"


def router_control_plane_name(config: ClusterConfig) -> str:
    return f"{config.name}-router-cp"


def config_map_name(config: ClusterConfig) -> str:
    return f"{config.name}-config"


def workload_name(config: ClusterConfig, pool: str) -> str:
    """StatefulSet, headless Service and PDB name of a pool (`attn` or an FFN pool name)."""
    return f"{config.name}-{pool}"


def token_secret_name(config: ClusterConfig) -> str:
    return config.cluster_token_secret or f"{config.name}-cluster-token"


def ownership_labels(config: ClusterConfig) -> dict[str, str]:
    """The labels that mark an object as created by afd for this cluster (delete and prune select on them)."""
    return {INSTANCE_LABEL: config.name, MANAGED_BY_LABEL: MANAGER}


def labels(config: ClusterConfig, component: str, pool: str | None = None) -> dict[str, str]:
    result = {
        "app.kubernetes.io/name": "afd",
        INSTANCE_LABEL: config.name,
        COMPONENT_LABEL: component,
        "app.kubernetes.io/part-of": "afd",
        MANAGED_BY_LABEL: MANAGER,
    }
    if pool is not None:
        result[POOL_LABEL] = pool
    return {**result, **config.labels}


def selector(config: ClusterConfig, component: str, pool: str | None = None) -> dict[str, str]:
    """Immutable pod selector: as few labels as identify the workload."""
    result = {INSTANCE_LABEL: config.name, COMPONENT_LABEL: component}
    if pool is not None:
        result[POOL_LABEL] = pool
    return result


def metadata(config: ClusterConfig, name: str, object_labels: dict[str, str]) -> Manifest:
    return {"name": name, "namespace": config.namespace, "labels": object_labels}


def object_key(manifest: Manifest) -> tuple[str, str]:
    """(kind, name): unique within one cluster's manifests."""
    return manifest["kind"], manifest["metadata"]["name"]
