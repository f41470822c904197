"""Cluster config validation: every bad input is a ConfigError whose message names the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from afd.errors import ConfigError
from orchestration.k8s.config import ClusterConfig, load_cluster_config, parse_cluster_config
from tests.k8s.conftest import EXAMPLE_CONFIG, minimal_config

pytestmark = pytest.mark.k8s


def problems(data: Any) -> list[str]:
    """The bullet lines of the ConfigError raised for data (fails the test if none is raised)."""
    with pytest.raises(ConfigError) as caught:
        parse_cluster_config(data)
    lines = str(caught.value).splitlines()
    assert lines[0] == "invalid cluster config:"
    return [line.removeprefix("  - ") for line in lines[1:]]


def test_the_example_config_is_valid() -> None:
    config = load_cluster_config(EXAMPLE_CONFIG)
    assert config.pool_names() == ["attn", "ffn"]
    assert config.attention.transport == "nccl" and config.attention.device == "cuda"
    assert config.ffn_pools[0].replicas == 2


def test_defaults_make_a_small_cpu_cluster() -> None:
    config = parse_cluster_config(minimal_config())
    assert (config.name, config.namespace, config.attention.transport, config.attention.device) == (
        "afd",
        "afd",
        "grpc",
        "cpu",
    )
    assert (config.attention.port, config.ffn_pools[0].port, config.router.http_port, config.router.grpc_port) == (
        50061,
        50071,
        8000,
        50051,
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"attention": None}, "attention: the attention pool is required"),
        ({"ffnPools": None}, "ffnPools: at least one FFN pool is required"),
        ({"ffnPools": []}, "ffnPools: at least one FFN pool is required"),
    ],
)
def test_missing_pools(change: dict[str, Any], expected: str) -> None:
    data = {key: value for key, value in minimal_config(**change).items() if value is not None}
    assert problems(data) == [expected]


@pytest.mark.parametrize(
    ("accelerator", "expected"),
    [
        (
            {"resource": "gpu"},
            "attention.accelerator.resource: resource 'gpu' is not an extended resource name like "
            "nvidia.com/gpu (<domain>/<name>, domain outside kubernetes.io)",
        ),
        (
            {"resource": "memory"},
            "attention.accelerator.resource: resource 'memory' is a native resource; "
            "set it in `resources`, not as an accelerator",
        ),
        (
            {"resource": "kubernetes.io/gpu"},
            "attention.accelerator.resource: resource 'kubernetes.io/gpu' is not an "
            "extended resource name like nvidia.com/gpu (<domain>/<name>, domain outside kubernetes.io)",
        ),
        ({"count": 0}, "attention.accelerator.count: Input should be greater than or equal to 1 (got 0)"),
        (
            {"model": "H100"},
            "attention.accelerator.model: unknown field "
            "(field names are camelCase, see the README section 'Run on Kubernetes')",
        ),
    ],
)
def test_bad_accelerator(accelerator: dict[str, Any], expected: str) -> None:
    assert problems(minimal_config(attention={"accelerator": accelerator})) == [expected]


def test_accelerator_count_belongs_in_accelerator_not_resources() -> None:
    pool = {"name": "ffn", "accelerator": {}, "resources": {"limits": {"nvidia.com/gpu": 2}}}
    assert problems(minimal_config(ffnPools=[pool])) == [
        "ffnPools[0]: resources.limits sets nvidia.com/gpu; set the device count in accelerator.count instead"
    ]


def test_negative_replicas_name_the_pool() -> None:
    data = minimal_config(attention={"replicas": -1}, ffnPools=[{"name": "ffn"}, {"name": "ffn-b", "replicas": -3}])
    assert problems(data) == [
        "attention.replicas: Input should be greater than or equal to 0 (got -1)",
        "ffnPools[1].replicas: Input should be greater than or equal to 0 (got -3)",
    ]


def test_unknown_transport() -> None:
    assert problems(minimal_config(attention={"transport": "rdma"})) == [
        "attention.transport: Input should be 'grpc', 'gloo', 'shm' or 'nccl' (got 'rdma')"
    ]


def test_shm_is_refused_because_pods_share_no_memory() -> None:
    assert problems(minimal_config(attention={"transport": "shm"})) == [
        "attention.transport: 'shm' joins processes on one host, and pods of different pools share no memory on "
        "Kubernetes; use grpc, gloo or nccl"
    ]


def test_nccl_needs_a_gpu_on_every_pool() -> None:
    data = minimal_config(
        attention={"transport": "nccl", "accelerator": {}},
        ffnPools=[{"name": "ffn-gpu", "accelerator": {}}, {"name": "ffn-cpu"}],
    )
    assert problems(data) == [
        "attention.transport: 'nccl' needs a GPU accelerator on every pool; without one: ffnPools[1] (ffn-cpu)"
    ]


def test_duplicate_pool_names() -> None:
    data = minimal_config(ffnPools=[{"name": "ffn"}, {"name": "ffn-b"}, {"name": "ffn"}])
    assert problems(data) == ["ffnPools[2].name: duplicate pool name 'ffn' (pool names must be unique)"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "attn",
            "ffnPools[0].name: pool name 'attn' is reserved "
            "(reserved: attn, cluster-token, config, head-svc, router, router-cp)",
        ),
        (
            "FFN_1",
            "ffnPools[0].name: pool name 'FFN_1' must be a DNS label: lowercase letters, digits and '-', starting "
            "with a letter, at most 24 characters",
        ),
    ],
)
def test_bad_pool_names(name: str, expected: str) -> None:
    assert problems(minimal_config(ffnPools=[{"name": name}])) == [expected]


def test_model_needs_exactly_one_source() -> None:
    assert problems(minimal_config(model={})) == ["model: set exactly one of pvc, hostPath, imagePath (got none)"]
    assert problems(minimal_config(model={"pvc": {"claimName": "m"}, "hostPath": "/data"})) == [
        "model: set exactly one of pvc, hostPath, imagePath (got pvc, hostPath)"
    ]
    assert problems(minimal_config(model={"imagePath": "models/x"})) == [
        "model: imagePath must be an absolute path, got 'models/x'"
    ]


def test_other_field_errors_name_their_field() -> None:
    data = minimal_config(
        name="AFD",
        router={"httpPort": 50051},
        attention={"microbatches": 0, "autoscaling": {"minReplicas": 5, "maxReplicas": 2},
                   "resources": {"requests": {"memory": "lots"}}, "tolerations": [{"operator": "Equal"}]},
        labels={"app.kubernetes.io/name": "x"},
    )  # fmt: skip
    del data["image"]
    assert problems(data) == [
        "name: cluster name 'AFD' must be a DNS label: lowercase letters, digits and '-', starting with a letter, "
        "at most 24 characters",
        "image: Field required",
        "router: httpPort and grpcPort are both 50051",
        "attention.tolerations[0]: operator Equal needs a key (use operator Exists to tolerate every taint)",
        "attention.resources.requests: memory: 'lots' is not a Kubernetes quantity (e.g. 500m, 4, 16Gi)",
        "attention.microbatches: microbatches must be 'auto' or an integer >= 1, got 0",
        "attention.autoscaling: minReplicas (5) is larger than maxReplicas (2)",
        "labels: label 'app.kubernetes.io/name' is set by afd itself (reserved prefixes: app.kubernetes.io/, afd.dev/)",
    ]


def test_yaml_files_that_cannot_be_read_or_parsed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read cluster config .*nope.yaml: No such file or directory"):
        load_cluster_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("image: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML"):
        load_cluster_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match=r"scalar.yaml: expected a mapping of fields at the top level, got str"):
        load_cluster_config(scalar)


def test_to_yaml_round_trips() -> None:
    config = load_cluster_config(EXAMPLE_CONFIG)
    import yaml

    assert ClusterConfig.model_validate(yaml.safe_load(config.to_yaml())) == config
