"""Apply, scale, inspect and delete an AFD cluster through the Kubernetes API (official `kubernetes` client).

- apply: create each rendered object; when it exists and carries this cluster's ownership labels, update it
  with server-side apply (field manager `afd`, forced: the config is the source of truth). An existing object
  that is not ours is never touched. The cluster token Secret is created with a random token when the config
  names none, and kept (never rotated, never printed) afterwards. Objects of this cluster that the config no
  longer renders (a removed FFN pool) are pruned.
- scale: PATCH the `/scale` subresource of one pool's StatefulSet, nothing else.
- status: desired/ready replicas of the router and every pool, read from the workloads.
- delete: everything carrying this cluster's ownership labels, and nothing else.
Every API failure becomes a KubeApiError that names the verb, kind, namespace/name and what to do.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from afd.errors import ConfigError
from orchestration.k8s.config import ATTENTION_POOL, ClusterConfig
from orchestration.k8s.kubeapi import (
    DELETE_ORDER,
    FIELD_MANAGER,
    KubeConflictError,
    KubeConnectionError,
    KubeNotFoundError,
    ObjectApi,
    translate,
)
from orchestration.k8s.naming import (
    INSTANCE_LABEL,
    MANAGED_BY_LABEL,
    MANAGER,
    POOL_LABEL,
    TOKEN_KEY,
    Manifest,
    object_key,
    ownership_labels,
    router_name,
    token_secret_name,
    workload_name,
)
from orchestration.k8s.overlays import get_overlay, render
from orchestration.k8s.render import render_token_secret


@dataclass
class Change:
    """One object touched by apply or delete."""

    kind: str
    name: str
    action: str
    """created, configured, pruned, deleted, kept."""


@dataclass
class ScaleResult:
    pool: str
    workload: str
    previous: int
    replicas: int
    warning: str | None = None


@dataclass
class WorkloadStatus:
    """Desired and ready replicas of one workload, as the API server reports them."""

    pool: str
    role: str
    kind: str
    name: str
    exists: bool
    desired: int = 0
    ready: int = 0
    updated: int = 0
    accelerator: str = "cpu"
    in_config: bool = True

    @property
    def state(self) -> str:
        if not self.exists:
            return "absent"
        if not self.in_config:
            return "not in config (apply prunes it)"
        if self.desired == 0:
            return "scaled to 0"
        return "ready" if self.ready >= self.desired else "progressing"


@dataclass
class ClusterStatus:
    name: str
    namespace: str
    workloads: list[WorkloadStatus] = field(default_factory=list)
    token_secret: str = ""
    token_secret_present: bool = False
    autoscaler: str | None = None
    api_url: str = ""
    """The router's OpenAI API inside the cluster (port-forward or the Service type reach it from outside)."""
    service_type: str = "ClusterIP"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for item, workload in zip(data["workloads"], self.workloads, strict=True):
            item["state"] = workload.state
        return data


def _accelerator_text(accelerator: Any) -> str:
    if accelerator is None:
        return "cpu"
    text = f"{accelerator.count}x {accelerator.resource}"
    return f"{text} ({accelerator.product})" if accelerator.product else text


class ClusterClient:
    """The operations behind `afd k8s apply|scale|status|delete` for one cluster config."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.objects = ObjectApi(api_client)
        self.core = k8s.CoreV1Api(api_client)

    def _effective(self, config: ClusterConfig, overlay: str | None) -> ClusterConfig:
        return config if overlay is None else get_overlay(overlay).apply(config)

    def ensure_namespace(self, config: ClusterConfig, create: bool) -> None:
        namespace = config.namespace
        try:
            self.core.read_namespace(namespace)
            return
        except ApiException as error:
            if error.status == 403:
                return  # namespace-scoped users cannot read namespaces; the creates below will tell
            if error.status != 404:
                raise translate(error, "read", "Namespace", None, namespace) from None
        except urllib3.exceptions.HTTPError as error:
            raise KubeConnectionError(
                f"cannot reach the Kubernetes API server at {self.core.api_client.configuration.host}: {error}"
            ) from None
        if not create:
            raise KubeNotFoundError(
                "use", "Namespace", None, namespace, 404, "it does not exist",
                f"Create it (kubectl create namespace {namespace}) or pass --create-namespace",
            )  # fmt: skip
        try:
            body = k8s.V1Namespace(api_version="v1", kind="Namespace", metadata=k8s.V1ObjectMeta(name=namespace))
            self.core.create_namespace(body, field_manager=FIELD_MANAGER)
        except ApiException as error:
            raise translate(error, "create", "Namespace", None, namespace) from None

    def _check_ours(self, config: ClusterConfig, live: Manifest, verb: str) -> None:
        meta = live.get("metadata") or {}
        kind, name = live.get("kind") or "object", meta.get("name")
        if not ownership_labels(config).items() <= (meta.get("labels") or {}).items():
            raise KubeConflictError(
                verb, kind, config.namespace, name, 409, "it already exists and is not managed by this afd cluster",
                f"It lacks the labels {INSTANCE_LABEL}={config.name}, {MANAGED_BY_LABEL}={MANAGER}; "
                "rename the cluster (`name:` in the config) or remove the object",
            )  # fmt: skip
        if meta.get("deletionTimestamp"):
            raise KubeConflictError(
                verb, kind, config.namespace, name, 409, "it is being deleted", "Wait until it is gone and apply again"
            )

    def _ensure_token(self, config: ClusterConfig) -> Change:
        name = token_secret_name(config)
        if config.cluster_token_secret:
            hint = (
                f"clusterTokenSecret names it; create it with: kubectl -n {config.namespace} create secret generic "
                f"{name} --from-literal={TOKEN_KEY}=$(openssl rand -hex 32)"
            )
            secret = self.objects.read("Secret", config.namespace, name, hint)
            if TOKEN_KEY not in (secret.get("data") or {}):
                raise ConfigError(f"Secret {config.namespace}/{name} (clusterTokenSecret) has no key {TOKEN_KEY!r}")
            return Change("Secret", name, "kept")
        try:
            live = self.objects.read("Secret", config.namespace, name)
        except KubeNotFoundError:
            self.objects.create(render_token_secret(config, secrets.token_urlsafe(32)))
            return Change("Secret", name, "created")
        self._check_ours(config, {**live, "kind": "Secret"}, "use")
        return Change("Secret", name, "kept")

    def apply(
        self, config: ClusterConfig, overlay: str | None = None, create_namespace: bool = False, prune: bool = True
    ) -> list[Change]:
        """Create or update every object of the cluster; returns what changed, in order."""
        manifests = render(config, overlay)
        self.ensure_namespace(config, create_namespace)
        changes = [self._ensure_token(config)]
        for manifest in manifests:
            changes.append(self._apply_one(config, manifest))
        if prune:
            wanted = {object_key(manifest) for manifest in manifests} | {("Secret", token_secret_name(config))}
            for kind in DELETE_ORDER:
                for live in self.objects.list_owned(kind, config.namespace, ownership_labels(config)):
                    name = live["metadata"]["name"]
                    if (kind, name) not in wanted and self.objects.delete(kind, config.namespace, name):
                        changes.append(Change(kind, name, "pruned"))
        return changes

    def _apply_one(self, config: ClusterConfig, manifest: Manifest) -> Change:
        kind, name = object_key(manifest)
        try:
            self.objects.create(manifest)
            return Change(kind, name, "created")
        except KubeConflictError:
            pass
        live = self.objects.read(kind, config.namespace, name)
        self._check_ours(config, {**live, "kind": kind}, "update")
        self.objects.apply(manifest)
        return Change(kind, name, "configured")

    def scale(self, config: ClusterConfig, pool: str, replicas: int, overlay: str | None = None) -> ScaleResult:
        """Set one pool's replicas through its StatefulSet's /scale subresource; other pools are not touched."""
        if replicas < 0:
            raise ConfigError(f"--replicas must be >= 0, got {replicas}")
        if overlay is not None and get_overlay(overlay).ray:
            raise ConfigError("with the ray overlay, KubeRay owns the pods: scale with `afd scale` on the head instead")
        effective = self._effective(config, overlay)
        if pool == "router":
            raise ConfigError(
                "the router runs exactly one replica (it holds the cluster membership); scale attn or an FFN pool"
            )
        pools = effective.pool_names()
        if pool not in pools:
            raise ConfigError(f"unknown pool {pool!r}; pools of cluster {effective.name!r}: {', '.join(pools)}")
        name = workload_name(effective, pool)
        hint = "Apply the cluster first (afd k8s apply)"
        before = self.objects.read_scale(effective.namespace, name, hint)
        after = self.objects.patch_scale(effective.namespace, name, replicas)
        warning = None
        if pool == ATTENTION_POOL and effective.attention.autoscaling is not None:
            provider = effective.attention.autoscaling.provider
            warning = f"the attention pool is autoscaled ({provider}); it will override this count"
        previous = int((before.get("spec") or {}).get("replicas") or 0)
        return ScaleResult(pool, name, previous, int((after.get("spec") or {}).get("replicas") or replicas), warning)

    def _workload(
        self, config: ClusterConfig, kind: str, name: str, pool: str, role: str, accelerator: str
    ) -> WorkloadStatus:
        try:
            live = self.objects.read(kind, config.namespace, name)
        except KubeNotFoundError:
            return WorkloadStatus(pool, role, kind, name, exists=False, accelerator=accelerator)
        spec, status = live.get("spec") or {}, live.get("status") or {}
        return WorkloadStatus(
            pool, role, kind, name, exists=True, desired=int(spec.get("replicas") or 0),
            ready=int(status.get("readyReplicas") or 0), updated=int(status.get("updatedReplicas") or 0),
            accelerator=accelerator,
        )  # fmt: skip

    def status(self, config: ClusterConfig, overlay: str | None = None) -> ClusterStatus:
        """Desired and ready replicas of the router and each pool, plus leftovers not in the config."""
        effective = self._effective(config, overlay)
        namespace = effective.namespace
        router = effective.router
        result = ClusterStatus(effective.name, namespace, token_secret=token_secret_name(effective))
        result.api_url = f"http://{router_name(effective)}.{namespace}.svc:{router.http_port}"
        result.service_type = router.service_type
        if overlay is not None and get_overlay(overlay).ray:
            ray = self._workload(effective, "RayCluster", effective.name, "-", "ray", "per worker group")
            result.workloads.append(ray)
        else:
            result.workloads.append(
                self._workload(effective, "Deployment", router_name(effective), "-", "router", "cpu")
            )
            accelerators = {
                ATTENTION_POOL: effective.attention.accelerator,
                **{p.name: p.accelerator for p in effective.ffn_pools},
            }
            for pool, accelerator in accelerators.items():
                role = "attention" if pool == ATTENTION_POOL else "ffn"
                result.workloads.append(
                    self._workload(
                        effective,
                        "StatefulSet",
                        workload_name(effective, pool),
                        pool,
                        role,
                        _accelerator_text(accelerator),
                    )
                )
            known = {workload.name for workload in result.workloads}
            for live in self.objects.list_owned("StatefulSet", namespace, ownership_labels(effective)):
                meta = live["metadata"]
                if meta["name"] not in known:
                    pool = (meta.get("labels") or {}).get(POOL_LABEL, "?")
                    leftover = WorkloadStatus(pool, "ffn", "StatefulSet", meta["name"], exists=True, in_config=False)
                    leftover.desired = int((live.get("spec") or {}).get("replicas") or 0)
                    leftover.ready = int((live.get("status") or {}).get("readyReplicas") or 0)
                    result.workloads.append(leftover)
        try:
            self.objects.read("Secret", namespace, result.token_secret)
            result.token_secret_present = True
        except KubeNotFoundError:
            result.token_secret_present = False
        autoscaling = effective.attention.autoscaling
        if autoscaling is not None and autoscaling.provider == "hpa":
            try:
                hpa = self.objects.read("HorizontalPodAutoscaler", namespace, workload_name(effective, ATTENTION_POOL))
                hpa_status = hpa.get("status") or {}
                result.autoscaler = (
                    f"HPA {autoscaling.min_replicas}..{autoscaling.max_replicas}: "
                    f"current {hpa_status.get('currentReplicas', '?')}, "
                    f"desired {hpa_status.get('desiredReplicas', '?')}"
                )
            except KubeNotFoundError:
                result.autoscaler = "HPA absent"
        elif autoscaling is not None:
            result.autoscaler = f"KEDA ScaledObject {autoscaling.min_replicas}..{autoscaling.max_replicas}"
        return result

    def delete(self, config: ClusterConfig) -> list[Change]:
        """Delete every object with this cluster's ownership labels (a user-provided token Secret has none)."""
        changes = []
        for kind in DELETE_ORDER:
            for live in self.objects.list_owned(kind, config.namespace, ownership_labels(config)):
                name = live["metadata"]["name"]
                if self.objects.delete(kind, config.namespace, name):
                    changes.append(Change(kind, name, "deleted"))
        return changes
