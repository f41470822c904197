"""The cluster config: what `afd k8s render|apply|scale|status|delete` read from cluster.yaml.

One validated pydantic model is the single source of truth for the Kubernetes objects: the renderer turns it
into manifests, the overlays (hardware presets) transform it, and the client compares what is live against it.
Field names in YAML are camelCase like the Kubernetes objects they end up in; unknown fields are errors, so a
typo never silently falls back to a default. Every error names the field it is about.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from afd.errors import ConfigError

TransportName = Literal["grpc", "gloo", "shm", "nccl"]
"""A↔F data-plane backends of `afd node attn --transport`."""

ATTENTION_POOL = "attn"
"""The attention pool's name on the command line (`afd k8s scale --pool attn`) and in object names."""

RESERVED_POOL_NAMES = frozenset({ATTENTION_POOL, "router", "router-cp", "config", "cluster-token", "head-svc"})
"""Suffixes the renderer uses for other objects; an FFN pool may not take them."""

RESERVED_LABEL_PREFIXES = ("app.kubernetes.io/", "afd.dev/")
"""Label prefixes of the labels afd sets (selectors and ownership); `labels` may not override them."""

MAX_WORKLOAD_NAME = 52
"""A StatefulSet's pods get a `controller-revision-hash` label `<name>-<10 chars>`; labels stop at 63."""

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$")
_QUALIFIED_NAME = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_NATIVE_RESOURCES = ("cpu", "memory", "ephemeral-storage", "storage", "pods")


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, alias_generator=to_camel, use_attribute_docstrings=True
    )


def _check_dns_label(value: str, what: str, max_length: int) -> str:
    if not _DNS_LABEL.match(value) or len(value) > max_length:
        raise ValueError(
            f"{what} {value!r} must be a DNS label: lowercase letters, digits and '-', starting with a letter, "
            f"at most {max_length} characters"
        )
    return value


def _check_quantities(values: dict[str, str]) -> dict[str, str]:
    for name, quantity in values.items():
        if not _QUANTITY.match(quantity):
            raise ValueError(f"{name}: {quantity!r} is not a Kubernetes quantity (e.g. 500m, 4, 16Gi)")
    return values


class Resources(_Model):
    """CPU and memory for one container (the accelerator is set apart, in `accelerator`)."""

    requests: dict[str, str] = Field(default_factory=dict)
    """Scheduling requests, e.g. {cpu: "8", memory: 64Gi}."""
    limits: dict[str, str] = Field(default_factory=dict)
    """Hard limits, e.g. {memory: 64Gi}; leave cpu unset to avoid CFS throttling of the decode loop."""

    @field_validator("requests", "limits", mode="before")
    @classmethod
    def _quantities_as_strings(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: str(item) if isinstance(item, int | float) else item for key, item in value.items()}
        return value

    @field_validator("requests", "limits")
    @classmethod
    def _valid_quantities(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_quantities(value)


class Accelerator(_Model):
    """The device a pool's pods get from a device plugin, and on which nodes such devices live."""

    resource: str = "nvidia.com/gpu"
    """Extended resource name advertised by the device plugin (nvidia.com/gpu, amd.com/gpu, ...)."""
    count: int = Field(default=1, ge=1)
    """Devices per pod (one AFD node process per pod)."""
    product: str | None = None
    """Value of the GPU-product node label to pin the pool to, e.g. NVIDIA-H100-80GB-HBM3, NVIDIA-L40S, NVIDIA-H20."""
    product_label: str = "nvidia.com/gpu.product"
    """Node label that carries the product name (set by NVIDIA GPU feature discovery)."""

    @field_validator("resource")
    @classmethod
    def _extended_resource(cls, value: str) -> str:
        if value in _NATIVE_RESOURCES or value.startswith("hugepages-"):
            raise ValueError(f"resource {value!r} is a native resource; set it in `resources`, not as an accelerator")
        if not _QUALIFIED_NAME.match(value) or value.split("/")[0].endswith("kubernetes.io"):
            raise ValueError(
                f"resource {value!r} is not an extended resource name like nvidia.com/gpu (<domain>/<name>, "
                "domain outside kubernetes.io)"
            )
        return value

    @property
    def device(self) -> Literal["cuda"]:
        """The torch device of `afd node --device` (ROCm builds of torch also call theirs cuda)."""
        return "cuda"


class Toleration(_Model):
    """A Kubernetes toleration, e.g. for the taint GPU node pools carry."""

    key: str | None = None
    """Taint key, e.g. nvidia.com/gpu; empty with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Exists matches any value; Equal matches `value`."""
    value: str | None = None
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; empty tolerates every effect."""
    toleration_seconds: int | None = Field(default=None, ge=0)
    """For NoExecute: how long the pod stays bound after the taint appears."""

    @model_validator(mode="after")
    def _operator_fits(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("operator Exists takes no value")
        if self.operator == "Equal" and self.key is None:
            raise ValueError("operator Equal needs a key (use operator Exists to tolerate every taint)")
        return self


class Placement(_Model):
    """Where a workload's pods may run (beyond its accelerator's product label)."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Extra node labels the pods require, e.g. {cloud.google.com/gke-nodepool: gpu-h100}."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the pods tolerate."""


class Autoscaling(_Model):
    """Scale the attention pool on queued requests (the router's vllm:num_requests_waiting)."""

    provider: Literal["hpa", "keda"] = "hpa"
    """hpa: a HorizontalPodAutoscaler reading the metric through prometheus-adapter; keda: a KEDA ScaledObject."""
    min_replicas: int = Field(default=1, ge=1)
    """Lower bound of attention nodes."""
    max_replicas: int = Field(default=4, ge=1)
    """Upper bound of attention nodes."""
    target_waiting_per_replica: int = Field(default=8, ge=1)
    """Queued requests per attention node at which another node is added."""
    metric_name: str = "vllm_num_requests_waiting"
    """hpa: name under which prometheus-adapter serves vllm:num_requests_waiting for the router Service."""
    prometheus_address: str = "http://prometheus-server.monitoring.svc:80"
    """keda: base URL of the Prometheus server that scrapes the router."""

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) is larger than maxReplicas ({self.max_replicas})")
        return self


class Monitoring(_Model):
    """Prometheus Operator object scraping the router's /metrics (nodes report through the router's heartbeats,
    so the router is the only scrape target; deploy/grafana/afd-dashboard.json reads what it exports)."""

    kind: Literal["ServiceMonitor", "PodMonitor"] = "ServiceMonitor"
    """ServiceMonitor: through the router Service (series keep the `service` label the autoscalers select on);
    PodMonitor: the router pod directly (no Service in the path, no `service` label)."""
    interval: str = Field(default="15s", pattern=r"^(\d+(ms|s|m|h))+$")
    """Scrape interval, Prometheus duration (15s, 1m)."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels on the monitor: the ones your Prometheus selects monitors by (kube-prometheus-stack:
    `release: <helm release name>`)."""


class _Pool(Placement):
    replicas: int = Field(default=1, ge=0)
    """Node processes (pods) in the pool; 0 parks the pool."""
    accelerator: Accelerator | None = None
    """The pool's device; omitted means CPU (`--device cpu`)."""
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "2", "memory": "8Gi"}, limits={"memory": "8Gi"})
    )
    """CPU and memory of each node process."""
    env: dict[str, str] = Field(default_factory=dict)
    """Extra environment of the node process (e.g. NCCL_SOCKET_IFNAME)."""
    extra_args: list[str] = Field(default_factory=list)
    """Extra arguments appended to `afd node ...`."""

    @model_validator(mode="after")
    def _accelerator_not_in_resources(self) -> _Pool:
        if self.accelerator is not None:
            for section in ("requests", "limits"):
                if self.accelerator.resource in getattr(self.resources, section):
                    raise ValueError(
                        f"resources.{section} sets {self.accelerator.resource}; "
                        "set the device count in accelerator.count instead"
                    )
        return self

    @property
    def device(self) -> Literal["cpu", "cuda"]:
        return "cpu" if self.accelerator is None else self.accelerator.device


class AttentionPool(_Pool):
    """The attention pool: KV cache, attention, gate, sampling. Scaled as `--pool attn`."""

    port: int = Field(default=50061, ge=1, le=65535)
    """gRPC port of each attention node (control plane, health, data plane)."""
    transport: TransportName = "grpc"
    """A↔F data plane the attention nodes open to FFN nodes (FFN nodes accept each of them)."""
    microbatches: Literal["auto"] | int = "auto"
    """Ping-pong microbatches per decode step: auto (the router's plan) or a fixed K >= 1."""
    autoscaling: Autoscaling | None = None
    """Scale this pool on queued requests; when set, `replicas` only seeds the first apply."""

    @field_validator("microbatches")
    @classmethod
    def _positive_microbatches(cls, value: Literal["auto"] | int) -> Literal["auto"] | int:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"microbatches must be 'auto' or an integer >= 1, got {value}")
        return value


class FfnPool(_Pool):
    """A pool of FFN (expert) nodes on one kind of hardware. Scaled as `--pool <name>`."""

    name: str
    """Pool name, unique in the cluster (e.g. ffn, ffn-h100, ffn-l40s); objects are named <cluster>-<name>."""
    port: int = Field(default=50071, ge=1, le=65535)
    """gRPC port of each FFN node."""

    @field_validator("name")
    @classmethod
    def _pool_name(cls, value: str) -> str:
        _check_dns_label(value, "pool name", 24)
        if value in RESERVED_POOL_NAMES:
            raise ValueError(f"pool name {value!r} is reserved (reserved: {', '.join(sorted(RESERVED_POOL_NAMES))})")
        return value


class Router(Placement):
    """The router: OpenAI API, admission, placement, membership. One replica (it holds the membership)."""

    http_port: int = Field(default=8000, ge=1, le=65535)
    """OpenAI API, /health and /metrics."""
    grpc_port: int = Field(default=50051, ge=1, le=65535)
    """Control plane the nodes register with."""
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """How the router Service is exposed."""
    api_key_secret: str | None = None
    """Existing Secret with key `api-key`: clients must send it as a Bearer token (vLLM's --api-key)."""
    resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "1", "memory": "2Gi"}, limits={"memory": "2Gi"})
    )
    """CPU and memory of the router."""
    extra_args: list[str] = Field(default_factory=list)
    """Extra arguments appended to `afd node router`."""

    @model_validator(mode="after")
    def _distinct_ports(self) -> Router:
        if self.http_port == self.grpc_port:
            raise ValueError(f"httpPort and grpcPort are both {self.http_port}")
        return self


class PvcModel(_Model):
    """A PersistentVolumeClaim holding the checkpoint (ReadOnlyMany or ReadWriteMany to span nodes)."""

    claim_name: str
    """Name of the existing claim in the cluster's namespace."""
    sub_path: str | None = None
    """Directory of the checkpoint inside the volume (config.json is there)."""


class Model(_Model):
    """Where the HF checkpoint lives: exactly one of pvc, hostPath, imagePath."""

    pvc: PvcModel | None = None
    """A claim mounted read-only into every pod."""
    host_path: str | None = None
    """A directory present on every node (e.g. a local NVMe cache), mounted read-only."""
    image_path: str | None = None
    """A directory inside the image (an image built FROM the AFD image with the checkpoint copied in)."""
    name: str | None = None
    """Model name clients send (`--served-model-name`); the router's default when omitted."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Model:
        chosen = [name for name in ("pvc", "hostPath", "imagePath") if getattr(self, _snake(name)) is not None]
        if len(chosen) != 1:
            got = ", ".join(chosen) if chosen else "none"
            raise ValueError(f"set exactly one of pvc, hostPath, imagePath (got {got})")
        for name in ("host_path", "image_path"):
            path = getattr(self, name)
            if path is not None and not path.startswith("/"):
                raise ValueError(f"{to_camel(name)} must be an absolute path, got {path!r}")
        return self


class RayOptions(_Model):
    """Settings used only by the `ray` overlay (a KubeRay RayCluster running `afd up --ray`)."""

    version: str = "2.60.0"
    """Ray version in the image (RayCluster spec.rayVersion)."""
    head_resources: Resources = Field(
        default_factory=lambda: Resources(requests={"cpu": "2", "memory": "8Gi"}, limits={"memory": "8Gi"})
    )
    """CPU and memory of the Ray head (GCS + the router actor)."""
    extra_up_args: list[str] = Field(default_factory=lambda: ["--host", "0.0.0.0"])
    """Extra arguments of `afd up --ray` on the head (the API must listen beyond localhost for the head Service)."""


class ClusterConfig(_Model):
    """An AFD cluster on Kubernetes: a router, one attention pool and one or more FFN pools."""

    name: str = "afd"
    """Cluster name: prefix of every object and value of the app.kubernetes.io/instance label."""
    namespace: str = "afd"
    """Namespace of every object."""
    image: str
    """The AFD image (deploy/docker/Dockerfile.cuda or Dockerfile.cpu), e.g. registry.example.com/afd:0.1.0-cuda."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Kubernetes imagePullPolicy."""
    image_pull_secrets: list[str] = Field(default_factory=list)
    """Secrets for a private registry."""
    service_account: str | None = None
    """ServiceAccount of the pods; the namespace default when omitted (the nodes need no API access)."""
    run_as_user: int = Field(default=10001, ge=1)
    """Non-root uid of the processes (the image's `afd` user)."""
    model: Model
    """The checkpoint."""
    router: Router = Field(default_factory=Router)
    """The router."""
    attention: AttentionPool
    """The attention pool."""
    ffn_pools: list[FfnPool]
    """FFN pools, one per kind of hardware (at least one)."""
    cluster_token_secret: str | None = None
    """Existing Secret with key `cluster-token` shared by all nodes; when omitted, `apply` creates
    <name>-cluster-token with a random token (and `delete` removes it)."""
    termination_grace_period_seconds: int = Field(default=60, ge=0)
    """Time a node gets to drain and leave on SIGTERM."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Extra labels on every object (e.g. team, cost center)."""
    ray: RayOptions = Field(default_factory=RayOptions)
    """Settings of the `ray` overlay."""
    monitoring: Monitoring | None = None
    """A ServiceMonitor or PodMonitor (monitoring.coreos.com/v1) for the router; omitted: none (the router
    Service's prometheus.io annotations still serve annotation-based scraping)."""

    @model_validator(mode="before")
    @classmethod
    def _pools_present(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if data.get("attention") is None:
                raise ValueError("attention: the attention pool is required")
            pools = data.get("ffnPools", data.get("ffn_pools"))
            if not pools:
                raise ValueError("ffnPools: at least one FFN pool is required")
        return data

    @field_validator("name")
    @classmethod
    def _cluster_name(cls, value: str) -> str:
        return _check_dns_label(value, "cluster name", 24)

    @field_validator("labels")
    @classmethod
    def _user_labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(RESERVED_LABEL_PREFIXES):
                raise ValueError(
                    f"label {key!r} is set by afd itself (reserved prefixes: {', '.join(RESERVED_LABEL_PREFIXES)})"
                )
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return _check_dns_label(value, "namespace", 63)

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        seen: set[str] = set()
        for index, pool in enumerate(self.ffn_pools):
            if pool.name in seen:
                raise ValueError(
                    f"ffnPools[{index}].name: duplicate pool name {pool.name!r} (pool names must be unique)"
                )
            seen.add(pool.name)
            workload = f"{self.name}-{pool.name}"
            if len(workload) > MAX_WORKLOAD_NAME:
                raise ValueError(
                    f"ffnPools[{index}].name: object name {workload!r} is {len(workload)} characters; "
                    f"cluster name + pool name must stay within {MAX_WORKLOAD_NAME}"
                )
        transport = self.attention.transport
        if transport == "nccl":
            cpu_pools = [f"ffnPools[{i}] ({p.name})" for i, p in enumerate(self.ffn_pools) if p.accelerator is None]
            if self.attention.accelerator is None:
                cpu_pools.insert(0, "attention")
            if cpu_pools:
                raise ValueError(
                    "attention.transport: 'nccl' needs a GPU accelerator on every pool; "
                    f"without one: {', '.join(cpu_pools)}"
                )
        if transport == "shm":
            raise ValueError(
                "attention.transport: 'shm' joins processes on one host, and pods of different pools share no memory "
                "on Kubernetes; use grpc, gloo or nccl"
            )
        if self.monitoring is not None and self.monitoring.kind == "PodMonitor" and self.attention.autoscaling:
            raise ValueError(
                "monitoring.kind: a PodMonitor's series carry no `service` label, which attention.autoscaling "
                "selects the router's queue by; use ServiceMonitor"
            )
        return self

    def pool_names(self) -> list[str]:
        """Every scalable pool: `attn` first, then the FFN pools in config order."""
        return [ATTENTION_POOL, *(pool.name for pool in self.ffn_pools)]

    def to_yaml(self) -> str:
        """The config as YAML (camelCase keys; unset and empty optional fields left out; pool names first)."""
        data = _drop_empty(self.model_dump(mode="json", by_alias=True, exclude_none=True))
        data["ffnPools"] = [{"name": pool.pop("name"), **pool} for pool in data["ffnPools"]]
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _drop_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drop_empty(item) for key, item in value.items() if item not in ({}, [])}
    if isinstance(value, list):
        return [_drop_empty(item) for item in value]
    return value


def _snake(camel: str) -> str:
    return re.sub(r"([A-Z])", lambda match: "_" + match.group(1).lower(), camel)


def _format_location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in ("int", "str", "float", "bool") or part.startswith("function-") or "[" in part:
            continue  # union-branch tags that pydantic adds to locations; they mean nothing to a user
        else:
            text += f".{part}" if text else part
    return text


def _format_error(error: dict[str, Any]) -> str:
    location = _format_location(tuple(error["loc"]))
    message = str(error["msg"]).removeprefix("Value error, ")
    kind = error["type"]
    if kind == "extra_forbidden":
        message = "unknown field (field names are camelCase, see the README section 'Run on Kubernetes')"
    elif kind not in ("missing", "value_error", "model_type") and not isinstance(error.get("input"), dict | list):
        message += f" (got {error.get('input')!r})"
    return f"{location}: {message}" if location else message  # whole-config checks name their fields themselves


def parse_cluster_config(data: Any, source: str = "cluster config") -> ClusterConfig:
    """Validate a parsed YAML document; ConfigError lists every problem, each naming its field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields at the top level, got {type(data).__name__}")
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as error:
        problems = [_format_error(dict(item)) for item in error.errors(include_url=False)]
        raise ConfigError(f"invalid {source}:\n" + "\n".join(f"  - {problem}" for problem in problems)) from None


def load_cluster_config(path: Path) -> ClusterConfig:
    """Read and validate cluster.yaml."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read cluster config {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_cluster_config(data, str(path))
