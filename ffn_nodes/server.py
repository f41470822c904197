"""The FFN node process: an FfnShard behind gRPC (data plane, control service, health) on one port.

- `afd.v1.FfnData/Exchange`: one bidirectional stream per attention node; request frames in, partial
  sums (or ERROR frames) out, matched by sequence number.
- `afd.v1.FfnNode`: LoadExperts ((re)load the shard for a new placement), Status, and
  OpenChannel/CloseChannel, which hand pairwise channels (gloo, shm, NCCL) to acceptors registered by
  transport name (`CHANNEL_ACCEPTORS`); frames arriving on those channels are served like stream frames.
- `grpc.health.v1.Health`: SERVING once a shard is loaded (exempt from the cluster token).

M2N batching: frames from every attention node (and every channel) go into one queue; a batching task
takes whatever has arrived, concatenates requests of the same layer into one `FfnShard.compute` on the
compute thread, and splits the result back. While the thread computes, the event loop keeps receiving,
so the next batch is as large as the load makes it - no timer, no added latency when idle.

A bad frame never ends a stream: it is answered with an ERROR frame (carrying the request's seq when
it can be read) and the node carries on serving everyone else.

Lifecycle: `await start()` -> `await serve()` -> `await shutdown()` (idempotent, safe after a failed
start). Subclasses extend `after_start` / `before_shutdown` (router registration, heartbeats).
Runnable as `python -m ffn_nodes.server --model DIR --node-id ID --placement-file P --port 0 --ready-file F`.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from afd.checkpoint import CheckpointReader
from afd.dtypes import resolve_dtype
from afd.errors import AfdError, ConfigError, PeerError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.transport.channel import Channel
from afd.wire import grpc_data
from afd.wire.auth import ClusterAuth
from afd.wire.frames import (
    UNKNOWN,
    FrameError,
    FrameLimits,
    OutOfRange,
    decode_header,
    dtype_name,
    encode_error,
    encode_response,
    pack_parts,
    packed_frame_seq,
    request_from_frame,
    unpack,
)
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from afd.wire.placement_proto import placement_from_proto
from ffn_nodes.shard import FfnShard

log = logging.getLogger(__name__)

SERVICES = ("afd.v1.FfnData", "afd.v1.FfnNode")
"""Services whose health follows the node's readiness (the overall "" service too)."""


# ---------------------------------------------------------------------------------------------------
# Channel acceptors: how OpenChannel hands pairwise transports to their owners
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    """What an attention node asked for in OpenChannel."""

    attention_node_id: str
    rendezvous: bytes
    """Backend-specific: TCPStore address, NCCL unique id, shm name..."""
    ffn_node_id: str


@dataclass(frozen=True, slots=True)
class ChannelOffer:
    """An acceptor's answer: the reply rendezvous, and how to complete the link."""

    reply: bytes
    """Returned to the attention node in OpenChannelResponse.rendezvous."""
    connect: Callable[[], Channel]
    """Completes the link; may block until the attention side joins. Runs on a thread of its own."""


class StalePlacementError(AfdError, ValueError):
    """A request refers to a placement version this node does not hold (any more, or yet)."""


class NodeFailure(AfdError, RuntimeError):
    """The node's core (batch loop, compute, channel threads) failed unexpectedly; `serve()` raises it.

    Such a node stops: a live-looking node that never answers a data frame would stall the cluster
    until every peer's timeout. Its cause (`__cause__`) is the original exception.
    """


ChannelAcceptor = Callable[[ChannelRequest], ChannelOffer]
"""Called (on a worker thread) for OpenChannel with the acceptor's transport name; raise AfdError to refuse."""

CHANNEL_ACCEPTORS: dict[str, ChannelAcceptor] = {}
"""Default registry by transport name ("gloo", "shm", "nccl"); backends add themselves on import."""


def register_channel_acceptor(transport: str, acceptor: ChannelAcceptor) -> None:
    CHANNEL_ACCEPTORS[transport] = acceptor


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
    """Transport name -> acceptor for OpenChannel; None uses the module registry CHANNEL_ACCEPTORS."""

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


# ---------------------------------------------------------------------------------------------------
# Batching and compute
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Work:
    request: FfnRequest
    reply: asyncio.Future[torch.Tensor]


@dataclass(slots=True)
class LoadCounters:
    """What the node did since the counters were last taken (for heartbeats and Status).

    Written by the compute thread and swapped by `take_load(reset=True)`, both under
    `FfnNodeServer._counters_lock`, so an add lands either in the period taken or in the next one.
    Per-expert counts are not here: each shard counts its own (FfnShard.expert_token_counts).
    """

    started: float = field(default_factory=time.monotonic)
    """When this period began (monotonic clock)."""
    busy_s: float = 0.0
    """Seconds the compute thread spent computing."""
    requests: int = 0
    """Requests computed."""
    batches: int = 0
    """Compute calls (M2N batches)."""
    tokens: int = 0
    """Token rows computed."""


@dataclass(slots=True)
class _ExpertBaseline:
    """The reading of one shard's per-expert counts at the start of the current load period."""

    version: int
    """Placement version of the shard the reading is of."""
    counts: list[int]
    """FfnShard.expert_token_counts() then."""


def _batch_key(request: FfnRequest) -> tuple[Any, ...]:
    return (request.placement_version, request.layer, request.expert_ids is None, request.hidden.dtype)


def compute_batch(shards: Mapping[int, FfnShard], requests: list[FfnRequest]) -> list[torch.Tensor | Exception]:
    """Partial sums for `requests`, computing those of the same layer as one concatenated batch.

    shards: placement version -> shard; each request is computed by the shard of its placement_version.
    A request that fails (unknown version, ids out of its shard's range) gets its exception; the rest
    of the batch is computed regardless.
    """
    results: list[torch.Tensor | Exception] = [RuntimeError("not computed")] * len(requests)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, request in enumerate(requests):
        try:
            _check_local_ids(_shard_for(shards, request.placement_version), request)
        except AfdError as exc:
            results[index] = exc
            continue
        groups.setdefault(_batch_key(request), []).append(index)
    for indices in groups.values():
        members = [requests[i] for i in indices]
        try:
            partials = _compute_group(shards[members[0].placement_version], members)
        except Exception as exc:  # one bad group must not take the others down
            log.exception("compute failed for layer %d", members[0].layer)
            partials = [exc] * len(members)
        for index, partial in zip(indices, partials, strict=True):
            results[index] = partial
    return results


def _shard_for(shards: Mapping[int, FfnShard], version: int) -> FfnShard:
    shard = shards.get(version)
    if shard is None:
        raise StalePlacementError(f"placement version {version} is not loaded here (holding {sorted(shards)})")
    return shard


def _check_local_ids(shard: FfnShard, request: FfnRequest) -> None:
    """The frame decoder checked ids against the largest shard held; this is the one they address."""
    local = len(shard.placement.experts[shard.placement.index(shard.node_id)])
    ids = request.expert_ids
    if ids is not None and ids.numel() and int(ids.max()) >= local:
        raise OutOfRange(
            f"local expert id {int(ids.max())} >= {local} experts of placement version {shard.placement.version}"
        )


def _compute_group(shard: FfnShard, members: list[FfnRequest]) -> list[torch.Tensor | Exception]:
    if len(members) == 1:
        return [shard.compute(members[0])]
    first = members[0]
    with_ids = first.expert_ids is not None
    with_scale = any(m.shared_scale is not None for m in members)
    merged = FfnRequest(
        layer=first.layer,
        hidden=torch.cat([m.hidden for m in members]),
        expert_ids=torch.cat([m.expert_ids for m in members if m.expert_ids is not None]) if with_ids else None,
        expert_weights=(
            torch.cat([m.expert_weights for m in members if m.expert_weights is not None]) if with_ids else None
        ),
        # a request without a shared-expert scale means scale 1 (what FfnShard.compute does with None)
        shared_scale=(
            torch.cat([m.shared_scale if m.shared_scale is not None else torch.ones(m.num_tokens) for m in members])
            if with_scale
            else None
        ),
        microbatch=first.microbatch,
        placement_version=first.placement_version,
    )
    partial = shard.compute(merged)
    return list(torch.split(partial, [m.num_tokens for m in members]))


# ---------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------


class FfnNodeServer:
    """One FFN node: shard, batcher, compute thread, and the gRPC server (data, control, health)."""

    def __init__(self, config: FfnServerConfig, shard: FfnShard | None = None) -> None:
        """`shard` skips loading from config.model_dir (tests, embedding)."""
        self.config = config
        self.shard: FfnShard | None = None
        """The shard of the current placement."""
        self.previous_shard: FfnShard | None = None
        """The shard of the placement before, kept for requests still addressed under it."""
        self.limits: FrameLimits | None = None
        self.port: int | None = None
        self.counters = LoadCounters()
        self.token_rows_total = 0
        """Token rows computed since start (monotonic; the router derives the FFN tokens/s from it)."""
        self._counters_lock = threading.Lock()
        """Guards `counters`, `token_rows_total` and `_expert_baseline` (compute thread vs event loop)."""
        self._expert_baseline: _ExpertBaseline | None = None
        self.failure: NodeFailure | None = None
        """Set when the node's core failed (see `fail`); the node is stopping or stopped."""
        self._pending: set[asyncio.Future[torch.Tensor]] = set()
        """Replies submitted and not yet settled: failed at once if the node fails."""
        self._failing: asyncio.Task[None] | None = None
        self.queued_reply_bytes = 0
        """Bytes of replies computed and not yet written to their gRPC streams (bounded by the in-flight slots)."""
        self._spec: ModelSpec | None = shard.spec if shard is not None else None
        self._server: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self._queue: asyncio.Queue[_Work] | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._compute: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._load_lock: asyncio.Lock | None = None
        self._channels: dict[str, list[_ChannelServer]] = {}
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
        return self.config.channel_acceptors if self.config.channel_acceptors is not None else CHANNEL_ACCEPTORS

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the shard (if a placement is configured), bind the port and start serving."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._load_lock = asyncio.Lock()
        self._queue = asyncio.Queue()
        self._compute = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"ffn-compute-{self.config.node_id}"
        )
        if self.shard is None and self.config.placement is not None:
            self._install(await asyncio.to_thread(self._load_shard, self.config.placement))
        self._batcher = asyncio.ensure_future(self._batch_loop())
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
        server.add_generic_rpc_handlers([grpc_data.exchange_handler(self._exchange)])
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
            if self._batcher is not None:
                self._batcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._batcher
            if self._compute is not None:
                self._compute.shutdown(wait=False, cancel_futures=True)
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
        for reply in list(self._pending):
            if not reply.done():
                reply.set_exception(reason)
        self._pending.clear()
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
        reader = CheckpointReader(self.config.model_dir, dtype=resolve_dtype(self.config.dtype, spec.dtype))
        return FfnShard.load(self.config.model_dir, placement, self.config.node_id, spec=spec, reader=reader)

    def _install(self, shard: FfnShard) -> None:
        """Make `shard` the current one (the next batch picks it up); the previous one stays for its version.

        While a placement change propagates, attention nodes still on the old table address local ids of
        the old version: keeping one previous shard computes those correctly instead of with the wrong
        experts. Frames are range-checked against the larger of the two; each group against its own.

        Nothing here touches what the compute thread writes: each shard counts its own expert tokens, and
        the load reports count from this shard's reading now (what the previous shard computed since the
        last report is for the old expert layout, which the router no longer maps: it is not reported).
        """
        if self.shard is not None and self.shard.placement.version != shard.placement.version:
            self.previous_shard = self.shard
        self.shard = shard
        held = [s.num_local_experts for s in self.held_shards().values()]
        self.limits = FrameLimits.for_model(
            shard.spec,
            max_local_experts=max(held),
            max_tokens=self.config.max_tokens_per_frame,
            max_frame_bytes=self.config.max_frame_bytes,
            # hidden states in another dtype than the weights are a misconfigured peer: say so up front
            allowed_dtypes=frozenset({dtype_name(shard.dtype)}),
        )
        with self._counters_lock:
            self._expert_baseline = _ExpertBaseline(shard.placement.version, shard.expert_token_counts())
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

    # -- batching ------------------------------------------------------------------------------

    def submit(self, request: FfnRequest) -> asyncio.Future[torch.Tensor]:
        """Queue `request` for the next batch (event loop thread only); fails at once on a failed node."""
        assert self._loop is not None and self._queue is not None
        reply: asyncio.Future[torch.Tensor] = self._loop.create_future()
        if self.failure is not None:
            reply.set_exception(PeerError(self.config.node_id, "the node failed and stops"))
            return reply
        self._pending.add(reply)
        reply.add_done_callback(self._pending.discard)
        self._queue.put_nowait(_Work(request, reply))
        return reply

    async def _batch_loop(self) -> None:
        """The node's core: an unexpected exception here is fatal (`fail`), never a silently dead task."""
        try:
            await self._batch_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fail(exc, "the batch loop")

    async def _batch_forever(self) -> None:
        assert self._queue is not None and self._loop is not None
        while True:
            first = await self._queue.get()
            batch = [first]
            tokens = first.request.num_tokens
            while not self._queue.empty() and tokens < self.config.max_batch_tokens:
                work = self._queue.get_nowait()
                batch.append(work)
                tokens += work.request.num_tokens
            shards = self.held_shards()
            if not shards:
                for work in batch:
                    if not work.reply.done():
                        work.reply.set_exception(PeerError(self.config.node_id, "no experts loaded yet"))
                continue
            results = await self._loop.run_in_executor(self._compute, self._timed_compute, shards, batch)
            for work, result in zip(batch, results, strict=True):
                if work.reply.done():
                    continue
                if isinstance(result, Exception):
                    work.reply.set_exception(result)
                else:
                    work.reply.set_result(result)

    def _timed_compute(self, shards: dict[int, FfnShard], batch: list[_Work]) -> list[torch.Tensor | Exception]:
        """Compute `batch` (compute thread). Per-expert counts are taken by the shards' experts as they compute."""
        start = time.perf_counter()
        requests = [work.request for work in batch]
        results = compute_batch(shards, requests)
        elapsed = time.perf_counter() - start
        rows = sum(r.num_tokens for r in requests)
        with self._counters_lock:  # take_load may be swapping the counters right now
            counters = self.counters
            counters.busy_s += elapsed
            counters.batches += 1
            counters.requests += len(requests)
            counters.tokens += rows
            self.token_rows_total += rows
        return results

    def take_load(self, reset: bool = False) -> pb.NodeLoad:
        """The load since the counters were last reset: busy fraction, and token-expert pairs per local
        expert of the current shard. With `reset` a new period starts, atomically with the compute thread."""
        shard = self.shard
        experts: list[int] = []
        with self._counters_lock:
            counters = self.counters
            rows = self.token_rows_total
            if reset:
                self.counters = LoadCounters()
            if shard is not None:
                now = shard.expert_token_counts()
                baseline = self._expert_baseline
                if baseline is not None and baseline.version == shard.placement.version:
                    experts = [count - before for count, before in zip(now, baseline.counts, strict=True)]
                else:
                    experts = now
                if reset:
                    self._expert_baseline = _ExpertBaseline(shard.placement.version, now)
        elapsed = max(time.monotonic() - counters.started, 1e-9)
        layers = shard.spec.num_layers if shard is not None else 1
        return pb.NodeLoad(
            busy_fraction=min(1.0, counters.busy_s / elapsed),
            expert_token_counts=experts,
            generated_tokens=rows // layers,  # tokens whose whole FFN stack ran here
        )

    # -- data plane: gRPC streams --------------------------------------------------------------

    async def _exchange(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        peer = context.peer()
        outbox = _StreamOutbox(self, self.config.max_in_flight_per_stream)
        reader = asyncio.ensure_future(self._read_stream(request_iterator, outbox, peer))
        try:
            while True:
                message = await outbox.queue.get()
                if message is None:
                    break
                try:
                    await context.write(message)  # waits while the peer does not read (HTTP/2 flow control)
                finally:
                    outbox.written(message)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            outbox.close()

    async def _read_stream(self, request_iterator: AsyncIterator[bytes], outbox: _StreamOutbox, peer: str) -> None:
        answering: set[asyncio.Task[None]] = set()
        try:
            async for message in request_iterator:
                await outbox.slots.acquire()  # given back once this request's reply is written
                task = asyncio.ensure_future(self._answer(message, outbox, peer))
                answering.add(task)
                task.add_done_callback(answering.discard)
            if answering:
                await asyncio.gather(*answering, return_exceptions=True)
        finally:
            for task in answering:  # the stream is gone (or ended early): nobody will read these replies
                task.cancel()
            outbox.queue.put_nowait(None)

    async def _answer(self, message: bytes, outbox: _StreamOutbox, peer: str) -> None:
        """Answer one request frame with exactly one reply in `outbox` (which keeps the frame's slot until
        the reply is written)."""
        try:
            reply = await self._reply_to(message, peer)
        except BaseException:  # cancelled with the stream: no reply, give the slot back
            outbox.slots.release()
            raise
        outbox.put(reply)

    async def _reply_to(self, message: bytes, peer: str) -> bytes:
        """The serialised DataFrame answering `message`: a partial sum, or an ERROR frame."""
        node = self.config.node_id
        frame: memoryview | None = None
        try:
            frame = grpc_data.open_envelope(message)
            if self.limits is None:
                raise PeerError(node, "no experts loaded yet")
            header, tensors = unpack(frame, self.limits)
            request = request_from_frame(header, tensors)
        except (FrameError, PeerError) as exc:
            seq = packed_frame_seq(frame) if frame is not None else UNKNOWN
            log.warning("bad frame from %s (seq %d): %s", peer, seq, exc)
            return grpc_data.envelope_bytes(_error_frame(str(exc), UNKNOWN, UNKNOWN, seq, node))
        try:
            partial = await self.submit(request)
            parts, length = pack_parts(*encode_response(partial, header.layer, header.microbatch, header.seq, node))
            return grpc_data.envelope(parts, length)
        except Exception as exc:
            log.warning("request seq %d from %s failed: %s", header.seq, peer, exc)
            error = _error_frame(f"{type(exc).__name__}: {exc}", header.layer, header.microbatch, header.seq, node)
            return grpc_data.envelope_bytes(error)

    # -- data plane: pairwise channels ---------------------------------------------------------

    async def open_channel(self, request: ChannelRequest, transport: str) -> bytes:
        acceptor = self.acceptors.get(transport)
        if acceptor is None:
            raise ConfigError(f"transport {transport!r} has no channel acceptor here (have: {sorted(self.acceptors)})")
        offer = await asyncio.to_thread(acceptor, request)
        assert self._loop is not None
        server = _ChannelServer(self, request.attention_node_id, offer, self._loop)
        self._channels.setdefault(request.attention_node_id, []).append(server)
        server.start()
        return offer.reply

    def close_channels(self, attention_node_id: str) -> int:
        channels = self._channels.pop(attention_node_id, [])
        for channel in channels:
            channel.stop()
        return len(channels)


def _error_frame(message: str, layer: int, microbatch: int, seq: int, node: str) -> bytes:
    header, _ = encode_error(message, layer, microbatch, seq, node)
    parts, _ = pack_parts(header, [])
    return b"".join(parts)


class _StreamOutbox:
    """The replies of one Exchange stream waiting to be written, and the slots that bound them.

    A request frame takes a slot before the stream is read further, and gives it back only once its reply
    has been written to the stream. A peer that stops reading therefore holds at most `slots` requests and
    replies on this node; after that the node stops reading its frames and HTTP/2 flow control stops the
    peer's sends (back-pressure), while other streams are served as before.
    """

    def __init__(self, server: FfnNodeServer, slots: int) -> None:
        self.server = server
        self.slots = asyncio.Semaphore(slots)
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        """At most `slots` replies (each holds its slot) and the end marker None."""
        self.closed = False

    def put(self, reply: bytes) -> None:
        if self.closed:  # the stream is gone: drop the reply and its slot
            self.slots.release()
            return
        self.server.queued_reply_bytes += len(reply)
        self.queue.put_nowait(reply)

    def written(self, reply: bytes) -> None:
        """`reply` left the queue (written, or the write failed): its slot is free again."""
        self.server.queued_reply_bytes -= len(reply)
        self.slots.release()

    def close(self) -> None:
        """The stream ended: forget the replies nobody will write."""
        self.closed = True
        while not self.queue.empty():
            reply = self.queue.get_nowait()
            if reply is not None:
                self.written(reply)


class _ChannelServer:
    """Serves frames arriving on one pairwise channel: a receive thread submits, a send thread answers in order."""

    def __init__(self, server: FfnNodeServer, peer: str, offer: ChannelOffer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.peer = peer
        self.offer = offer
        self.loop = loop
        self.channel: Channel | None = None
        self._stop = threading.Event()
        self._replies: queue.Queue[tuple[int, int, int, concurrent.futures.Future[torch.Tensor] | str] | None] = (
            queue.Queue(server.config.max_in_flight_per_stream)
        )
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        thread = threading.Thread(
            target=self._guarded(self._receive, "receive"), name=f"channel-recv-{self.peer}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _guarded(self, body: Callable[[], None], role: str) -> Callable[[], None]:
        """`body` as a thread target whose unexpected exception stops the node (FfnNodeServer.fail), unless
        the channel is being stopped anyway (a blocked call interrupted by close)."""

        def run() -> None:
            try:
                body()
            except Exception as exc:
                if self._stop.is_set():
                    log.debug("channel %s thread of %s ended while stopping: %s", role, self.peer, exc)
                    return
                self.stop()
                self.server.fail(exc, f"the {role} thread of the channel from {self.peer}")

        return run

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._replies.put_nowait(None)
        if self.channel is not None:
            with contextlib.suppress(Exception):
                self.channel.close()

    def _receive(self) -> None:
        node = self.server.config.node_id
        try:
            self.channel = self.offer.connect()
        except Exception:
            log.exception("channel from %s could not be connected", self.peer)
            return
        sender = threading.Thread(
            target=self._guarded(self._send, "send"), name=f"channel-send-{self.peer}", daemon=True
        )
        self._threads.append(sender)
        sender.start()
        poll = self.server.config.channel_poll_s

        def specs(header: bytes) -> list[Any]:
            if self.server.limits is None:
                raise PeerError(node, "no experts loaded yet")
            return decode_header(header, self.server.limits).tensor_specs()

        while not self._stop.is_set():
            started = time.monotonic()
            try:
                header_bytes, tensors = self.channel.recv(specs, poll)
            except FrameError as exc:  # the header itself is bad: which request it was is unknown
                log.warning("bad frame on channel from %s: %s", self.peer, exc)
                self._put((UNKNOWN, UNKNOWN, UNKNOWN, str(exc)))
                continue
            except PeerError:
                if self._stop.is_set() or time.monotonic() - started < poll / 2:
                    log.info("channel from %s closed", self.peer)
                    break
                continue  # idle: no frame within the poll interval
            try:
                assert self.server.limits is not None
                header = decode_header(header_bytes, self.server.limits)
            except FrameError as exc:  # limits changed (LoadExperts) between recv and now
                self._put((UNKNOWN, UNKNOWN, UNKNOWN, str(exc)))
                continue
            try:
                request = request_from_frame(header, tensors)
            except FrameError as exc:
                log.warning("bad frame on channel from %s (seq %d): %s", self.peer, header.seq, exc)
                self._put((header.layer, header.microbatch, header.seq, str(exc)))
                continue
            future = asyncio.run_coroutine_threadsafe(self._compute(request), self.loop)
            self._put((header.layer, header.microbatch, header.seq, future))
        self.stop()

    async def _compute(self, request: FfnRequest) -> torch.Tensor:
        return await self.server.submit(request)

    def _put(self, item: tuple[int, int, int, concurrent.futures.Future[torch.Tensor] | str]) -> None:
        while not self._stop.is_set():
            try:
                self._replies.put(item, timeout=self.server.config.channel_poll_s)
                return
            except queue.Full:
                continue

    def _send(self) -> None:
        node = self.server.config.node_id
        while not self._stop.is_set():
            try:
                item = self._replies.get(timeout=self.server.config.channel_poll_s)
            except queue.Empty:
                continue
            if item is None or self.channel is None:
                return
            layer, microbatch, seq, outcome = item
            if isinstance(outcome, str):
                reply = encode_error(outcome, layer, microbatch, seq, node)
            else:
                try:
                    partial = outcome.result()
                except Exception as exc:  # this request failed (or was cancelled): its own ERROR frame
                    reply = encode_error(f"{type(exc).__name__}: {exc}", layer, microbatch, seq, node)
                else:
                    reply = encode_response(partial, layer, microbatch, seq, node)
            try:
                self.channel.send(*reply)
            except PeerError as exc:
                log.info("channel to %s failed: %s", self.peer, exc)
                self.stop()
                return


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
        wanted = ChannelRequest(request.attention_node_id, request.rendezvous, self.node.config.node_id)
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


# ---------------------------------------------------------------------------------------------------
# Process entry point
# ---------------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run one FFN node (gRPC data plane, control and health).")
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--node-id", required=True, help="this node's id in the placement")
    parser.add_argument("--placement-file", type=Path, help="ExpertPlacement JSON (to_dict); else wait for LoadExperts")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to bind, 0 for any free one (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", help="compute dtype (default: %(default)s)")
    parser.add_argument("--ready-file", type=Path, help="written with the bound port once serving")
    parser.add_argument("--cluster-token-file", type=Path, help="file holding the shared cluster token")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="M2N batch cap (default: %(default)s)")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> FfnServerConfig:
    placement = None
    if args.placement_file is not None:
        try:
            placement = ExpertPlacement.from_dict(json.loads(args.placement_file.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read placement file {args.placement_file}: {exc}") from exc
    return FfnServerConfig(
        model_dir=args.model,
        node_id=args.node_id,
        placement=placement,
        host=args.host,
        port=args.port,
        dtype=args.dtype,
        auth=ClusterAuth.from_config(token_file=args.cluster_token_file),
        max_batch_tokens=args.max_batch_tokens,
    )


def write_ready_file(path: Path, port: int) -> None:
    """Write `port` atomically, so a reader never sees a partial file."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(f"{port}\n")
    os.replace(partial, path)


async def run_server(config: FfnServerConfig, ready_file: Path | None = None) -> None:
    """Start, serve until SIGTERM/SIGINT, shut down; raises NodeFailure (exit status 2) if the node's core failed."""
    server = FfnNodeServer(config)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await server.start()
        if ready_file is not None:
            write_ready_file(ready_file, server.port or 0)
        serving = asyncio.ensure_future(server.serve())
        await asyncio.wait([serving, asyncio.ensure_future(stopping.wait())], return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # re-raises NodeFailure
    finally:
        await server.shutdown()


BUILTIN_ACCEPTOR_MODULES = ("ffn_nodes.channel_acceptors",)
"""Modules that register channel acceptors on import (add a backend's module here)."""


def load_builtin_acceptors() -> None:
    """Import BUILTIN_ACCEPTOR_MODULES, filling CHANNEL_ACCEPTORS (gloo, shm, ...).

    Imported here, not at the top: those modules import this one to register themselves.
    """
    for module in BUILTIN_ACCEPTOR_MODULES:
        try:
            imported = importlib.import_module(module)
            # Run as `python -m ffn_nodes.server`, this module is __main__, not the one it registers in.
            CHANNEL_ACCEPTORS.update(getattr(imported, "ACCEPTORS", {}))
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but a dependency of it is missing
                log.warning("channel acceptors of %s unavailable: %s", module, exc)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load_builtin_acceptors()
    try:
        config = config_from_args(args)
        asyncio.run(run_server(config, args.ready_file))
    except AfdError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
