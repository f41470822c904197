"""Prometheus Operator objects for the router's /metrics: a ServiceMonitor or a PodMonitor (monitoring.coreos.com/v1).

Only the router is scraped: attention and FFN nodes report their load, traffic and expert counts in heartbeats,
and the router exports them labelled by node (router/metrics.py). The monitor selects the router's pods or
Services by the same immutable selector the Deployment uses and scrapes the named `http` port (the router's
control-plane Service has no such port, so it yields no target). With `--protect-metrics` among the router's
extra arguments and an API key Secret, the scrape sends the key as a Bearer token.
"""

from __future__ import annotations

from orchestration.k8s.config import ClusterConfig
from orchestration.k8s.naming import API_KEY_KEY, Manifest, labels, metadata, router_name, selector

API_VERSION = "monitoring.coreos.com/v1"
PROTECT_METRICS_FLAG = "--protect-metrics"


def render_monitor(config: ClusterConfig) -> list[Manifest]:
    """The configured monitor of the router (empty without `monitoring`)."""
    monitoring = config.monitoring
    if monitoring is None:
        return []
    endpoint: Manifest = {"port": "http", "path": "/metrics", "interval": monitoring.interval}
    router = config.router
    if router.api_key_secret and PROTECT_METRICS_FLAG in router.extra_args:
        endpoint["authorization"] = {
            "type": "Bearer",
            "credentials": {"name": router.api_key_secret, "key": API_KEY_KEY},
        }
    spec: Manifest = {
        "selector": {"matchLabels": selector(config, "router")},
        "namespaceSelector": {"matchNames": [config.namespace]},
    }
    if monitoring.kind == "ServiceMonitor":
        spec["endpoints"] = [endpoint]
    else:
        spec["podMetricsEndpoints"] = [endpoint]
    return [
        {
            "apiVersion": API_VERSION,
            "kind": monitoring.kind,
            "metadata": metadata(config, router_name(config), {**labels(config, "router"), **monitoring.labels}),
            "spec": spec,
        }
    ]
