"""The FFN node server: an FfnShard behind gRPC (data plane, control service, health) on one port.

- `afd.v1.FfnData/Exchange` (ffn_nodes/stream_server.py): one bidirectional stream per attention node.
- `afd.v1.FfnNode`: LoadExperts ((re)load the shard for a new placement), Status, and OpenChannel /
  CloseChannel, which join the pairwise channel backends of afd/transport/backends.py; frames arriving on
  those channels (ffn_nodes/channel_server.py) are answered like stream frames (ffn_nodes/answers.py).
- `grpc.health.v1.Health`: SERVING once a shard is loaded (exempt from the cluster token).

Requests from every door are batched together (ffn_nodes/batching.py). The node keeps the shard of the
current placement and the one before, so that frames addressed under the old table while a change
propagates are still computed with the right experts.

Lifecycle: `await start()` -> `await serve()` -> `await shutdown()` (idempotent, safe after a failed
start). Subclasses extend `after_start` / `before_shutdown` (router registration, heartbeats). The process
entry point is `afd node ffn` (ffn_nodes/node.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from afd.checkpoint import CheckpointReader
from afd.devices import parse_device
from afd.dtypes import COMPUTE_DTYPES, resolve_dtype
from afd.errors import AfdError, ConfigError, PeerError
from afd.ffn_messages import FfnRequest
from afd.host_memory import retain_freed_memory
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.transport.backends import ChannelAcceptor, ChannelRequest, channel_acceptors
from afd.wire import grpc_data
from afd.wire.auth import ClusterAuth
from afd.wire.frames import FrameLimits
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from afd.wire.placement_proto import placement_from_proto
from ffn_nodes.batching import Batcher
from ffn_nodes.channel_server import ChannelServer
from ffn_nodes.shard import FfnShard
from ffn_nodes.stream_server import ExchangeHandler

log = logging.getLogger(__name__)

SERVICES = ("afd.v1.FfnData", "afd.v1.FfnNode")
"""Services whose health follows the node's readiness (the overall "" service too)."""


class NodeFailure(AfdError, RuntimeError):
    """The node's core (batch loop, compute, channel threads) failed unexpectedly; `serve()` raises it.

    Such a node stops: a live-looking node that never answers a data frame would stall the cluster
    until every peer's timeout. Its cause (`__cause__`) is the original exception.
    """


# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FfnServerConfig:
    """Everything an FFN node process needs to serve."""

    model_dir: Path
    """Checkpoint directory (config.json + safetensors)."""
    node_id: str
    """This node's id in the expert placement."""
    placement: ExpertPlacement | None = None
    """Initial placement; None waits for LoadExperts (health NOT_SERVING until then)."""
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 0
    """Port to bind; 0 picks a free one (see `FfnNodeServer.port`)."""
    dtype: str = "auto"
    """Compute dtype: auto (the checkpoint's), float32, bfloat16 or float16."""
    device: str = "cpu"
    """Compute device as torch names it: cpu, cuda, cuda:N (ROCm too), or another torch device type (xpu, ...).
    The shard's weights are read straight onto it and requests are computed there; one that is not present
    is refused here, naming what was found."""
    auth: ClusterAuth = field(default_factory=ClusterAuth)
    """Cluster token / mTLS required of every caller."""
    max_tokens_per_frame: int = 65536
    """Largest request accepted, in tokens."""
    max_frame_bytes: int = 256 * 2**20
    """Largest request accepted, in bytes."""
    max_batch_tokens: int = 16384
    """Most tokens concatenated into one compute call (M2N batching)."""
    max_in_flight_per_stream: int = 64
    """Requests of one stream being computed or queued; the stream is not read further beyond it."""
    channel_poll_s: float = 1.0
    """How often channel receive loops wake to check for shutdown."""
    shutdown_grace_s: float = 2.0
    """How long shutdown lets in-flight calls finish."""
    channel_acceptors: Mapping[str, ChannelAcceptor] | None = None
    """Acceptors added to (or overriding) the built-in channel backends' by transport name (tests, embedding)."""

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ConfigError("FfnServerConfig.node_id must not be empty")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"FfnServerConfig.port must be in [0, 65535], got {self.port}")
        for name in ("max_tokens_per_frame", "max_frame_bytes", "max_batch_tokens", "max_in_flight_per_stream"):
            if getattr(self, name) < 1:
                raise ConfigError(f"FfnServerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.placement is not None:
            self.placement.index(self.node_id)  # raises ConfigError naming the node
        parse_device(self.device)  # raises ConfigError naming the devices found

    @property
    def compute_device(self) -> torch.device:
        """`device` parsed (a bare accelerator type means its index 0)."""
        return parse_device(self.device)


# ---------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------


class FfnNodeServer:
    """One FFN node: shard, batcher (with its batch thread), and the gRPC server (data, control, health)."""

    def __init__(self, config: FfnServerConfig, shard: FfnShard | None = None) -> None:
        """`shard` skips loading from config.model_dir (tests, embedding)."""
        self.config = config
        self.shard: FfnShard | None = None
        """The shard of the current placement."""
        self.previous_shard: FfnShard | None = None
        """The shard of the placement before, kept for requests still addressed under it."""
        self.limits: FrameLimits | None = None
        self.port: int | None = None
        self.batcher = Batcher(config.node_id, config.max_batch_tokens, self.held_shards, self.fail)
        self.failure: NodeFailure | None = None
        """Set when the node's core failed (see `fail`); the node is stopping or stopped."""
        self._failing: asyncio.Task[None] | None = None
        self.queued_reply_bytes = 0
        """Bytes of replies computed and not yet written to their gRPC streams (bounded by the in-flight slots)."""
        self._spec: ModelSpec | None = shard.spec if shard is not None else None
        self._server: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_lock: asyncio.Lock | None = None
        self._channels: dict[str, list[ChannelServer]] = {}
        self._stopped: asyncio.Event | None = None
        self._state = pb.NODE_STATE_JOINING
        self._shut_down = False
        if shard is not None:
            self._install(shard)

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not started")
        return f"{self.config.host}:{self.port}"

    @property
    def acceptors(self) -> Mapping[str, ChannelAcceptor]:
        """The FFN half of every channel backend this node accepts, by transport name."""
        return channel_acceptors(self.config.channel_acceptors)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the shard (if a placement is configured), bind the port and start serving."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._load_lock = asyncio.Lock()
        if self.shard is None and self.config.placement is not None:
            self._install(await asyncio.to_thread(self._load_shard, self.config.placement))
        self.batcher.start()
        options = [
            # the largest data frame this node accepts, not a blanket limit: an oversized message is
            # refused by grpc before it reaches a handler (anonymous calls are refused unread, see auth)
            *grpc_data.message_size_options(grpc_data.max_exchange_message_bytes(self.config.max_frame_bytes)),
            # attention nodes ping idle connections (GrpcTransportConfig.keepalive_s); allow it
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(interceptors=self.config.auth.server_interceptors(), options=options)
        self._server = server
        server.add_generic_rpc_handlers([grpc_data.exchange_handler(ExchangeHandler(self).exchange)])
        pb_grpc.add_FfnNodeServicer_to_server(_FfnNodeServicer(self), server)
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        bound = self.config.auth.add_port(server, f"{self.config.host}:{self.config.port}")
        if bound == 0:
            raise ConfigError(f"cannot bind {self.config.host}:{self.config.port}")
        self.port = bound
        await server.start()
        await self._set_health(self.shard is not None)
        await self.after_start()
        log.info("FFN node %s serving on %s", self.config.node_id, self.address)

    async def serve(self) -> None:
        """Wait until `shutdown` has stopped the node; raises NodeFailure if it stopped because its core failed."""
        if self._stopped is None:
            raise RuntimeError("serve() before start()")
        await self._stopped.wait()
        if self.failure is not None:
            raise self.failure

    async def shutdown(self) -> None:
        """Stop serving and release everything; idempotent and safe after a failed start.

        A second call while the first is under way waits for it (a failure stops the node by itself while
        its owner may call shutdown too).
        """
        if self._shut_down:
            if self._stopped is not None:
                await self._stopped.wait()
            return
        self._shut_down = True
        if self.failure is None:
            self._state = pb.NODE_STATE_LEFT
        try:
            with contextlib.suppress(Exception):
                await self.before_shutdown()
            if self._health is not None:
                with contextlib.suppress(Exception):
                    await self._health.enter_graceful_shutdown()
            for channels in self._channels.values():
                for channel in channels:
                    channel.stop()
            self._channels.clear()
            if self._server is not None:
                await self._server.stop(self.config.shutdown_grace_s)
            await self.batcher.stop()
        finally:
            if self._stopped is not None:
                self._stopped.set()

    # -- failure -------------------------------------------------------------------------------

    def fail(self, error: BaseException, where: str) -> None:
        """Stop the node because `where` (its batch loop, a channel thread...) failed with `error`.

        Callable from any thread. Logs the traceback at once, then on the event loop: fails every pending
        reply (peers get ERROR frames and recover through the router instead of waiting for their timeout),
        turns health NOT_SERVING and shuts down (FfnClusterNode reports itself to the router); `serve()`
        then raises NodeFailure, so the process exits non-zero. Later failures while stopping are only logged.
        """
        log.critical("FFN node %s: %s failed; the node stops", self.config.node_id, where, exc_info=error)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._fail_on_loop(error, where)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the node is gone anyway
                loop.call_soon_threadsafe(self._fail_on_loop, error, where)

    def _fail_on_loop(self, error: BaseException, where: str) -> None:
        if self.failure is not None or self._shut_down:
            return
        failure = NodeFailure(f"FFN node {self.config.node_id}: {where} failed: {type(error).__name__}: {error}")
        failure.__cause__ = error
        self.failure = failure
        self._state = pb.NODE_STATE_DEAD
        reason = PeerError(self.config.node_id, f"the node failed and stops ({where}: {type(error).__name__}: {error})")
        self.batcher.refuse_all(reason)
        self._failing = asyncio.ensure_future(self._stop_after_failure())

    async def _stop_after_failure(self) -> None:
        with contextlib.suppress(Exception):
            await self._set_health(False)  # first: health checkers see it before the router hears of it
        await self.shutdown()

    async def after_start(self) -> None:
        """Hook: runs once the port is bound and serving (e.g. register with the router)."""

    async def before_shutdown(self) -> None:
        """Hook: runs first in shutdown (e.g. leave the router); errors are ignored."""

    # -- shard ---------------------------------------------------------------------------------

    def _load_shard(self, placement: ExpertPlacement) -> FfnShard:
        spec = self._spec or ModelSpec.from_pretrained(self.config.model_dir)
        self._spec = spec
        dtype = resolve_dtype(self.config.dtype, spec.dtype)
        reader = CheckpointReader(self.config.model_dir, dtype=dtype, device=self.config.compute_device)
        return FfnShard.load(self.config.model_dir, placement, self.config.node_id, spec=spec, reader=reader)

    def _install(self, shard: FfnShard) -> None:
        """Make `shard` the current one (the next batch picks it up); the previous one stays for its version.

        While a placement change propagates, attention nodes still on the old table address local ids of
        the old version: keeping one previous shard computes those correctly instead of with the wrong
        experts. Frames are range-checked against the larger of the two; each group against its own.

        Nothing here touches what the batch thread writes: each shard counts its own expert tokens, and
        the load reports count from this shard's reading now; what the previous shard computed since the
        last report, and computes for frames still addressed under it, is reported under this shard's local
        id of the same global expert (Batcher.take_load).
        """
        retain_freed_memory(self.config.compute_device)  # once its first weights are loaded (see afd.host_memory)
        if self.shard is not None and self.shard.placement.version != shard.placement.version:
            if self.previous_shard is not None:
                self.batcher.retire(self.previous_shard)
            self.previous_shard = self.shard
        self.shard = shard
        held = [s.num_local_experts for s in self.held_shards().values()]
        self.limits = FrameLimits.for_model(
            shard.spec,
            max_local_experts=max(held),
            max_tokens=self.config.max_tokens_per_frame,
            max_frame_bytes=self.config.max_frame_bytes,
            # hidden states in any compute dtype (an attention node in another dtype than this pool's, or one that
            # narrows its wire with `--wire-dtype bf16`) are computed in the weights' dtype (FfnRequest.in_dtype),
            # and fp8 frames carry scales and are checked apart
            allowed_dtypes=frozenset(COMPUTE_DTYPES),
        )
        self.batcher.count_experts_from(shard)
        if self.failure is None:
            self._state = pb.NODE_STATE_READY

    def held_shards(self) -> dict[int, FfnShard]:
        """Placement version -> shard, for the current shard and the previous one (if any)."""
        held = {}
        for shard in (self.previous_shard, self.shard):
            if shard is not None:
                held[shard.placement.version] = shard
        return held

    async def load_experts(self, placement: ExpertPlacement) -> FfnShard:
        """(Re)load this node's share of `placement`; the old shard serves until the new one is ready."""
        assert self._load_lock is not None
        placement.index(self.config.node_id)
        async with self._load_lock:
            shard = await asyncio.to_thread(self._load_shard, placement)
            self._install(shard)
        if self.failure is None:  # a failed node stays NOT_SERVING
            await self._set_health(True)
        return shard

    async def _set_health(self, serving: bool) -> None:
        if self._health is None:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", *SERVICES):
            await self._health.set(service, status)

    # -- requests (every door) -----------------------------------------------------------------

    def submit(self, request: FfnRequest) -> asyncio.Future[torch.Tensor]:
        """Queue `request` for the next batch (event loop thread only); fails at once on a failed node."""
        return self.batcher.submit(request)

    def compute_here(self, request: FfnRequest) -> concurrent.futures.Future[torch.Tensor]:
        """A channel door's request, from any thread: computed on the calling thread when the node is idle, else
        queued for the next batch (Batcher.compute_here); fails at once on a failed node."""
        return self.batcher.compute_here(request)

    def take_load(self, reset: bool = False) -> pb.NodeLoad:
        """The load since the counters were last reset (see Batcher.take_load), for the current shard."""
        return self.batcher.take_load(self.shard, reset)

    # -- data plane: pairwise channels ---------------------------------------------------------

    async def open_channel(self, request: ChannelRequest, transport: str) -> bytes:
        acceptors = self.acceptors
        acceptor = acceptors.get(transport)
        if acceptor is None:
            raise ConfigError(f"transport {transport!r} has no channel backend here (have: {sorted(acceptors)})")
        offer = await asyncio.to_thread(acceptor, request)
        server = ChannelServer(self, request.attention_node_id, offer)
        self._channels.setdefault(request.attention_node_id, []).append(server)
        server.start()
        return offer.reply

    def close_channels(self, attention_node_id: str) -> int:
        channels = self._channels.pop(attention_node_id, [])
        for channel in channels:
            channel.stop()
        return len(channels)


class _FfnNodeServicer(pb_grpc.FfnNodeServicer):
    """The control service of an FFN node (afd.v1.FfnNode)."""

    def __init__(self, node: FfnNodeServer) -> None:
        self.node = node

    async def LoadExperts(
        self, request: pb.LoadExpertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadExpertsResponse:
        try:
            placement, _ = placement_from_proto(request.placement)
            shard = await self.node.load_experts(placement)
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        experts = shard.placement.experts[shard.placement.index(self.node.config.node_id)]
        return pb.LoadExpertsResponse(version=placement.version, experts=list(experts))

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.NodeStatus:
        node = self.node
        shard = node.shard
        experts: list[int] = []
        version = 0
        if shard is not None:
            experts = list(shard.placement.experts[shard.placement.index(node.config.node_id)])
            version = shard.placement.version
        return pb.NodeStatus(
            node_id=node.config.node_id,
            role=pb.ROLE_FFN,
            state=node._state,
            load=node.take_load(reset=False),
            placement_version=version,
            experts=experts,
        )

    async def OpenChannel(
        self, request: pb.OpenChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.OpenChannelResponse:
        wanted = ChannelRequest(
            request.attention_node_id,
            request.rendezvous,
            self.node.config.node_id,
            device=str(self.node.config.compute_device),  # an NCCL channel's buffers live beside the experts
        )
        try:
            reply = await self.node.open_channel(wanted, request.transport)
        except ConfigError as exc:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(exc))
        except AfdError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.OpenChannelResponse(rendezvous=reply)

    async def CloseChannel(
        self, request: pb.CloseChannelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CloseChannelResponse:
        self.node.close_channels(request.attention_node_id)
        return pb.CloseChannelResponse()
