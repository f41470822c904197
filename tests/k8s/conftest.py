from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from orchestration.k8s.client import ClusterClient
from orchestration.k8s.config import ClusterConfig, load_cluster_config, parse_cluster_config
from tests.k8s.apiserver import RunningApiServer, start_api_server

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "examples" / "cluster.yaml"
DEPLOY = REPO / "deploy" / "k8s"


@pytest.fixture
def example_config() -> ClusterConfig:
    return load_cluster_config(EXAMPLE_CONFIG)


def minimal_config(**overrides: Any) -> dict[str, Any]:
    """The smallest valid config as YAML data; keyword arguments replace top-level fields."""
    data: dict[str, Any] = {
        "image": "registry.example.com/afd:test",
        "model": {"pvc": {"claimName": "models"}},
        "attention": {"replicas": 1},
        "ffnPools": [{"name": "ffn", "replicas": 2}],
    }
    data.update(overrides)
    return data


@pytest.fixture
def two_pool_config() -> ClusterConfig:
    """attn + two FFN pools on different GPU kinds, in namespace `serving`."""
    return parse_cluster_config(
        minimal_config(
            namespace="serving",
            attention={"replicas": 1, "accelerator": {"product": "NVIDIA-H100-80GB-HBM3"}, "transport": "nccl"},
            ffnPools=[
                {"name": "ffn-l40s", "replicas": 2, "accelerator": {"product": "NVIDIA-L40S"}},
                {"name": "ffn-a100", "replicas": 3, "accelerator": {"product": "NVIDIA-A100-SXM4-80GB"}},
            ],
        )
    )


@pytest.fixture
def api_server() -> Iterator[RunningApiServer]:
    server = start_api_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def api_client(api_server: RunningApiServer) -> Iterator[k8s.ApiClient]:
    configuration = k8s.Configuration(host=api_server.url)
    with k8s.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture
def cluster_client(api_client: k8s.ApiClient) -> ClusterClient:
    return ClusterClient(api_client)
