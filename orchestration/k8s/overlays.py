"""Overlays: named hardware presets applied to a cluster config before rendering.

An overlay is a function ClusterConfig -> ClusterConfig (validated again afterwards), so `afd k8s render
--overlay NAME` works on any user's config, whatever its pool names. The kustomize overlays committed under
deploy/k8s/overlays/NAME are generated from the same functions applied to examples/cluster.yaml (see
orchestration/k8s/kustomize.py); a test builds each one with `kubectl kustomize` and compares.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from afd.errors import ConfigError
from orchestration.k8s.config import ClusterConfig, parse_cluster_config
from orchestration.k8s.kuberay import render_ray_cluster
from orchestration.k8s.naming import Manifest
from orchestration.k8s.render import render_config_map, render_manifests

H100 = "NVIDIA-H100-80GB-HBM3"
H20 = "NVIDIA-H20"
A100 = "NVIDIA-A100-SXM4-80GB"
L40S = "NVIDIA-L40S"
"""Values of nvidia.com/gpu.product as NVIDIA GPU feature discovery sets them."""

BUILTIN_MODEL_IN_IMAGE = "/opt/afd/models/builtin"
"""Where deploy/docker/Dockerfile.cpu bakes the built-in demo checkpoint."""

ConfigData = dict[str, Any]


def _gpu(product: str, count: int = 1) -> ConfigData:
    return {"resource": "nvidia.com/gpu", "count": count, "product": product}


def _sized(cpu: str, memory: str) -> ConfigData:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}}


def _cpu_dev(data: ConfigData) -> ConfigData:
    """Everything on CPU, small: the CPU image with its built-in demo checkpoint, grpc transport."""
    image: str = data["image"]
    data["image"] = image.removesuffix("-cuda") + "-cpu" if image.endswith("-cuda") else image
    data["model"] = {"imagePath": BUILTIN_MODEL_IN_IMAGE}
    data["router"].update(resources=_sized("250m", "1Gi"))
    for pool in [data["attention"], *data["ffnPools"]]:
        pool.update(accelerator=None, nodeSelector={}, tolerations=[], resources=_sized("500m", "2Gi"))
    data["attention"].update(transport="grpc", autoscaling=None)
    return data


def _mix(
    attention_product: str, ffn_product: str, attention_size: ConfigData, ffn_size: ConfigData
) -> Callable[[ConfigData], ConfigData]:
    def transform(data: ConfigData) -> ConfigData:
        data["attention"].update(accelerator=_gpu(attention_product), resources=attention_size, transport="nccl")
        for pool in data["ffnPools"]:
            pool.update(accelerator=_gpu(ffn_product), resources=ffn_size)
        return data

    return transform


def _gpu_attention_cpu_experts(data: ConfigData) -> ConfigData:
    """Attention on an H100, experts in the memory of CPU hosts (the one-GPU-plus-big-host way of running a
    large MoE); gRPC between them, since NCCL needs a GPU on both ends. The CUDA image serves both pools: a
    CUDA build of torch computes on the CPU too."""
    data["attention"].update(accelerator=_gpu(H100), resources=_sized("16", "128Gi"), transport="grpc")
    for pool in data["ffnPools"]:
        pool.update(accelerator=None, tolerations=[], resources=_sized("32", "192Gi"))
    return data


def _pool_per_gpu_kind(data: ConfigData) -> ConfigData:
    """Attention on H100; one FFN pool per GPU kind (H100, A100, L40S), each cloned from the first FFN pool."""
    template = data["ffnPools"][0]
    data["attention"].update(accelerator=_gpu(H100), resources=_sized("16", "128Gi"), transport="nccl")
    data["ffnPools"] = [
        {**template, "name": f"ffn-{kind}", "accelerator": _gpu(product), "resources": size}
        for kind, product, size in (
            ("h100", H100, _sized("8", "96Gi")),
            ("a100", A100, _sized("8", "96Gi")),
            ("l40s", L40S, _sized("8", "64Gi")),
        )
    ]
    return data


def _prometheus_operator(data: ConfigData) -> ConfigData:
    """A ServiceMonitor for the router, unless the config already names a monitor (kept as it is)."""
    data["monitoring"] = data.get("monitoring") or {"kind": "ServiceMonitor"}
    return data


@dataclass(frozen=True)
class Overlay:
    """A named preset: how it changes the config, and whether it renders Ray instead of StatefulSets."""

    name: str
    description: str
    transform: Callable[[ConfigData], ConfigData]
    ray: bool = False

    def apply(self, config: ClusterConfig) -> ClusterConfig:
        data = config.model_dump(mode="json", by_alias=True)
        return parse_cluster_config(self.transform(data), f"cluster config after overlay {self.name!r}")

    def render(self, config: ClusterConfig) -> list[Manifest]:
        transformed = self.apply(config)
        if self.ray:
            return copy.deepcopy([render_config_map(transformed), render_ray_cluster(transformed)])
        return render_manifests(transformed)


OVERLAYS: dict[str, Overlay] = {
    overlay.name: overlay
    for overlay in (
        Overlay("cpu-dev", "everything on CPU, small; the CPU image with its built-in demo model", _cpu_dev),
        Overlay(
            "h100-attn-l40s-ffn",
            "attention on H100 (KV capacity, bandwidth), experts on L40S (cheap FLOPs); NCCL",
            _mix(H100, L40S, _sized("16", "128Gi"), _sized("8", "64Gi")),
        ),
        Overlay(
            "h20-attn-h100-ffn",
            "attention on H20 (96 GB HBM, low compute), experts on H100 (compute); NCCL",
            _mix(H20, H100, _sized("16", "128Gi"), _sized("8", "96Gi")),
        ),
        Overlay(
            "h100-attn-cpu-ffn",
            "attention on H100, experts in host memory on CPU nodes (one GPU plus big-memory hosts); gRPC",
            _gpu_attention_cpu_experts,
        ),
        Overlay(
            "pool-per-gpu-kind", "attention on H100, one FFN pool per GPU kind (H100, A100, L40S)", _pool_per_gpu_kind
        ),
        Overlay(
            "ray", "a KubeRay RayCluster running `afd up --ray` instead of StatefulSets", lambda data: data, ray=True
        ),
        Overlay(
            "prometheus-operator",
            "the router scraped by a Prometheus Operator ServiceMonitor (monitoring.coreos.com/v1)",
            _prometheus_operator,
        ),
    )
}


def get_overlay(name: str) -> Overlay:
    try:
        return OVERLAYS[name]
    except KeyError:
        raise ConfigError(f"unknown overlay {name!r}; overlays: {', '.join(OVERLAYS)}") from None


def render(config: ClusterConfig, overlay: str | None = None) -> list[Manifest]:
    """The cluster's manifests, after the named overlay (hardware preset) transformed the config.

    Here rather than in render.py, which overlays build on: render.py knows nothing of overlays.
    """
    return render_manifests(config) if overlay is None else get_overlay(overlay).render(config)
