"""gRPC transport: one bidirectional FfnData.Exchange stream (or a few) per attention->FFN pair.

`dispatch` encodes each FfnRequest as a frame on the calling thread (one copy of the tensors, so the
caller may reuse them at once), hands it to a background asyncio loop that owns the grpc.aio streams,
and returns. Replies carry the request's sequence number; a reader task per stream resolves the
matching future. `combine` waits for the futures with a deadline, so a dead peer (its stream fails
with UNAVAILABLE at once) or a hung one (no reply within `timeout_s`) raises PeerError naming it.

Flow control: at most `max_in_flight` frames per peer await a reply (dispatch waits for a slot, up to
the timeout); below that, gRPC's HTTP/2 windows push back on the writer. Nothing waits without a bound.

Frames travel in hand-written DataFrame envelopes (afd.wire.grpc_data) rather than through the
generated message class, which would copy every payload twice more. With `streams_per_peer > 1`
each stream gets its own channel and TCP connection, and frames round-robin over them: one HTTP/2
connection is bounded by a single core's framing work, several are not.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import grpc.aio
import torch

from afd.errors import ConfigError, PeerError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.transport.replies import AwaitedReply, ReplyFutureTransport, fail, resolve
from afd.transport.staging import HostStaging
from afd.wire import grpc_data
from afd.wire.auth import ClusterAuth
from afd.wire.event_loop import EventLoopThread
from afd.wire.frames import (
    FrameError,
    FrameKind,
    FrameLimits,
    encode_request,
    pack_parts,
    unpack,
)


@dataclass(frozen=True, slots=True)
class GrpcTransportConfig:
    """Options of the attention side of the gRPC data plane."""

    sender: str = "attn-0"
    """This attention node's id: the sender of every frame, shown in the FFN node's errors."""
    timeout_s: float = 30.0
    """Longest wait, in combine, for a peer's partial sum (and in dispatch for a free in-flight slot)."""
    connect_timeout_s: float = 10.0
    """Longest wait in `wait_ready` for every peer's channel to connect."""
    streams_per_peer: int = 1
    """Exchange streams per FFN node, each on its own TCP connection; frames round-robin over them."""
    max_in_flight: int = 16
    """Frames per FFN node awaiting a reply; dispatch waits for a slot beyond it."""
    max_frame_bytes: int = 256 * 2**20
    """Largest frame sent or accepted (also lifts gRPC's 4 MiB message limit)."""
    keepalive_s: float = 20.0
    """HTTP/2 ping interval on idle connections, so a vanished host is noticed without traffic."""
    auth: ClusterAuth = field(default_factory=ClusterAuth)
    """Cluster token / mTLS of every channel."""
    gil_switch_interval_s: float | None = None
    """If set, `sys.setswitchinterval` for the whole process. The streams run on a thread beside the
    engine's; with CPython's default 5 ms interval a reply can wait that long for the GIL (p99 64 KiB
    round trip 5.8 ms -> 1.2 ms at 0.0005 on a 2-core box). Process-global, hence opt-in."""
    device: torch.device | None = None
    """Where `combine` returns the partial sums: this node's compute device (None: on the CPU, where frames
    are decoded). Requests on an accelerator are staged through pinned host memory (afd.transport.staging)."""

    def __post_init__(self) -> None:
        if not self.sender:
            raise ConfigError("GrpcTransportConfig.sender must not be empty")
        for name in ("timeout_s", "connect_timeout_s", "keepalive_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"GrpcTransportConfig.{name} must be positive, got {getattr(self, name)}")
        if self.gil_switch_interval_s is not None and not 0 < self.gil_switch_interval_s <= 0.1:
            raise ConfigError(f"gil_switch_interval_s must be in (0, 0.1], got {self.gil_switch_interval_s}")
        for name in ("streams_per_peer", "max_in_flight", "max_frame_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GrpcTransportConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class _Stream:
    """One Exchange call and its channel (loop thread only)."""

    channel: grpc.aio.Channel | None = None
    call: grpc.aio.StreamStreamCall | None = None
    outbox: asyncio.Queue[bytes] | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class _PeerLink:
    """The streams to one FFN node and the requests awaiting its replies."""

    def __init__(self, node: str, address: str, transport: GrpcTransport) -> None:
        self.node = node
        self.address = address
        self.transport = transport
        config = transport.config
        self.slots = threading.BoundedSemaphore(config.max_in_flight)
        self.awaited: dict[int, AwaitedReply] = {}
        self.streams = [_Stream() for _ in range(config.streams_per_peer)]
        self._next_stream = itertools.cycle(range(config.streams_per_peer))
        self.closed = False

    # -- loop thread ---------------------------------------------------------------------------

    def _channel_options(self) -> list[tuple[str, int]]:
        config = self.transport.config
        options = grpc_data.message_size_options(config.max_frame_bytes + 2**20)
        options += [
            ("grpc.keepalive_time_ms", int(config.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(config.keepalive_s * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            # one TCP connection per stream: channels to one address otherwise share a subchannel
            ("grpc.use_local_subchannel_pool", 1),
        ]
        return options

    def _channel(self, index: int) -> grpc.aio.Channel:
        stream = self.streams[index]
        if stream.channel is None:
            stream.channel = self.transport.config.auth.aio_channel(self.address, self._channel_options())
        return stream.channel

    def _open(self, index: int) -> _Stream:
        stream = self.streams[index]
        if stream.call is not None:
            return stream
        config = self.transport.config
        channel = self._channel(index)
        stream.call = grpc_data.exchange_call(channel)(metadata=config.auth.call_metadata() or None)
        stream.outbox = asyncio.Queue()
        stream.tasks = [
            asyncio.ensure_future(self._write_loop(index, stream.call, stream.outbox)),
            asyncio.ensure_future(self._read_loop(index, stream.call)),
        ]
        return stream

    def send(self, seq: int, message: bytes, awaited: AwaitedReply) -> None:
        if self.closed:
            fail(awaited.future, PeerError(self.node, "the gRPC transport is closed"))
            return
        index = next(self._next_stream)
        stream = self._open(index)
        awaited.stream = index
        self.awaited[seq] = awaited
        assert stream.outbox is not None
        stream.outbox.put_nowait(message)

    async def _write_loop(self, index: int, call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue[bytes]) -> None:
        try:
            while True:
                message = await outbox.get()
                await call.write(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._reset(index, call, _describe(exc))

    async def _read_loop(self, index: int, call: grpc.aio.StreamStreamCall) -> None:
        limits = self.transport.limits
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    self._reset(index, call, "the FFN node closed the stream")
                    return
                self._on_reply(index, message, limits)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._reset(index, call, _describe(exc))

    def _on_reply(self, index: int, message: bytes, limits: FrameLimits) -> None:
        try:
            header, tensors = unpack(grpc_data.open_envelope(message), limits)
        except FrameError as exc:
            self._fail_stream(index, f"sent an invalid frame: {exc}")
            return
        if header.kind is FrameKind.ERROR and header.seq == -1:
            # The node could not even read which request it was.
            self._fail_stream(index, f"rejected a frame: {header.error}")
            return
        awaited = self.awaited.pop(header.seq, None)
        if awaited is not None:  # else a reply to a request combine gave up on
            resolve(self.node, awaited, header, tensors)

    def _fail_stream(self, index: int, reason: str) -> None:
        error = PeerError(self.node, f"{reason} ({self.address})")
        for seq in [seq for seq, awaited in self.awaited.items() if awaited.stream == index]:
            fail(self.awaited.pop(seq).future, error)

    def _reset(self, index: int, call: grpc.aio.StreamStreamCall, reason: str) -> None:
        """The stream failed: fail what it carried; the next send opens a new call on the same channel."""
        stream = self.streams[index]
        if stream.call is None or stream.call is not call:
            return  # already replaced
        self._fail_stream(index, reason)
        stream.call.cancel()
        current = asyncio.current_task()
        for task in stream.tasks:
            if task is not current:
                task.cancel()
        stream.call, stream.outbox, stream.tasks = None, None, []

    def forget(self, seqs: list[int], reason: str) -> None:
        """Combine gave up on `seqs`: free their slots; a late reply is dropped."""
        for seq in seqs:
            awaited = self.awaited.pop(seq, None)
            if awaited is not None:
                fail(awaited.future, PeerError(self.node, reason))

    async def close(self) -> None:
        self.closed = True
        error = PeerError(self.node, "the gRPC transport is closed")
        for seq in list(self.awaited):
            fail(self.awaited.pop(seq).future, error)
        for stream in self.streams:
            if stream.call is not None:
                stream.call.cancel()
            for task in stream.tasks:
                task.cancel()
            if stream.channel is not None:
                await stream.channel.close(grace=None)
            stream.call, stream.channel, stream.tasks = None, None, []

    async def wait_ready(self, timeout: float) -> None:
        for index in range(len(self.streams)):
            try:
                await asyncio.wait_for(self._channel(index).channel_ready(), timeout)
            except asyncio.TimeoutError:
                raise PeerError(self.node, f"cannot connect to {self.address} within {timeout}s") from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"stream failed: {exc.code().name}: {exc.details()}"
    return f"stream failed: {type(exc).__name__}: {exc}"


class GrpcTransport(ReplyFutureTransport):
    """FfnTransport over gRPC bidirectional streams to FFN node servers (ffn_nodes.server)."""

    def __init__(
        self, peers: Mapping[str, str], limits: FrameLimits, config: GrpcTransportConfig | None = None
    ) -> None:
        """peers: FFN node id -> "host:port"; limits: what replies must look like (FrameLimits.for_model)."""
        super().__init__()
        self.config = config or GrpcTransportConfig()
        self.limits = limits
        if self.config.gil_switch_interval_s is not None:
            sys.setswitchinterval(self.config.gil_switch_interval_s)
        self.reply_device = self.config.device
        self._staging = HostStaging()
        """Pinned host buffer the requests of an accelerator node are framed from (this direction's one)."""
        self._seq = itertools.count(1)
        self._loop = EventLoopThread(f"grpc-transport-{self.config.sender}")
        self._loop.start()
        self._links: dict[str, _PeerLink] = {}
        self._closed = False
        self.set_peers(peers)

    @classmethod
    def for_model(
        cls, spec: ModelSpec, peers: Mapping[str, str], config: GrpcTransportConfig | None = None
    ) -> GrpcTransport:
        config = config or GrpcTransportConfig()
        return cls(peers, FrameLimits.for_model(spec, max_frame_bytes=config.max_frame_bytes), config)

    @property
    def peers(self) -> dict[str, str]:
        return {node: link.address for node, link in self._links.items()}

    def set_peers(self, peers: Mapping[str, str]) -> None:
        """Switch to a new set of FFN nodes (between steps): new ones are linked, gone ones closed."""
        links = dict(self._links)
        for node in list(links):
            if node not in peers or peers[node] != links[node].address:
                self._loop.submit(links.pop(node).close())
        for node, address in peers.items():
            if node not in links:
                links[node] = _PeerLink(node, address, self)
        self._links = links

    def wait_ready(self, timeout: float | None = None) -> None:
        """Connect every peer now; raises PeerError naming one that cannot be reached within the timeout."""
        timeout = timeout or self.config.connect_timeout_s
        for link in list(self._links.values()):
            try:
                self._loop.run(link.wait_ready(timeout), timeout + 1.0)
            except concurrent.futures.TimeoutError:
                raise PeerError(link.node, f"cannot connect to {link.address} within {timeout}s") from None

    @property
    def reply_timeout_s(self) -> float:
        return self.config.timeout_s

    def _late_detail(self, node: str) -> str:
        link = self._links.get(node)
        return f" (address {link.address if link is not None else '?'})"

    def _send(self, node: str, request: FfnRequest) -> tuple[int, concurrent.futures.Future[torch.Tensor]]:
        link = self._links.get(node)
        if link is None:
            raise PeerError(node, f"not a peer of this transport (peers: {sorted(self._links)})")
        if not link.slots.acquire(timeout=self.config.timeout_s):
            raise PeerError(node, f"{self.config.max_in_flight} frames unanswered for {self.config.timeout_s}s")
        try:
            seq = next(self._seq)
            header, tensors = encode_request(request, seq, self.config.sender)
            with self._staging.host_tensors(tensors) as host:  # the message is joined inside: one copy
                parts, length = pack_parts(header, host)
                if length > self.config.max_frame_bytes:
                    limit = self.config.max_frame_bytes
                    raise PeerError(node, f"frame of {length} bytes exceeds max_frame_bytes={limit}")
                message = grpc_data.envelope(parts, length)
        except BaseException:
            link.slots.release()
            raise
        future: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
        future.add_done_callback(lambda _: link.slots.release())
        awaited = AwaitedReply(future, request.layer, request.microbatch, request.num_tokens)
        try:
            self._loop.call_soon(link.send, seq, message, awaited)
        except RuntimeError:  # the loop thread is gone (closed concurrently)
            fail(future, PeerError(node, "the gRPC transport is closed"))
            raise PeerError(node, "the gRPC transport is closed") from None
        return seq, future

    def _abandon(self, futures: dict[str, tuple[int, concurrent.futures.Future[torch.Tensor]]], reason: str) -> None:
        for node, (seq, future) in futures.items():
            link = self._links.get(node)
            if future.done() or link is None:
                continue
            if self._loop.running:
                self._loop.call_soon(link.forget, [seq], reason)
            else:
                fail(future, PeerError(node, reason))

    def close(self) -> None:
        """Close every stream and channel and stop the loop thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._loop.running:
            closing = [self._loop.submit(link.close()) for link in self._links.values()]
            deadline = time.monotonic() + 5.0
            for future in closing:
                # closing is best effort; the loop is stopped below regardless
                with contextlib.suppress(Exception):
                    future.result(max(0.0, deadline - time.monotonic()))
        self._loop.stop()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
