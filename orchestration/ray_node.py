"""One AFD node (router, attention or FFN) hosted inside a Ray actor.

Ray owns the process; the node is ours. The actor runs an asyncio loop on a thread of its own and starts
on it the very server classes `afd node router|attn|ffn` runs (RouterServer, AttentionNodeServer,
FfnClusterNode), so a node behaves the same whether a process or an actor hosts it: it registers with the
router over gRPC, heartbeats, serves its data plane on its own port, and leaves gracefully.

Ray carries only a `NodeLaunch` to the actor (paths, ports, names, the cluster token) and a `NodeInfo`
back; activations never go through Ray. The actor's log lines go to stdout, which Ray writes to the
worker's log file on its machine (`worker-<worker id>-<job id>-<pid>.out` under the session's logs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from afd.errors import AfdError, ConfigError

log = logging.getLogger("afd.ray_node")

NodeRole = Literal["router", "attn", "ffn"]
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
"""Bind addresses that other machines cannot dial: the node then advertises its Ray node's IP."""


@dataclass(frozen=True)
class NodeLaunch:
    """What a node actor starts. Small values only: Ray pickles it as the actor's constructor argument."""

    node_id: str
    """Unique id in the cluster ("router" for the router)."""
    role: NodeRole
    """Which server the actor hosts."""
    host: str
    """Interface the node binds; a wildcard makes it advertise its Ray node's IP instead."""
    cluster_token: str = field(repr=False)
    """Shared cluster token, as a value: the launcher's token file may be on another machine."""
    model: str | None = None
    """Checkpoint directory on the actor's machine; the built-in demo model (made there) when None."""
    router: str | None = None
    """Router control-plane address host:port (attention and FFN nodes)."""
    http_port: int = 0
    """Router only: OpenAI API port (0 = any free port)."""
    served_model_name: str | None = None
    """Router only: model name in the API."""
    api_key: str | None = field(default=None, repr=False)
    """Router only: bearer key API clients must send; None = open API."""
    microbatches: int | None = None
    """Fixed microbatches per step (router plan and attention nodes); None = the router's plan."""
    transport: str = "grpc"
    """Attention only: data plane to the FFN nodes."""
    threads: int | None = None
    """torch intra-op threads of attention and FFN nodes; torch's default when None."""
    dtype: str = "auto"
    """Compute dtype of attention and FFN nodes."""
    device: str = "cpu"
    """Attention and FFN nodes: the torch device they compute on (cuda: the GPU Ray assigned, its cuda:0)."""

    def __post_init__(self) -> None:
        if self.role not in ("router", "attn", "ffn"):
            raise ConfigError(f"unknown node role {self.role!r}; expected router, attn or ffn")
        if self.role != "router" and not self.router:
            raise ConfigError(f"{self.role} node {self.node_id} needs the router's address")
        if self.role == "router" and self.device != "cpu":
            raise ConfigError(f"the router computes nothing on a device; got device {self.device!r}")


class NodeInfo(TypedDict):
    """Where a started node serves (what `NodeActor.ready` returns)."""

    node_id: str
    role: str
    address: str
    """host:port other nodes dial (gRPC); the router's control-plane address for the router."""
    http_port: int | None
    """The router's OpenAI API port; None for other roles."""
    node_ip: str
    """IP of the Ray node the actor runs on."""
    pid: int
    """The actor's process id on that machine."""
    actor_id: str
    """Ray's id of the actor (`ray logs actor --id ...`)."""
    resources: dict[str, float]
    """What Ray assigned the actor (its bundle's CPUs and pool resource)."""
    placement_group: str
    """Hex id of the placement group the actor runs in ("" when none)."""
    device: str
    """What the node computes on, e.g. "cuda:0" (of the GPUs Ray made visible to the actor) or "cpu"."""


def _log_to_stdout(node_id: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {node_id} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


class NodeActor:
    """Hosts one node server on an asyncio loop thread; decorated with `ray.remote` by the launcher.

    The constructor returns at once (Ray calls it in the actor process); `ready()` waits until the node
    serves, `stop()` makes it leave gracefully. Run the actor with max_concurrency >= 2 so `stop()` can
    interrupt a start that hangs.
    """

    def __init__(self, launch: NodeLaunch) -> None:
        self.launch = launch
        _log_to_stdout(launch.node_id)
        self._server: Any = None
        self._info: concurrent.futures.Future[NodeInfo] = concurrent.futures.Future()
        self._stopping = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"afd-{launch.node_id}", daemon=True)
        self._thread.start()
        self._main = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)

    # ---- Ray methods -----------------------------------------------------------------------------------
    def ready(self, timeout_s: float) -> NodeInfo:
        """The node's addresses once it serves (registered with the router, for attention and FFN nodes)."""
        try:
            return self._info.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise AfdError(f"{self.launch.node_id} did not start within {timeout_s:.0f} s") from None

    def serving(self) -> bool:
        """Whether the node still serves (False once it stopped, by itself or by `stop`)."""
        return self._info.done() and self._info.exception() is None and not self._main.done()

    def stop(self, timeout_s: float) -> None:
        """Leave gracefully (attention: drain; FFN: the router moves its experts first), then shut down."""
        if not self._stopping.acquire(blocking=False):
            return
        started = self._info.done() and self._info.exception() is None
        if started:
            leave = asyncio.run_coroutine_threadsafe(self._leave(), self._loop)
            try:
                leave.result(timeout_s)
            except Exception as exc:  # the shutdown below still runs; the launcher kills the actor anyway
                log.warning("%s did not leave cleanly: %s", self.launch.node_id, exc)
        else:
            self._main.cancel()
        try:
            self._main.result(timeout_s)
        except (concurrent.futures.CancelledError, Exception) as exc:  # how it ended matters no more
            log.info("%s stopped: %r", self.launch.node_id, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # ---- inside the loop thread ------------------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            self._server = self._build()
            await self._server.start()
            self._info.set_result(self._describe())
            await self._server.serve()
        except BaseException as exc:
            if not self._info.done():
                self._info.set_exception(exc)
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("%s failed", self.launch.node_id)
            raise
        finally:
            if self._server is not None:
                await self._server.shutdown()

    async def _leave(self) -> None:
        server = self._server
        if self.launch.role == "router":
            server.request_stop()
        elif self.launch.role == "attn":
            await server.drain_and_stop("removed by the Ray launcher")
        else:
            await server.shutdown()  # asks the router to move this node's experts before it stops serving

    def _model(self) -> Path:
        from afd.builtin_model import builtin_model_dir

        return Path(self.launch.model) if self.launch.model else builtin_model_dir()

    def _device(self) -> str:
        """The launch's device, refused here (on the actor's machine) when it is not present there."""
        from afd.devices import parse_device

        return str(parse_device(self.launch.device))

    def _advertise_host(self) -> str | None:
        if self.launch.host not in WILDCARD_HOSTS:
            return None
        import ray

        return ray.util.get_node_ip_address()

    def _build(self) -> Any:
        from afd.wire.auth import ClusterAuth

        launch = self.launch
        auth = ClusterAuth.from_config(token=launch.cluster_token)
        if launch.role == "router":
            from router.controller import ControllerConfig
            from router.server import RouterConfig, RouterServer

            return RouterServer(
                RouterConfig(
                    model=self._model(),
                    host=launch.host,
                    http_port=launch.http_port,
                    grpc_port=0,
                    served_model_name=launch.served_model_name,
                    api_key=launch.api_key,
                    auth=auth,
                    controller=ControllerConfig(microbatches=launch.microbatches),
                )
            )
        assert launch.router is not None
        if launch.role == "attn":
            from attn_nodes.config import EngineConfig
            from attn_nodes.server import AttentionNodeConfig, AttentionNodeServer

            return AttentionNodeServer(
                AttentionNodeConfig(
                    model=self._model(),
                    router=launch.router,
                    node_id=launch.node_id,
                    host=launch.host,
                    advertise_host=self._advertise_host(),
                    transport=launch.transport,  # type: ignore[arg-type]
                    microbatches=launch.microbatches,
                    engine=EngineConfig(dtype=launch.dtype, device=self._device()),  # type: ignore[arg-type]
                    auth=auth,
                    threads=launch.threads,
                )
            )
        import torch

        from ffn_nodes.node import ClusterAttachment, FfnClusterNode
        from ffn_nodes.server import FfnServerConfig

        if launch.threads:
            torch.set_num_threads(launch.threads)
        config = FfnServerConfig(
            model_dir=self._model(),
            node_id=launch.node_id,
            host=launch.host,
            dtype=launch.dtype,
            auth=auth,
            device=self._device(),
        )
        return FfnClusterNode(config, ClusterAttachment(router=launch.router, advertise_host=self._advertise_host()))

    def _describe(self) -> NodeInfo:
        import ray

        server, launch = self._server, self.launch
        node_ip = ray.util.get_node_ip_address()
        context = ray.get_runtime_context()
        host = node_ip if launch.host in WILDCARD_HOSTS else launch.host
        if launch.role == "router":
            address, http_port = f"{host}:{server.grpc_port}", server.http_port
        else:
            address, http_port = f"{host}:{server.port}", None
        return NodeInfo(
            node_id=launch.node_id,
            role=launch.role,
            address=address,
            http_port=http_port,
            node_ip=node_ip,
            pid=os.getpid(),
            actor_id=context.get_actor_id() or "",
            resources=dict(context.get_assigned_resources()),
            placement_group=context.get_placement_group_id() or "",
            device="cpu" if launch.role == "router" else self._device(),
        )
