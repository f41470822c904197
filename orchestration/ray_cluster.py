"""`afd up --ray`: the cluster of the local launcher (router, attention pool, FFN pools), every node a Ray actor.

Each node actor (orchestration/ray_node.py) hosts the same server `afd node ...` runs; Ray only places
the actors and carries their small start arguments. Nodes talk to each other and to the router over
their own gRPC ports, exactly as processes do, so `afd scale/status/down` and every client work unchanged.

Placement. Every pool has placement groups of its own: the router's (one bundle, PACK), the attention
pool's, and one set per FFN pool (SPREAD: nodes of a pool go to different machines when there are several,
for memory and network bandwidth, and share one machine when that is all there is; STRICT_SPREAD would
refuse a one-machine cluster). Heterogeneous pools land on the right hardware through the custom Ray
resources the KubeRay RayCluster of the `ray` overlay advertises (orchestration/k8s/kuberay.py), one
unit per pod: `afd_router` on the head, `afd_pool_attn` on attention workers, `afd_pool_<pool>` on each
FFN worker group. Where the cluster advertises a pool's resource, each of its bundles takes one unit (one
node per unit, so one per pod) and that unit's share of its machine's CPUs and GPUs (divided by the afd_*
units the machine advertises), and the node runs as many torch threads as it got CPUs. Where it does not (a plain
local Ray instance), a bundle takes only a share of a CPU and the node goes wherever Ray has room: the
nodes then share the cores, as the local launcher's processes do.

Scaling. Placement groups cannot grow or shrink, so a pool's reservation is a list of groups: the one made
at start, sized to the pool, and one more for each scale-up that finds no free bundle. A removed node frees
its bundle for the next scale-up; a group none of whose bundles holds a node is removed, so a shrunk pool
gives its machines back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from afd.builtin_model import builtin_model_dir
from afd.errors import AfdError, ConfigError
from afd.wire.auth import read_token_file
from orchestration.k8s.config import ATTENTION_POOL
from orchestration.k8s.kuberay import HEAD_ROUTER_RESOURCE, pool_resource
from orchestration.local_cluster import LocalClusterConfig, device_names
from orchestration.ray_node import WILDCARD_HOSTS, NodeActor, NodeInfo, NodeLaunch, NodeRole
from orchestration.router_view import cluster_view, wait_until_ready
from router.microbatch_plan import parse_microbatches

log = logging.getLogger("afd.launcher")

POOL_RESOURCE_PREFIX = pool_resource("")
"""Custom resources named afd_pool_<pool> mark the machines of a pool."""
ROUTER_POOL = "router"


@dataclass(frozen=True)
class RayOptions:
    """Ray-specific settings of `afd up --ray` (what the cluster holds comes from LocalClusterConfig)."""

    local_num_cpus: int | None = None
    """CPUs of the local Ray instance started when no address is given; this machine's count when None."""
    cpu_share: float = 0.25
    """Logical CPUs a node actor reserves where the cluster advertises no afd pool resource (a share: the
    nodes share the cores like the local launcher's processes; torch threads bound what each really uses)."""
    placement_timeout_s: float = 120.0
    """How long a placement group may wait for resources before start or scale fails."""
    leave_timeout_s: float = 120.0
    """How long a removed node may drain / hand its experts over before its actor is killed."""
    gpu_share: float = 1.0
    """GPUs a node of a cuda pool reserves where the cluster advertises no afd pool resource (Ray's num_gpus:
    1 = a GPU of its own; 0.5 = two nodes share one). Ray makes the reserved GPU the actor's cuda:0."""

    def __post_init__(self) -> None:
        if self.local_num_cpus is not None and self.local_num_cpus < 1:
            raise ConfigError(f"local_num_cpus must be >= 1, got {self.local_num_cpus}")
        if not 0 < self.cpu_share <= 64:
            raise ConfigError(f"cpu_share must be in (0, 64], got {self.cpu_share}")
        if not 0 < self.gpu_share <= 8:
            raise ConfigError(f"gpu_share must be in (0, 8], got {self.gpu_share}")
        if self.placement_timeout_s <= 0 or self.leave_timeout_s <= 0:
            raise ConfigError("placement_timeout_s and leave_timeout_s must be positive")


@dataclass(frozen=True)
class PoolLayout:
    """What one node of a pool reserves, and how the pool's bundles spread."""

    name: str
    """Pool name: router, attn, or an FFN pool's name."""
    role: NodeRole
    """Role of the pool's nodes."""
    bundle: dict[str, float]
    """Resources of one bundle (= one node actor)."""
    strategy: str
    """Placement group strategy: PACK or SPREAD."""
    capacity: int | None
    """Nodes the cluster can hold (units of the pool resource); None = bounded only by CPUs."""
    threads: int | None
    """torch threads of each node of the pool."""
    device: str = "cpu"
    """`--device` of the pool's nodes: cpu, or a bare accelerator type (cuda) whose device Ray assigned."""


@dataclass(frozen=True)
class BundleSlot:
    """One bundle of one placement group: where one node actor runs."""

    group: Any
    """ray.util.placement_group.PlacementGroup"""
    index: int
    """Bundle index in the group."""


class PoolPlacement:
    """The placement groups of one pool and which of their bundles hold a node."""

    def __init__(self, layout: PoolLayout, tag: str) -> None:
        self.layout = layout
        self.tag = tag
        self.used = 0
        self._free: list[BundleSlot] = []
        self._held: dict[Any, int] = {}  # placement group id -> bundles holding a node
        self._groups: dict[Any, Any] = {}  # placement group id -> group
        self._made = 0

    def reserve(self, count: int, timeout_s: float) -> list[BundleSlot]:
        """`count` bundles: free ones first, then a new group for the rest (waits until Ray placed it)."""
        from ray.util.placement_group import placement_group, remove_placement_group

        slots = [self._free.pop() for _ in range(min(count, len(self._free)))]
        missing = count - len(slots)
        if missing:
            name = f"{self.tag}-{self.layout.name}-{self._made}"
            self._made += 1
            group = placement_group([dict(self.layout.bundle)] * missing, strategy=self.layout.strategy, name=name)
            if not group.wait(timeout_s):
                remove_placement_group(group)
                self._free.extend(slots)
                import ray

                raise AfdError(
                    f"Ray could not reserve {missing} x {self.layout.bundle} for pool {self.layout.name!r} within "
                    f"{timeout_s:.0f} s; available now: {ray.available_resources()}"
                )
            self._groups[group.id] = group
            self._held[group.id] = 0
            slots += [BundleSlot(group, index) for index in range(missing)]
        for slot in slots:
            self._held[slot.group.id] += 1
        self.used += len(slots)
        return slots

    def release(self, slot: BundleSlot) -> None:
        """The node on `slot` is gone: free its bundle, and remove its group if that held the last node."""
        from ray.util.placement_group import remove_placement_group

        self.used -= 1
        group_id = slot.group.id
        self._held[group_id] -= 1
        if self._held[group_id] > 0:
            self._free.append(slot)
            return
        self._free = [free for free in self._free if free.group.id != group_id]
        del self._held[group_id]
        with contextlib.suppress(Exception):
            remove_placement_group(self._groups.pop(group_id))

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self._groups.values():
            with contextlib.suppress(Exception):
                remove_placement_group(group)
        self._groups.clear()
        self._held.clear()
        self._free.clear()
        self.used = 0


@dataclass
class RayNode:
    """A node actor the launcher started."""

    node_id: str
    role: NodeRole
    pool: str
    actor: Any
    """Ray actor handle of NodeActor."""
    slot: BundleSlot
    ready_ref: Any
    """ObjectRef of actor.ready()."""
    info: NodeInfo | None = None


def _is_afd_resource(name: str) -> bool:
    return name == HEAD_ROUTER_RESOURCE or name.startswith(POOL_RESOURCE_PREFIX)


def _share(kind: str, resource: str, machines: Sequence[Mapping[str, float]]) -> float:
    """How much of `kind` (CPU, GPU) one node of `resource` may reserve: each machine's amount divided among
    the AFD nodes it can host (its afd_* resource units), the smallest share over the machines advertising
    `resource`. Ray takes fractions of one unit or whole units, with 4 decimals; never rounds up."""
    shares = [
        machine.get(kind, 0.0) / sum(units for name, units in machine.items() if _is_afd_resource(name))
        for machine in machines
        if machine.get(resource, 0) > 0
    ]
    share = min(shares, default=0.0)
    return float(math.floor(share)) if share >= 1 and kind == "GPU" else math.floor(share * 10_000) / 10_000


def ray_device(text: str, option: str) -> str:
    """The device a Ray pool's actors compute on, from `--attn-device`/`--ffn-device`: cpu or cuda.

    Ray, not the launcher, picks an actor's GPU (num_gpus; it sets CUDA_VISIBLE_DEVICES so the GPU is the
    actor's cuda:0), so indices are refused rather than silently ignored; and Ray reserves only CUDA GPUs
    this way, so other accelerator types are refused too rather than crowded onto one device unreserved."""
    names = device_names(text, option)
    types = {torch_device_type(name) for name in names}
    if any(":" in name for name in names):
        raise ConfigError(
            f"{option} {text!r}: with --ray, Ray assigns each actor its GPU (num_gpus); give the device type "
            f"({'/'.join(sorted(types))}) without an index"
        )
    if len(types) > 1:
        raise ConfigError(f"{option} {text!r}: one device type per pool with --ray")
    (kind,) = types
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"{option} {text!r}: with --ray, a pool computes on cpu or cuda (Ray reserves CUDA GPUs)")
    return kind


def torch_device_type(name: str) -> str:
    import torch

    return torch.device(name).type


def plan_pools(
    config: LocalClusterConfig,
    options: RayOptions,
    totals: Mapping[str, float],
    machines: Sequence[Mapping[str, float]],
) -> list[PoolLayout]:
    """The pools of a Ray cluster whose resources are `totals` (ray.cluster_resources()) over `machines`
    (each alive node's resources): router, attention, and one FFN pool per afd_pool_<name> resource other
    than the attention pool's (a single CPU-only pool named ffn when there is none)."""
    shared_threads = config.threads_per_node or max(1, int(totals.get("CPU", 1)) // (config.attn + config.ffn))
    devices = {
        "router": "cpu",
        "attn": ray_device(config.attn_device, "--attn-device"),
        "ffn": ray_device(config.ffn_device, "--ffn-device"),
    }

    def layout(name: str, role: NodeRole, resource: str, strategy: str) -> PoolLayout:
        device = devices[role]
        if resource not in totals:
            threads = None if role == "router" else shared_threads
            bundle = {"CPU": options.cpu_share, **({"GPU": options.gpu_share} if device == "cuda" else {})}
            return PoolLayout(name, role, bundle, strategy, None, threads, device)
        cpus, gpus = _share("CPU", resource, machines), _share("GPU", resource, machines)
        if device == "cuda" and gpus <= 0:
            raise ConfigError(
                f"pool {name!r} computes on cuda, but the Ray machines advertising {resource} have no GPU to "
                f"give each of its nodes (GPU per machine: {[m.get('GPU', 0) for m in machines if resource in m]})"
            )
        bundle = {resource: 1.0, **({"CPU": cpus} if cpus > 0 else {}), **({"GPU": gpus} if gpus > 0 else {})}
        threads = None if role == "router" else config.threads_per_node or max(1, int(cpus))
        return PoolLayout(name, role, bundle, strategy, int(totals[resource]), threads, device)

    attn_resource = pool_resource(ATTENTION_POOL)
    ffn_resources = sorted(r for r in totals if r.startswith(POOL_RESOURCE_PREFIX) and r != attn_resource)
    ffn_pools = [layout(r.removeprefix(POOL_RESOURCE_PREFIX), "ffn", r, "SPREAD") for r in ffn_resources]
    return [
        layout(ROUTER_POOL, "router", HEAD_ROUTER_RESOURCE, "PACK"),
        layout(ATTENTION_POOL, "attn", attn_resource, "SPREAD"),
        *(ffn_pools or [layout("ffn", "ffn", pool_resource("ffn"), "SPREAD")]),
    ]


def assign_new_nodes(role: str, free: Mapping[str, float], count: int) -> dict[str, int]:
    """How many of `count` new nodes each pool gets, one at a time to the pool with the most free room
    (`free`: pool -> nodes it can still take, inf when unbounded; ties go to the first pool)."""
    picked = dict.fromkeys(free, 0)
    for _ in range(count):
        best = max(free, key=lambda pool: free[pool] - picked[pool], default=None)
        if best is None or free[best] - picked[best] <= 0:
            raise ConfigError(
                f"no room for another {role} node: the Ray cluster's afd_pool_* resources are all in use "
                f"(free per pool before this scale: {dict(free)})"
            )
        picked[best] += 1
    return {pool: n for pool, n in picked.items() if n}


@dataclass
class RayCluster:
    """The launcher of `afd up --ray`, with LocalCluster's methods and attributes: start(), scale(attn, ffn),
    cluster(), wait_until_ready(node_ids), stop(timeout), remove_workdir(); api_url, base_url, workdir
    (cluster-token, nodes.json), http_port, grpc_port. connect() joins Ray without starting the cluster."""

    config: LocalClusterConfig
    address: str | None = None
    """Ray cluster to join (host:port, ray://host:10001 or auto); RAY_ADDRESS, as Ray reads it, when None;
    without either a local Ray instance sized to this machine, shut down again by stop()."""
    options: RayOptions = field(default_factory=RayOptions)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="afd-ray-cluster-")))
    nodes: dict[str, RayNode] = field(default_factory=dict)
    router: RayNode | None = None
    http_port: int | None = None
    grpc_port: int | None = None
    pools: dict[str, PoolPlacement] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self._microbatches = parse_microbatches(self.config.microbatches)
        except ConfigError:
            self.remove_workdir()
            raise
        self._next_index = {"attn": 0, "ffn": 0}
        self._lock = threading.RLock()
        self._owns_ray = False
        self._tag = f"afd-{secrets.token_hex(3)}"
        self._api_host = self.config.host
        self._router_address: str | None = None
        self._remote_actor: Any = None
        self._token = ""
        self._api_key: str | None = None
        self.model: str | None = None
        self.token_file: Path | None = None

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    @property
    def base_url(self) -> str:
        return f"http://{self._api_host}:{self.http_port}"

    # ---- Ray -------------------------------------------------------------------------------------------
    def connect(self) -> None:
        """Join the Ray cluster (or start the local instance); `start` calls it, tests call it to probe Ray."""
        import ray

        if ray.is_initialized():
            return
        target = self.address or os.environ.get("RAY_ADDRESS")
        # ray.init replaces the driver's SIGTERM handler with sys.exit; `afd up` has its own graceful one.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        try:
            if target:
                ray.init(address=target, log_to_driver=False, logging_level=logging.WARNING)
            else:
                ray.init(
                    num_cpus=self.options.local_num_cpus or os.cpu_count() or 1,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.WARNING,
                )
        except Exception as exc:
            where = f"connect to the Ray cluster at {target}" if target else "start a local Ray instance"
            raise AfdError(f"could not {where}: {exc}") from exc
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        self._owns_ray = True

    def _layout(self) -> None:
        """One PoolPlacement per pool, laid out from the resources the Ray cluster advertises now."""
        import ray

        machines = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        if self.config.host not in WILDCARD_HOSTS and len(machines) > 1:
            raise ConfigError(
                f"the Ray cluster has {len(machines)} machines, which cannot reach each other on "
                f"--host {self.config.host}; bind an interface they share, e.g. --host 0.0.0.0"
            )
        layouts = plan_pools(self.config, self.options, ray.cluster_resources(), machines)
        self.pools = {layout.name: PoolPlacement(layout, self._tag) for layout in layouts}
        for layout in layouts:
            log.info(
                "pool %s: bundles %s, %s, capacity %s", layout.name, layout.bundle, layout.strategy, layout.capacity
            )

    def _spawn(self, launch: NodeLaunch, pool: str, slot: BundleSlot) -> RayNode:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self._remote_actor is None:
            self._remote_actor = ray.remote(NodeActor)
        bundle = self.pools[pool].layout.bundle
        actor = self._remote_actor.options(
            name=f"{self._tag}-{launch.node_id}",
            num_cpus=bundle.get("CPU", 0),
            num_gpus=bundle.get("GPU", 0),
            resources={name: amount for name, amount in bundle.items() if name not in ("CPU", "GPU")},
            max_concurrency=2,  # stop() must be able to interrupt a ready() that waits
            scheduling_strategy=PlacementGroupSchedulingStrategy(slot.group, placement_group_bundle_index=slot.index),
        ).remote(launch)
        return RayNode(launch.node_id, launch.role, pool, actor, slot, actor.ready.remote(self.config.start_timeout_s))

    def _discard(self, node: RayNode) -> None:
        """Kill a node's actor (after it left, or when it failed) and free its bundle."""
        import ray

        with contextlib.suppress(Exception):
            ray.kill(node.actor, no_restart=True)
        self.pools[node.pool].release(node.slot)
        self.nodes.pop(node.node_id, None)
        if node is self.router:
            self.router = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        config = self.config
        with self._lock:
            self.connect()
            if config.model is None:
                builtin_model_dir()  # made once here; actors on this machine find it cached
            self.model = str(config.model) if config.model else None
            token = self.workdir / "cluster-token"
            token.write_text(secrets.token_urlsafe(32))
            token.chmod(0o600)
            self.token_file = token
            self._token = read_token_file(token)
            self._api_key = read_token_file(config.api_key_file) if config.api_key_file else None
            self._layout()
            self._start_router()
            self.scale(config.attn, config.ffn)

    def _start_router(self) -> None:
        config = self.config
        slot = self.pools[ROUTER_POOL].reserve(1, self.options.placement_timeout_s)[0]
        launch = NodeLaunch(
            node_id="router",
            role="router",
            host=config.host,
            cluster_token=self._token,
            model=self.model,
            http_port=config.http_port,
            served_model_name=config.served_model_name,
            api_key=self._api_key,
            microbatches=self._microbatches,
        )
        router = self.router = self._spawn(launch, ROUTER_POOL, slot)
        self._await_started([router])
        assert router.info is not None
        self._router_address = router.info["address"]
        self.grpc_port = int(self._router_address.rsplit(":", 1)[1])
        self.http_port = router.info["http_port"]
        self._api_host = router.info["node_ip"] if config.host in WILDCARD_HOSTS else config.host

    def _await_started(self, nodes: list[RayNode]) -> None:
        """Until every actor's ready() returned; failed or late actors are killed and reported."""
        import ray

        pending = {node.ready_ref: node for node in nodes}
        failures: list[str] = []
        deadline = time.monotonic() + self.config.start_timeout_s + 10
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                failures += [f"{node.node_id} did not start in time" for node in pending.values()]
                break
            node = pending.pop(done[0])
            try:
                node.info = ray.get(done[0])
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc  # RayTaskError carries the node's own exception
                failures.append(f"{node.node_id} failed to start: {type(cause).__name__}: {cause}")
        for node in nodes:
            if node.info is None:
                self._discard(node)
        if failures:
            raise AfdError("; ".join(failures))

    def _live(self, role: NodeRole) -> list[RayNode]:
        """The role's nodes that still serve, oldest first; ones that stopped by themselves are cleaned up."""
        import ray

        nodes = [node for node in self.nodes.values() if node.role == role]
        answers = [node.actor.serving.remote() for node in nodes]
        live = []
        for node, answer in zip(nodes, answers, strict=True):
            try:
                serving = ray.get(answer, timeout=10)
            except Exception:
                serving = False
            if serving:
                live.append(node)
            else:
                self._discard(node)
        return live

    def _add(self, role: NodeRole, count: int) -> list[RayNode]:
        reserved: list[tuple[str, BundleSlot]] = []
        try:
            free = {
                name: math.inf if pool.layout.capacity is None else pool.layout.capacity - pool.used
                for name, pool in self.pools.items()
                if pool.layout.role == role
            }
            for pool, n in assign_new_nodes(role, free, count).items():
                reserved += [(pool, slot) for slot in self.pools[pool].reserve(n, self.options.placement_timeout_s)]
        except AfdError:
            for pool, slot in reserved:
                self.pools[pool].release(slot)
            raise
        config, started = self.config, []
        for pool, slot in reserved:
            node_id = f"{role}-{self._next_index[role]}"
            self._next_index[role] += 1
            launch = NodeLaunch(
                node_id=node_id,
                role=role,
                host=config.host,
                cluster_token=self._token,
                model=self.model,
                router=self._router_address,
                microbatches=self._microbatches,
                transport=config.transport,
                threads=self.pools[pool].layout.threads,
                dtype=config.dtype,
                device=self.pools[pool].layout.device,
            )
            node = self.nodes[node_id] = self._spawn(launch, pool, slot)
            started.append(node)
        return started

    def scale(self, attn: int | None = None, ffn: int | None = None) -> None:
        """Add or gracefully remove node actors until the pools have the requested sizes; waits until done."""
        import ray

        if (attn is not None and attn < 1) or (ffn is not None and ffn < 1):
            raise ConfigError("each pool needs at least one node")
        with self._lock:
            if self.router is None:
                raise AfdError("the Ray cluster is not running (start() first)")
            started: list[RayNode] = []
            stopping: list[RayNode] = []
            wanted_by_role: tuple[tuple[NodeRole, int | None], ...] = (("ffn", ffn), ("attn", attn))
            for role, wanted in wanted_by_role:
                if wanted is None:
                    continue
                live = self._live(role)
                if wanted > len(live):
                    started += self._add(role, wanted - len(live))
                stopping += live[wanted:]
            # Attention nodes drain side by side. FFN nodes leave one at a time: each leave makes the router
            # move the node's experts, and two leaves racing through the router's rebalance can end with a
            # departed node still in the placement (the second rebalance sees it ready again).
            draining = [
                node.actor.stop.remote(self.options.leave_timeout_s) for node in stopping if node.role == "attn"
            ]
            try:
                if started:
                    self._await_started(started)
                    self.wait_until_ready({node.node_id for node in started})
            finally:
                for node in stopping:
                    if node.role == "ffn":
                        leave = node.actor.stop.remote(self.options.leave_timeout_s)
                        ray.wait([leave], timeout=self.options.leave_timeout_s + 10)
                if draining:
                    ray.wait(draining, num_returns=len(draining), timeout=self.options.leave_timeout_s + 10)
                for node in stopping:
                    self._discard(node)
                self._write_nodes_file()
            if stopping:
                self._wait_until_gone({node.node_id for node in stopping})

    def cluster(self) -> dict[str, Any]:
        return cluster_view(self.base_url, self._api_key)

    def wait_until_ready(self, node_ids: set[str]) -> None:
        """Until every node in `node_ids` is ready on the current placement and the API answers health checks."""
        wait_until_ready(self.base_url, node_ids, self.config.start_timeout_s, api_key=self._api_key)

    def _wait_until_gone(self, node_ids: set[str]) -> None:
        """Until the router no longer counts the removed nodes as serving (an FFN node's experts moved away)."""
        deadline = time.monotonic() + self.config.start_timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                nodes = {node["node_id"]: node for node in self.cluster()["nodes"]}
                if all(
                    node_id not in nodes
                    or (nodes[node_id]["state"] not in ("ready", "joining") and not nodes[node_id]["experts"])
                    for node_id in node_ids
                ):
                    return
            if time.monotonic() > deadline:
                raise AfdError(f"the router still counts {sorted(node_ids)} as serving")
            time.sleep(0.2)

    def _write_nodes_file(self) -> None:
        """workdir/nodes.json: where each node runs and where Ray keeps its log."""
        entries = [
            {
                "node_id": node.node_id,
                "role": node.role,
                "pool": node.pool,
                **(node.info or {}),
            }
            for node in ([self.router] if self.router else []) + list(self.nodes.values())
        ]
        note = "each node logs to Ray's worker-<worker id>-<job id>-<pid>.out in the session logs of its machine"
        (self.workdir / "nodes.json").write_text(json.dumps({"logs": note, "nodes": entries}, indent=2))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every actor this launcher started (nodes first, then the router), its placement groups, and
        the local Ray instance if it started one; idempotent and safe after a failed start."""
        import ray

        with self._lock:
            if ray.is_initialized():
                for group in (list(self.nodes.values()), [self.router] if self.router else []):
                    stops = [node.actor.stop.remote(timeout) for node in group]
                    if stops:
                        ray.wait(stops, num_returns=len(stops), timeout=timeout + 5)
                    for node in group:
                        with contextlib.suppress(Exception):
                            ray.kill(node.actor, no_restart=True)
                for pool in self.pools.values():
                    pool.remove()
            self.nodes.clear()
            self.router = None
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()
            self._owns_ray = False

    def remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
