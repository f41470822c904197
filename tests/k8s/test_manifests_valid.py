"""Every manifest of every overlay against the official schemas, and kustomize against render.

Built-in kinds are validated with kubernetes-validate (the official OpenAPI schemas, offline) in strict mode,
where an unknown field fails, for Kubernetes 1.30 and for the newest version the package ships. Custom
resources have no offline schema: the RayCluster is fed to Ray's own KubeRay autoscaler translation (the code
that reads RayCluster objects in a real cluster), and the KEDA ScaledObject is checked field by field against
the parts of KEDA's v1alpha1 API it uses; neither proves the CRD would accept them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from orchestration.k8s.autoscaling import render_hpa, render_keda_scaled_object
from orchestration.k8s.config import ClusterConfig
from orchestration.k8s.kustomize import _with_autoscaling, json_patch, render_model_pvc_example
from orchestration.k8s.naming import Manifest, object_key
from orchestration.k8s.overlays import OVERLAYS, render
from orchestration.k8s.render import render_token_secret
from tests.k8s.conftest import DEPLOY

pytestmark = pytest.mark.k8s

CUSTOM_KINDS = {"RayCluster", "ScaledObject", "ServiceMonitor", "PodMonitor"}  # monitors: tests/k8s/test_monitoring.py
LATEST = kubernetes_validate.utils.latest_version()
VERSIONS = ("1.30", LATEST)
OVERLAY_NAMES = [None, *OVERLAYS]


def all_manifests(config: ClusterConfig) -> list[Manifest]:
    manifests = [manifest for overlay in OVERLAY_NAMES for manifest in render(config, overlay)]
    autoscaled = _with_autoscaling(config)
    return [
        *manifests,
        render_hpa(autoscaled),
        *render_model_pvc_example(config),
        render_token_secret(config, "x" * 43),
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_builtin_manifest_passes_the_official_schema_strictly(
    example_config: ClusterConfig, version: str
) -> None:
    checked = set()
    for manifest in all_manifests(example_config):
        if manifest["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(
                f"{manifest['kind']}/{manifest['metadata']['name']} invalid for {version} at {path}: {error.message}"
            )
        checked.add(manifest["kind"])
    assert checked == {"ConfigMap", "Service", "PodDisruptionBudget", "Deployment", "StatefulSet",
                       "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Pod", "Secret"}  # fmt: skip


def test_strict_validation_rejects_an_unknown_field(example_config: ClusterConfig) -> None:
    stateful_set = next(m for m in render(example_config) if m["kind"] == "StatefulSet")
    stateful_set["spec"]["template"]["spec"]["containers"][0]["grpcProbe"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError, match="'grpcProbe' was unexpected"):
        kubernetes_validate.validate(stateful_set, "1.30", strict=True)


def kustomize_build(directory: Path) -> dict[tuple[str, str], Manifest]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` cannot be checked")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed: {result.stderr}"
    return {object_key(doc): doc for doc in yaml.safe_load_all(result.stdout) if doc}


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_kubectl_kustomize_builds_what_afd_renders(example_config: ClusterConfig, overlay: str | None) -> None:
    directory = DEPLOY / "base" if overlay is None else DEPLOY / "overlays" / overlay
    built = kustomize_build(directory)
    expected = {object_key(manifest): manifest for manifest in render(example_config, overlay)}
    assert set(built) == set(expected)
    for key, manifest in expected.items():
        assert built[key] == manifest, f"{key} differs: {json_patch(manifest, built[key])}"


def test_examples_dir_has_the_autoscaler_and_pvc_examples(example_config: ClusterConfig) -> None:
    autoscaled = _with_autoscaling(example_config)
    hpa = list(yaml.safe_load_all((DEPLOY / "examples" / "hpa-attention.yaml").read_text()))
    keda = list(yaml.safe_load_all((DEPLOY / "examples" / "keda-scaledobject-attention.yaml").read_text()))
    assert hpa == [render_hpa(autoscaled)] and keda == [render_keda_scaled_object(autoscaled)]


def _ray_autoscaling_config(ray_cluster: Manifest) -> dict[str, Any]:
    # Ray's translation of a RayCluster into its autoscaler config: KubeRay runs this very code against the
    # live object, and it rejects malformed group specs, resources and rayStartParams.
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _derive_autoscaling_config_from_ray_cr(ray_cluster)


def test_raycluster_is_understood_by_rays_kuberay_translation(example_config: ClusterConfig) -> None:
    ray_cluster = next(
        m
        for m in OVERLAYS["ray"].render(OVERLAYS["pool-per-gpu-kind"].apply(example_config))
        if m["kind"] == "RayCluster"
    )
    node_types = _ray_autoscaling_config(ray_cluster)["available_node_types"]
    assert node_types["headgroup"]["resources"]["afd_router"] == 1
    for group, pool_resource in (
        ("attn", "afd_pool_attn"),
        ("ffn-h100", "afd_pool_ffn_h100"),
        ("ffn-l40s", "afd_pool_ffn_l40s"),
    ):
        resources = node_types[group]["resources"]
        assert resources[pool_resource] == 1 and resources["GPU"] == 1
    assert node_types["ffn-a100"]["min_workers"] == node_types["ffn-a100"]["max_workers"] == 2
    assert ray_cluster["metadata"]["annotations"] == {"ray.io/overwrite-container-cmd": "true"}
    assert ray_cluster["apiVersion"] == "ray.io/v1"


def test_scaled_object_uses_kedas_v1alpha1_fields_with_their_types(example_config: ClusterConfig) -> None:
    scaled = render_keda_scaled_object(_with_autoscaling(example_config))
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "triggers",
    }
    assert set(spec["scaleTargetRef"]) <= {"apiVersion", "kind", "name", "envSourceContainerName"}
    target = next(m for m in render(example_config) if object_key(m) == ("StatefulSet", spec["scaleTargetRef"]["name"]))
    assert (spec["scaleTargetRef"]["apiVersion"], spec["scaleTargetRef"]["kind"]) == (
        target["apiVersion"],
        target["kind"],
    )
    assert all(
        isinstance(spec[key], int) and spec[key] >= 0
        for key in ("minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod")
    )
    [trigger] = spec["triggers"]
    assert set(trigger) == {"type", "metadata"} and trigger["type"] == "prometheus"
    assert set(trigger["metadata"]) == {"serverAddress", "query", "threshold"}
    assert all(isinstance(value, str) for value in trigger["metadata"].values())
    assert float(trigger["metadata"]["threshold"]) > 0
