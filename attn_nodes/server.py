"""The attention node process: the AttentionNode gRPC service in front of the engine thread
(attn_nodes/engine_thread.py), and the router protocol (register, heartbeat, placement updates, drain and
leave).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from afd.devices import parse_device
from afd.errors import ConfigError, PeerError, RequestError
from afd.model_spec import ModelSpec, model_fingerprint
from afd.node_lifecycle import StopOnce, run_until_signal
from afd.router_attachment import RouterAttachment
from afd.sampling_params import SamplingParams
from afd.transport.base import FfnTransport
from afd.transport.deadlines import DeadlineConfig, ExchangeWatch
from afd.transport.factory import make_transport
from afd.transport.replies import ReplyFutureTransport
from afd.wire.auth import ClusterAuth
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from afd.wire.placement_proto import placement_from_proto
from afd.wire.sampling_proto import logprobs_to_proto, sampling_from_proto
from attn_nodes.calibration import CALIBRATION_CONTEXT, attention_us_per_token, device_description
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from attn_nodes.engine_thread import EngineThread, OutputStream, RecoveryPlacement
from attn_nodes.request import RequestOutput

log = logging.getLogger("afd.attention")

TransportName = Literal["grpc", "gloo", "shm", "nccl"]


@dataclass(frozen=True)
class AttentionNodeConfig:
    """How an attention node is started (`afd node attn`)."""

    model: Path
    """HF checkpoint directory."""
    router: str
    """Router control-plane address host:port."""
    node_id: str
    """Unique id in the cluster."""
    host: str = "127.0.0.1"
    """Interface the gRPC server binds."""
    port: int = 0
    """gRPC port (0 = any free port)."""
    advertise_host: str | None = None
    """Host other nodes reach this one at; `host` when None."""
    transport: TransportName = "grpc"
    """Data plane to the FFN nodes."""
    microbatches: int | None = None
    """Fixed microbatches per step; None follows the router's plan."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Batching, KV cache and dtype."""
    auth: ClusterAuth = field(default_factory=ClusterAuth)
    """Cluster token / TLS."""
    ffn_timeout_s: float = 30.0
    """A partial sum not back within this is a failed FFN node."""
    recovery_timeout_s: float = 120.0
    """Longest wait for a placement without a failed FFN node before the step's requests fail."""
    deadlines: DeadlineConfig = field(default_factory=DeadlineConfig)
    """Per-exchange straggler deadlines from the measured exchange times (afd/transport/deadlines.py)."""
    drain_timeout_s: float = 30.0
    """On drain, requests still running after this are handed back to the router to migrate."""
    register_timeout_s: float = 120.0
    """How long to retry reaching the router at start-up."""
    threads: int | None = None
    """torch intra-op threads; torch's default when None."""
    ready_file: Path | None = None
    """Written with the bound port once registered."""

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ConfigError("an attention node needs a node id")
        if self.microbatches is not None and self.microbatches < 1:
            raise ConfigError(f"microbatches must be >= 1, got {self.microbatches}")


class AttentionNodeServer(StopOnce):
    def __init__(self, config: AttentionNodeConfig) -> None:
        super().__init__()
        self.config = config
        self.engine: AttentionEngine | None = None
        self.transport: FfnTransport | None = None
        self.engine_thread: EngineThread | None = None
        self.port: int | None = None
        self.draining = False
        self._grpc: grpc.aio.Server | None = None
        self.attachment: RouterAttachment | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._capacity = pb.CapacityProfile()
        self._health: health.aio.HealthServicer | None = None
        self._tasks: set[asyncio.Future] = set()

    @property
    def address(self) -> str:
        return f"{self.config.advertise_host or self.config.host}:{self.port}"

    def _background(self, coroutine: Any) -> None:
        """Run a coroutine without awaiting it, keeping a reference until it ends."""
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.loop = asyncio.get_running_loop()
        spec = ModelSpec.from_pretrained(config.model)
        self.transport = make_transport(
            config.transport,
            spec,
            sender=config.node_id,
            auth=config.auth,
            timeout_s=config.ffn_timeout_s,
            listen_host=config.advertise_host or config.host,
            device=parse_device(config.engine.device),  # partial sums come back where the attention half computes
        )
        if isinstance(self.transport, ReplyFutureTransport):
            self.transport.watch = ExchangeWatch(config.deadlines, self._report_degraded)
        self.engine = await asyncio.to_thread(AttentionEngine.load, config.model, self.transport, None, config.engine)
        if config.microbatches is not None:
            self.engine.microbatches = config.microbatches
        self._capacity = await asyncio.to_thread(self._measure_capacity)
        self._grpc = grpc.aio.server(interceptors=config.auth.server_interceptors())
        pb_grpc.add_AttentionNodeServicer_to_server(_AttentionServicer(self), self._grpc)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self.port = config.auth.add_port(self._grpc, f"{config.host}:{config.port}")
        await self._grpc.start()
        self.engine_thread = EngineThread(
            self.engine, self.transport, config.node_id, config.recovery_timeout_s, self._report_failure
        )
        self.engine_thread.start()
        self.attachment = RouterAttachment(config.router, config.auth, config.node_id)
        await self._registered(await self.attachment.register(self._registration(), config.register_timeout_s))
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._heartbeat_task = asyncio.ensure_future(
            self.attachment.heartbeats(self._beat, self._on_heartbeat, self._registration, self._registered)
        )
        log.info("attention node %s serving on %s", config.node_id, self.address)

    def _measure_capacity(self) -> pb.CapacityProfile:
        assert self.engine is not None
        kind, memory, count = device_description(self.engine.model.device)
        engine_config = self.engine.config
        return pb.CapacityProfile(
            device_kind=kind,
            device_memory_bytes=memory,
            device_count=count,
            attention_us_per_token=attention_us_per_token(self.engine.model),
            attention_context_len=CALIBRATION_CONTEXT,
            kv_cache_blocks=self.engine.kv.num_blocks,
            kv_block_size=engine_config.block_size,
            max_num_seqs=engine_config.max_num_seqs,
        )

    async def _close(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(BaseException):
                await self._heartbeat_task
        if self.engine_thread is not None:
            await asyncio.to_thread(self.engine_thread.stop, 10)
            for stream in list(self.engine_thread.streams.values()):
                stream.put(PeerError(self.config.node_id, "attention node shut down"))
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self.attachment is not None:
            await self.attachment.close()
        if self.transport is not None:
            self.transport.close()

    # ---- router protocol -------------------------------------------------------------------------------
    def _registration(self) -> pb.RegisterRequest:
        return pb.RegisterRequest(
            node_id=self.config.node_id,
            role=pb.ROLE_ATTENTION,
            address=self.address,
            capacity=self._capacity,
            transports=[self.config.transport],
            model_fingerprint=model_fingerprint(self.config.model),
        )

    async def _registered(self, response: pb.RegisterResponse) -> None:
        if response.placement.version >= 0 and response.placement.nodes:
            self.offer_placement(response.placement)

    def _beat(self) -> pb.HeartbeatRequest:
        assert self.engine is not None
        engine = self.engine
        load = pb.NodeLoad(
            num_running=len(engine.scheduler.running),
            num_waiting=len(engine.scheduler.waiting),
            kv_cache_usage=engine.kv.usage,
            generated_tokens=self.generated,
        )
        for layer, trips, seconds, sent, received, wait in engine.runner.transfers.take():
            load.transfers.add(
                layer=layer,
                round_trips=trips,
                seconds=seconds,
                bytes_sent=sent,
                bytes_received=received,
                wait_seconds=wait,
            )
        placement = engine.placement
        return pb.HeartbeatRequest(
            node_id=self.config.node_id,
            state=pb.NODE_STATE_DRAINING if self.draining else pb.NODE_STATE_READY,
            load=load,
            placement_version=placement.version if placement else -1,
            capacity=self._measured_capacity(placement.nodes if placement else ()),
        )

    def _measured_capacity(self, peers: tuple[str, ...]) -> pb.CapacityProfile:
        """The start-up profile with the links as the data plane measures them now (peers of the placement).

        link_bytes_per_second / link_latency_us are the slowest peer's (the one an exchange waits for).
        """
        capacity = pb.CapacityProfile()
        capacity.CopyFrom(self._capacity)
        watch = self.transport.watch if isinstance(self.transport, ReplyFutureTransport) else None
        links = watch.links() if watch is not None else {}
        slowest = None
        for peer in peers:
            link = links.get(peer)
            if link is None:
                continue
            capacity.peer_links.add(
                peer_id=peer,
                bytes_per_second=link.bytes_per_second,
                latency_us=link.latency_s * 1e6,
                exchanges=link.exchanges,
                mean_exchange_us=link.mean_seconds * 1e6,
            )
            if slowest is None or link.mean_seconds > slowest.mean_seconds:
                slowest = link
        if slowest is not None:
            capacity.link_bytes_per_second = slowest.bytes_per_second
            capacity.link_latency_us = slowest.latency_s * 1e6
        return capacity

    async def _on_heartbeat(self, response: pb.HeartbeatResponse) -> None:
        if response.HasField("placement") and response.placement.nodes:
            # Never wait for the step boundary here: a step stuck on a frozen FFN node would stop the
            # heartbeats, and the router would declare this node dead too.
            try:
                self.offer_placement(response.placement)
            except ConfigError as exc:
                log.error("the router sent an unusable placement: %s", exc)
        if self.config.microbatches is None and response.microbatches and self.engine_thread is not None:
            self.engine_thread.set_microbatches(response.microbatches)
        if response.drain and not self.draining:
            self._background(self.drain_and_stop("the router asked this node to drain"))

    async def apply_placement(self, message: pb.Placement) -> int:
        """Hand a placement to the engine thread and wait until a step boundary applied it."""
        return await asyncio.wrap_future(self.offer_placement(message))

    def offer_placement(self, message: pb.Placement) -> concurrent.futures.Future[int]:
        """Hand a placement to the engine thread without waiting; the future is its version once applied.

        The engine applies placements between steps, and a step may be blocked on an FFN node that froze:
        so the nodes the router lists as dead are failed on the transport first, which ends such a step at
        once (it re-runs on the new placement) instead of after the reply timeout.
        """
        placement, addresses = placement_from_proto(message)
        assert self.engine_thread is not None and self.transport is not None
        current = self.engine_thread.engine.placement
        if current is None or placement.version > current.version:
            for node in message.dead_nodes:
                reason = f"declared dead by the router (placement v{placement.version} drops it)"
                if self.transport.fail_peer(node, reason):
                    log.warning("stopped waiting on FFN node %s: %s", node, reason)
            for node in message.degraded_nodes:
                if node in placement.nodes:
                    continue  # still serving its share in this version: keep waiting for it
                reason = f"withdrawn as a straggler (placement v{placement.version} moves its experts)"
                if self.transport.withdraw_peer(node, reason):
                    log.warning("stopped waiting on FFN node %s: %s", node, reason)
        return self.engine_thread.offer_placement(placement, addresses)

    async def drain_and_stop(self, reason: str, deadline_s: float | None = None) -> None:
        """Take no new requests, let running ones finish (or hand them back after the deadline), leave.

        deadline_s: how long running requests may take to finish; the configured drain_timeout_s when None.
        """
        if self.draining:
            return
        self.draining = True
        log.info("attention node %s draining: %s", self.config.node_id, reason)
        if self.attachment is not None:
            await self.attachment.leave(reason, timeout_s=10)
        deadline = time.monotonic() + (self.config.drain_timeout_s if deadline_s is None else deadline_s)
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id, stream in list(self.streams.items()):
            stream.put(PeerError(self.config.node_id, "attention node drained; the router migrates the request"))
            self.abort(request_id)
        self.request_stop()

    # ---- requests (event loop side; the engine thread applies them between steps) ----------------------
    @property
    def streams(self) -> dict[str, OutputStream]:
        """Requests being served -> where their outputs go."""
        return self.engine_thread.streams if self.engine_thread is not None else {}

    @property
    def generated(self) -> int:
        return self.engine_thread.generated if self.engine_thread is not None else 0

    def submit(
        self, request_id: str, prompt: list[int], params: SamplingParams, resume: list[int], stream: OutputStream
    ) -> None:
        assert self.engine_thread is not None, "submit() before start()"
        self.engine_thread.submit(request_id, prompt, params, resume, stream)

    def abort(self, request_id: str) -> None:
        if self.engine_thread is not None:
            self.engine_thread.abort(request_id)

    def _report_degraded(self, node: str, reason: str) -> None:
        """Transport (engine thread) -> router: `node` is a straggler; never waits (the step keeps waiting
        for its partial sums until the router's placement without it arrives)."""
        log.warning("FFN node %s is a straggler: %s; reporting it to the router", node, reason)
        asyncio.run_coroutine_threadsafe(self._report_straggler(node, reason), self.loop)

    async def _report_straggler(self, node: str, reason: str) -> None:
        assert self.attachment is not None
        message = await self.attachment.report_failure(node, reason, self.config.recovery_timeout_s, degraded=True)
        if message is not None and message.nodes:
            try:
                self.offer_placement(message)
            except ConfigError as exc:
                log.error("the router's placement after the straggler report is unusable: %s", exc)

    def _report_failure(self, error: PeerError) -> concurrent.futures.Future[RecoveryPlacement]:
        """Engine thread -> router: report the failed peer; resolves to the router's placement without it."""
        return asyncio.run_coroutine_threadsafe(self._report(error), self.loop)

    async def _report(self, error: PeerError) -> RecoveryPlacement:
        assert self.attachment is not None
        message = await self.attachment.report_failure(error.peer, str(error), self.config.recovery_timeout_s)
        if message is None or not message.nodes:
            return None
        try:
            return placement_from_proto(message)
        except ConfigError as exc:
            log.error("the router's placement after the failure is unusable: %s", exc)
            return None


class _AttentionServicer(pb_grpc.AttentionNodeServicer):
    def __init__(self, node: AttentionNodeServer) -> None:
        self.node = node

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenChunk]:
        node = self.node
        if node.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"attention node {node.config.node_id} is draining")
        try:
            params = sampling_from_proto(request.params)
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        stream = OutputStream(asyncio.get_running_loop(), asyncio.Queue())
        request_id = request.request_id
        node.submit(request_id, list(request.prompt_token_ids), params, list(request.resume_output_token_ids), stream)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, RequestError):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(item))
                if isinstance(item, BaseException):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(item))
                assert isinstance(item, RequestOutput)
                finished = item.finished
                yield pb.TokenChunk(
                    request_id=request_id,
                    token_ids=item.new_token_ids,
                    finished=item.finished,
                    finish_reason=item.finish_reason or "",
                    num_prompt_tokens=item.num_prompt_tokens,
                    num_output_tokens=item.num_output_tokens,
                    logprobs=logprobs_to_proto(item.logprobs or ()),
                    prompt_logprobs=logprobs_to_proto(item.prompt_logprobs or ()),
                )
                if finished:
                    return
        finally:
            if not finished:
                node.abort(request_id)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        self.node.abort(request.request_id)
        return pb.AbortResponse()

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.DrainResponse:
        deadline = request.deadline_seconds if request.deadline_seconds > 0 else None
        self.node._background(self.node.drain_and_stop("drain requested", deadline))
        return pb.DrainResponse(num_unfinished=len(self.node.streams))

    async def UpdatePlacement(
        self, request: pb.Placement, context: grpc.aio.ServicerContext
    ) -> pb.UpdatePlacementResponse:
        version = await self.node.apply_placement(request)
        return pb.UpdatePlacementResponse(version=version)

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.NodeStatus:
        node = self.node
        engine = node.engine
        assert engine is not None
        placement = engine.placement
        return pb.NodeStatus(
            node_id=node.config.node_id,
            role=pb.ROLE_ATTENTION,
            state=pb.NODE_STATE_DRAINING if node.draining else pb.NODE_STATE_READY,
            capacity=node._capacity,
            load=pb.NodeLoad(
                num_running=len(engine.scheduler.running),
                num_waiting=len(engine.scheduler.waiting),
                kv_cache_usage=engine.kv.usage,
                generated_tokens=node.generated,
            ),
            placement_version=placement.version if placement else -1,
        )


async def run_attention_node(config: AttentionNodeConfig) -> None:
    """The `afd node attn` process: serve until a signal; the first drains, a second stops at once."""
    server = AttentionNodeServer(config)
    await run_until_signal(
        server, lambda: {"port": server.port or 0}, config.ready_file, lambda: server.drain_and_stop("terminated")
    )
