"""The router's ServiceMonitor / PodMonitor (Prometheus Operator, monitoring.coreos.com/v1).

kubernetes-validate knows no CRDs, so the monitors are checked against a JSON schema of the parts of the
Prometheus Operator v1 API they use (field names and types as in the operator's CRDs, unknown fields refused),
and against the objects they must find: the selector picks the router's pods / Service and the scraped port
is the router's `http` port that serves /metrics.
"""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml

from afd.errors import ConfigError
from orchestration.k8s.client import ClusterClient
from orchestration.k8s.config import ClusterConfig, parse_cluster_config
from orchestration.k8s.kustomize import with_monitor
from orchestration.k8s.monitoring import render_monitor
from orchestration.k8s.naming import Manifest
from orchestration.k8s.overlays import render
from tests.k8s.apiserver import RunningApiServer
from tests.k8s.conftest import DEPLOY, minimal_config

pytestmark = pytest.mark.k8s

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {"type": "object", "properties": {"matchLabels": _STRING_MAP}, "additionalProperties": False}
_ENDPOINT = {
    "type": "object",
    "required": ["port"],
    "additionalProperties": False,
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                     r"(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},  # the CRD's Duration pattern
        "authorization": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "type": {"type": "string"},
                "credentials": {
                    "type": "object",
                    "required": ["key"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                },
            },
        },
    },
}  # fmt: skip


def _monitor_schema(kind: str, endpoints: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name", "namespace"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _STRING_MAP},
            },
            "spec": {
                "type": "object",
                "required": ["selector", endpoints],
                "additionalProperties": False,
                "properties": {
                    "selector": _SELECTOR,
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                    },
                    endpoints: {"type": "array", "minItems": 1, "items": _ENDPOINT},
                },
            },
        },
    }


SCHEMAS = {
    "ServiceMonitor": _monitor_schema("ServiceMonitor", "endpoints"),
    "PodMonitor": _monitor_schema("PodMonitor", "podMetricsEndpoints"),
}


def _by_kind(manifests: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def _port_names(service: Manifest) -> set[str]:
    return {port["name"] for port in service["spec"]["ports"]}


def _selects(selector: dict[str, str], object_labels: dict[str, str]) -> bool:
    return all(object_labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_monitor_matches_the_operator_schema_and_finds_the_routers_metrics_port(
    example_config: ClusterConfig, kind: str
) -> None:
    manifests = render(with_monitor(example_config, kind))
    [monitor] = [m for m in manifests if m["kind"] == kind]
    jsonschema.validate(monitor, SCHEMAS[kind])
    objects = _by_kind(manifests)
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoint = monitor["spec"]["endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"][0]
    assert endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [example_config.namespace]
    deployment = objects[("Deployment", "afd-router")]
    if kind == "ServiceMonitor":
        services = [m for m in manifests if m["kind"] == "Service" and _selects(selector, m["metadata"]["labels"])]
        with_port = [s["metadata"]["name"] for s in services if endpoint["port"] in _port_names(s)]
        assert with_port == ["afd-router"]  # the control-plane Service matches the labels but has no http port
    else:
        assert _selects(selector, deployment["spec"]["template"]["metadata"]["labels"])
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[endpoint["port"]] == example_config.router.http_port
    pods = [m for m in manifests if m["kind"] in ("StatefulSet", "Deployment")]
    scraped = [p["metadata"]["name"] for p in pods if _selects(selector, p["spec"]["template"]["metadata"]["labels"])]
    assert scraped == ["afd-router"]  # only the router: the nodes report through it


def test_schema_check_can_fail(example_config: ClusterConfig) -> None:
    [monitor] = render_monitor(with_monitor(example_config, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["scrapeEvery"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="scrapeEvery"):
        jsonschema.validate(monitor, SCHEMAS["ServiceMonitor"])
    monitor["spec"]["endpoints"][0].pop("scrapeEvery")
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SCHEMAS["ServiceMonitor"])


def test_no_monitor_unless_configured_and_config_fields_reach_it() -> None:
    assert not [m for m in render(parse_cluster_config(minimal_config())) if "Monitor" in m["kind"]]
    config = parse_cluster_config(
        minimal_config(
            router={"apiKeySecret": "api", "extraArgs": ["--protect-metrics"]},
            monitoring={"kind": "PodMonitor", "interval": "30s", "labels": {"release": "kube-prometheus-stack"}},
        )
    )
    [monitor] = render_monitor(config)
    jsonschema.validate(monitor, SCHEMAS["PodMonitor"])
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["interval"] == "30s"
    # /metrics behind the API key: the scrape sends it from the same Secret the router reads
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "api", "key": "api-key"}}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"monitoring": {"kind": "Probe"}}, "monitoring.kind"),
        ({"monitoring": {"interval": "fast"}}, "monitoring.interval"),
        (
            {"monitoring": {"kind": "PodMonitor"}, "attention": {"autoscaling": {"provider": "keda"}}},
            "no `service` label",
        ),
    ],
)
def test_bad_monitoring_config_is_a_clear_error(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_cluster_config(minimal_config(**overrides))


def test_the_prometheus_operator_overlay_and_the_examples_carry_the_monitors(example_config: ClusterConfig) -> None:
    [monitor] = [m for m in render(example_config, "prometheus-operator") if m["kind"] == "ServiceMonitor"]
    assert monitor == render_monitor(with_monitor(example_config, "ServiceMonitor"))[0]
    for kind in ("ServiceMonitor", "PodMonitor"):
        committed = list(yaml.safe_load_all((DEPLOY / "examples" / f"{kind.lower()}-router.yaml").read_text()))
        assert committed == render_monitor(with_monitor(example_config, kind))


def test_apply_creates_and_delete_removes_the_monitor(
    cluster_client: ClusterClient, api_server: RunningApiServer, api_client
) -> None:
    from tests.k8s.test_client import create_namespace

    create_namespace(api_client, "afd")
    config = parse_cluster_config(minimal_config(monitoring={"kind": "ServiceMonitor"}))
    changes = cluster_client.apply(config)
    assert ("ServiceMonitor", "afd-router", "created") in [(c.kind, c.name, c.action) for c in changes]
    assert set(api_server.stored("monitoring.coreos.com", "v1", "servicemonitors", "afd")) == {"afd-router"}
    deleted = cluster_client.delete(config)
    assert ("ServiceMonitor", "afd-router", "deleted") in [(c.kind, c.name, c.action) for c in deleted]
