"""Autoscaling of the attention pool on the router's queue (vllm:num_requests_waiting): HPA or KEDA."""

from __future__ import annotations

from orchestration.k8s.config import ATTENTION_POOL, ClusterConfig
from orchestration.k8s.naming import Manifest, labels, metadata, router_name, workload_name


def render_hpa(config: ClusterConfig) -> Manifest:
    """HorizontalPodAutoscaler of the attention pool on queued requests per attention node.

    The metric is an Object metric of the router Service (the router exports the cluster's queue), served by
    prometheus-adapter under `autoscaling.metricName`; AverageValue divides it by the pool's replicas.
    """
    autoscaling = config.attention.autoscaling
    if autoscaling is None:
        raise ValueError("attention.autoscaling is not set")
    name = workload_name(config, ATTENTION_POOL)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(config, name, labels(config, "attention", ATTENTION_POOL)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name},
            "minReplicas": autoscaling.min_replicas,
            "maxReplicas": autoscaling.max_replicas,
            "metrics": [
                {
                    "type": "Object",
                    "object": {
                        "describedObject": {"apiVersion": "v1", "kind": "Service", "name": router_name(config)},
                        "metric": {"name": autoscaling.metric_name},
                        "target": {"type": "AverageValue", "averageValue": str(autoscaling.target_waiting_per_replica)},
                    },
                }
            ],
            # A new attention node loads weights before it helps: add one at a time, remove slowly.
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": 600,
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}],
                },
            },
        },
    }


def render_keda_scaled_object(config: ClusterConfig) -> Manifest:
    """KEDA ScaledObject of the attention pool: the Prometheus query of the router's queue, per replica."""
    autoscaling = config.attention.autoscaling
    if autoscaling is None:
        raise ValueError("attention.autoscaling is not set")
    name = workload_name(config, ATTENTION_POOL)
    query = f'sum(vllm:num_requests_waiting{{namespace="{config.namespace}",service="{router_name(config)}"}})'
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata(config, name, labels(config, "attention", ATTENTION_POOL)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name},
            "minReplicaCount": autoscaling.min_replicas,
            "maxReplicaCount": autoscaling.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 600,
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": autoscaling.prometheus_address,
                        "query": query,
                        "threshold": str(autoscaling.target_waiting_per_replica),
                    },
                }
            ],
        },
    }


def render_autoscaler(config: ClusterConfig) -> list[Manifest]:
    autoscaling = config.attention.autoscaling
    if autoscaling is None:
        return []
    return [render_hpa(config) if autoscaling.provider == "hpa" else render_keda_scaled_object(config)]
