"""The Kubernetes API as plain dicts: kubeconfig loading, CRUD over typed and custom-object APIs, and
errors that name the object.

Every ApiException becomes a KubeApiError subclass whose message says the verb, the kind, namespace/name, the
server's own reason and what to do; an unreachable server becomes KubeConnectionError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as kubeconfig_loader
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from afd.errors import AfdError
from orchestration.k8s.naming import MANAGER, Manifest

FIELD_MANAGER = MANAGER
APPLY_PATCH = "application/apply-patch+yaml"


class KubeApiError(AfdError):
    """The API server refused a request; the message names the object and the way out."""

    def __init__(
        self, verb: str, kind: str, namespace: str | None, name: str | None, status: int, detail: str, hint: str = ""
    ) -> None:
        self.verb, self.kind, self.namespace, self.name, self.status = verb, kind, namespace, name, status
        if name is None:
            target = f"{kind} in namespace {namespace}"
        else:
            target = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
        message = f"cannot {verb} {target}: {detail} (HTTP {status})"
        super().__init__(f"{message}. {hint}" if hint else message)


class KubeNotFoundError(KubeApiError):
    """404: the object (or its namespace, or its API) does not exist."""


class KubeConflictError(KubeApiError):
    """409: the object exists and is not ours, is being deleted, or changed under us."""


class KubeForbiddenError(KubeApiError):
    """403: the kubeconfig's user lacks an RBAC permission."""


class KubeConnectionError(AfdError):
    """The API server cannot be reached, or no kubeconfig was found."""


@dataclass(frozen=True)
class ApiResource:
    """How to reach one kind: a typed API class and method suffix, or a custom resource (group/version/plural)."""

    kind: str
    plural: str
    api: type | None = None
    suffix: str = ""
    group: str = ""
    version: str = ""


RESOURCES: dict[str, ApiResource] = {
    resource.kind: resource
    for resource in (
        ApiResource("ConfigMap", "configmaps", k8s.CoreV1Api, "config_map"),
        ApiResource("Secret", "secrets", k8s.CoreV1Api, "secret"),
        ApiResource("Service", "services", k8s.CoreV1Api, "service"),
        ApiResource("PodDisruptionBudget", "poddisruptionbudgets", k8s.PolicyV1Api, "pod_disruption_budget"),
        ApiResource("Deployment", "deployments", k8s.AppsV1Api, "deployment"),
        ApiResource("StatefulSet", "statefulsets", k8s.AppsV1Api, "stateful_set"),
        ApiResource(
            "HorizontalPodAutoscaler", "horizontalpodautoscalers", k8s.AutoscalingV2Api, "horizontal_pod_autoscaler"
        ),
        ApiResource("ScaledObject", "scaledobjects", group="keda.sh", version="v1alpha1"),
        ApiResource("RayCluster", "rayclusters", group="ray.io", version="v1"),
        ApiResource("ServiceMonitor", "servicemonitors", group="monitoring.coreos.com", version="v1"),
        ApiResource("PodMonitor", "podmonitors", group="monitoring.coreos.com", version="v1"),
    )
}
DELETE_ORDER = ("HorizontalPodAutoscaler", "ScaledObject", "RayCluster", "StatefulSet", "Deployment",
                "PodDisruptionBudget", "Service", "ConfigMap", "Secret", "ServiceMonitor",
                "PodMonitor")  # fmt: skip
"""Scalers first (they would scale what is going away), workloads next, then what the workloads use."""

_HINTS = {
    403: "The kubeconfig user needs get/list/create/patch/delete on configmaps, secrets, services, deployments, "
    "statefulsets, statefulsets/scale, poddisruptionbudgets and horizontalpodautoscalers in this namespace",
    401: "The kubeconfig credentials were rejected; log in again or pick another --context",
}


def _detail(error: ApiException) -> str:
    try:
        body = json.loads(error.body or "")
        return str(body.get("message") or body.get("reason") or error.reason)
    except (ValueError, AttributeError):
        return str(error.reason or "no detail")


def translate(
    error: ApiException, verb: str, kind: str, namespace: str | None, name: str | None, hint: str = ""
) -> KubeApiError:
    status = int(error.status or 0)
    detail = _detail(error)
    hint = hint or _HINTS.get(status, "")
    cls = {404: KubeNotFoundError, 409: KubeConflictError, 403: KubeForbiddenError}.get(status, KubeApiError)
    return cls(verb, kind, namespace, name, status, detail, hint)


def connect(kubeconfig: Path | None = None, context: str | None = None) -> k8s.ApiClient:
    """An API client from --kubeconfig, $KUBECONFIG, ~/.kube/config, or the pod's service account, in that order."""
    path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG") or None
    default = Path("~/.kube/config").expanduser()
    if path is None and default.is_file():
        path = str(default)
    try:
        if path is not None:
            return kubeconfig_loader.new_client_from_config(config_file=path, context=context, persist_config=False)
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            configuration = k8s.Configuration()
            kubeconfig_loader.load_incluster_config(client_configuration=configuration)
            return k8s.ApiClient(configuration)
    except (ConfigException, OSError, ValueError) as error:
        raise KubeConnectionError(
            f"cannot load Kubernetes credentials from {path or 'the in-cluster service account'}: {error}"
        ) from None
    raise KubeConnectionError("no kubeconfig found: pass --kubeconfig, set KUBECONFIG, or create ~/.kube/config")


class ObjectApi:
    """Plain-dict CRUD over the typed and custom-object APIs, with errors translated."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.api_client = api_client
        self._apis: dict[type, Any] = {}
        self.custom = k8s.CustomObjectsApi(api_client)
        self.apps = k8s.AppsV1Api(api_client)

    def _typed(self, resource: ApiResource, verb: str) -> Callable[..., Any]:
        assert resource.api is not None
        api = self._apis.setdefault(resource.api, resource.api(self.api_client))
        return getattr(api, f"{verb}_namespaced_{resource.suffix}")  # type: ignore[no-any-return]

    def _method(self, resource: ApiResource, verb: str, namespace: str, *args: Any, **kwargs: Any) -> Callable[[], Any]:
        """The call for one verb: `<verb>_namespaced_<kind>` of a typed API, or the custom-object equivalent."""
        if resource.api is not None:
            # create/list take (namespace, ...), the rest (name, namespace, ...)
            typed_args = (namespace, *args) if verb in ("create", "list") else (args[0], namespace, *args[1:])
            return partial(self._typed(resource, verb), *typed_args, **kwargs)
        custom_verb = "get" if verb == "read" else verb
        method = getattr(self.custom, f"{custom_verb}_namespaced_custom_object")
        return partial(method, resource.group, resource.version, namespace, resource.plural, *args, **kwargs)

    def _call(
        self, verb: str, kind: str, namespace: str, name: str | None, call: Callable[[], Any], hint: str = ""
    ) -> Any:
        try:
            result = call()
        except ApiException as error:
            raise translate(error, verb, kind, namespace, name, hint) from None
        except urllib3.exceptions.HTTPError as error:
            host = self.api_client.configuration.host
            raise KubeConnectionError(f"cannot reach the Kubernetes API server at {host}: {error}") from None
        return result if isinstance(result, dict) else self.api_client.sanitize_for_serialization(result)

    def create(self, manifest: Manifest) -> Manifest:
        resource = RESOURCES[manifest["kind"]]
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        call = self._method(resource, "create", namespace, manifest, field_manager=FIELD_MANAGER)
        return self._call("create", resource.kind, namespace, name, call)  # type: ignore[no-any-return]

    def read(self, kind: str, namespace: str, name: str, hint: str = "") -> Manifest:
        call = self._method(RESOURCES[kind], "read", namespace, name)
        return self._call("read", kind, namespace, name, call, hint)  # type: ignore[no-any-return]

    def apply(self, manifest: Manifest) -> Manifest:
        """Server-side apply as field manager `afd`, taking over fields others changed (kubectl edit)."""
        resource = RESOURCES[manifest["kind"]]
        namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        options = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": APPLY_PATCH}
        call = self._method(resource, "patch", namespace, name, manifest, **options)
        return self._call("update", resource.kind, namespace, name, call)  # type: ignore[no-any-return]

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        """False when it was already gone."""
        call = self._method(RESOURCES[kind], "delete", namespace, name, propagation_policy="Background")
        try:
            self._call("delete", kind, namespace, name, call)
        except KubeNotFoundError:
            return False
        return True

    def list_owned(self, kind: str, namespace: str, owner: dict[str, str]) -> list[Manifest]:
        """Objects of a kind carrying every owner label; an API that is not installed has none."""
        selector = ",".join(f"{key}={value}" for key, value in owner.items())
        call = self._method(RESOURCES[kind], "list", namespace, label_selector=selector)
        try:
            items = self._call("list", kind, namespace, None, call).get("items") or []
        except KubeNotFoundError:
            return []
        # The server filters by the selector already; checking again means a lax server can never make us
        # delete something that is not ours.
        return [item for item in items if owner.items() <= ((item.get("metadata") or {}).get("labels") or {}).items()]

    def read_scale(self, namespace: str, name: str, hint: str) -> Manifest:
        call = partial(self.apps.read_namespaced_stateful_set_scale, name, namespace)
        return self._call("read", "StatefulSet scale", namespace, name, call, hint)  # type: ignore[no-any-return]

    def patch_scale(self, namespace: str, name: str, replicas: int) -> Manifest:
        body = {"spec": {"replicas": replicas}}
        call = partial(
            self.apps.patch_namespaced_stateful_set_scale, name, namespace, body,
            field_manager=FIELD_MANAGER, _content_type="application/merge-patch+json",
        )  # fmt: skip
        return self._call("scale", "StatefulSet", namespace, name, call)  # type: ignore[no-any-return]
