"""FfnTransport over pairwise channels (gloo, shared memory, NCCL), and how an attention node opens them.

Attention side: `dispatch` encodes each FfnRequest as a frame (afd.wire.frames) and sends it on that FFN
node's channel from the calling thread — sending never waits for a reply — and returns. One receiver
thread per channel reads replies as they come and resolves the future of the request with the same
sequence number, so replies of several in-flight microbatches (ping-pong) can be outstanding at once.
`combine` waits for the futures with a deadline: a dead peer (its channel fails, the receiver fails
every waiting request at once) or a hung one (no reply in `timeout_s`) raises PeerError naming it.

Opening: `open_channels` creates a listener per FFN node, asks the node to join over the control plane
(FfnNode.OpenChannel, carrying the rendezvous bytes) and accepts. Both sides of each backend are in
afd/transport/backends.py; the FFN node serves its channels in ffn_nodes/channel_server.py.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import itertools
import math
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import torch

from afd.errors import ConfigError, PeerError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.transport.backends import ChannelListeners
from afd.transport.channel import Channel, TensorSpec
from afd.transport.rendezvous import establish
from afd.transport.replies import AwaitedReply, ReplyFutureTransport, fail, resolve
from afd.wire.auth import ClusterAuth
from afd.wire.frames import (
    UNKNOWN,
    FrameError,
    FrameHeader,
    FrameKind,
    FrameLimits,
    decode_header,
    encode_request,
)
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc


class _HeaderReader:
    """The `specs` callback of Channel.recv that also keeps the decoded header for the caller."""

    def __init__(self, limits: FrameLimits) -> None:
        self.limits = limits
        self.header: FrameHeader | None = None
        self.raw = b""

    def __call__(self, header: bytes) -> list[TensorSpec]:
        self.header = None
        self.raw = header
        self.header = decode_header(header, self.limits)
        return self.header.tensor_specs()


# ---------------------------------------------------------------------------------------------------
# Attention side
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChannelTransportConfig:
    """Options of the attention side of a channel transport."""

    sender: str = "attn-0"
    """This attention node's id: the sender of every frame, shown in the FFN node's errors."""
    timeout_s: float = 30.0
    """Longest wait, in combine, for a peer's partial sum (and in dispatch for a free in-flight slot)."""
    max_in_flight: int = 16
    """Frames per FFN node awaiting a reply; dispatch waits for a slot beyond it."""
    device: torch.device | None = None
    """Where `combine` returns the partial sums: this node's compute device (None: where the channel put
    them, the CPU for gloo / shm, the channel's GPU for NCCL). Host channels stage an accelerator's
    requests through pinned host memory themselves (afd.transport.staging)."""

    def __post_init__(self) -> None:
        if not self.sender:
            raise ConfigError("ChannelTransportConfig.sender must not be empty")
        if self.timeout_s <= 0 or self.max_in_flight < 1:
            raise ConfigError("ChannelTransportConfig needs timeout_s > 0 and max_in_flight >= 1")


class _Link:
    """One FFN node's channel, its receiver thread and the requests awaiting its replies."""

    def __init__(self, node: str, channel: Channel, limits: FrameLimits, config: ChannelTransportConfig) -> None:
        self.node = node
        self.channel = channel
        self.limits = limits
        self.slots = threading.BoundedSemaphore(config.max_in_flight)
        self.awaited: dict[int, AwaitedReply] = {}
        self.lock = threading.Lock()
        self.error: PeerError | None = None
        """Set once the channel has failed; every later dispatch to this node raises it."""
        self.closing = False
        self.receiver = threading.Thread(target=self._receive_loop, name=f"replies-{node}", daemon=True)
        self.receiver.start()

    def expect(self, seq: int, request: FfnRequest) -> concurrent.futures.Future[torch.Tensor]:
        future: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
        future.add_done_callback(lambda _: self.slots.release())
        with self.lock:
            if self.error is not None:
                raise self.error
            self.awaited[seq] = AwaitedReply(future, request.layer, request.microbatch, request.num_tokens)
        return future

    def forget(self, seqs: list[int], reason: str) -> None:
        """Combine gave up on `seqs`: fail them (freeing their slots); late replies are dropped."""
        with self.lock:
            gone = [self.awaited.pop(seq) for seq in seqs if seq in self.awaited]
        for awaited in gone:
            fail(awaited.future, PeerError(self.node, reason))

    def _receive_loop(self) -> None:
        reader = _HeaderReader(self.limits)
        while True:
            try:
                _, tensors = self.channel.recv(reader, math.inf)
            except FrameError as exc:
                # The channel drained the bad frame, but which request it answered is unknown.
                self._fail_all(PeerError(self.node, f"sent an invalid frame: {exc}"), fatal=False)
                continue
            except PeerError as exc:
                self._fail_all(exc if not self.closing else PeerError(self.node, "the transport is closed"))
                self.channel.close()  # releases the link now (gloo: the peer's blocked receive ends too)
                return
            except Exception as exc:  # a bug or an unexpected backend error must not leave combine hanging
                self._fail_all(PeerError(self.node, f"receiving failed: {type(exc).__name__}: {exc}"))
                self.channel.close()
                return
            assert reader.header is not None
            self._on_reply(reader.header, tensors)

    def _on_reply(self, header: FrameHeader, tensors: list[torch.Tensor]) -> None:
        if header.kind is FrameKind.ERROR and header.seq == UNKNOWN:
            self._fail_all(PeerError(self.node, f"rejected a frame: {header.error}"), fatal=False)
            return
        with self.lock:
            awaited = self.awaited.pop(header.seq, None)
        if awaited is not None:  # else the reply to a request combine gave up on
            resolve(self.node, awaited, header, tensors)

    def _fail_all(self, error: PeerError, fatal: bool = True) -> None:
        with self.lock:
            if fatal and self.error is None:
                self.error = error
            gone = list(self.awaited.values())
            self.awaited.clear()
        for awaited in gone:
            fail(awaited.future, error)

    def close(self) -> None:
        self.closing = True
        self.channel.close()
        self._fail_all(PeerError(self.node, "the transport is closed"))


_LIVE: weakref.WeakSet[ChannelTransport] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Close transports still open at exit, so their receiver threads end before the interpreter does
    (a thread ending during finalization may free tensors there, which aborts; see gloo_channel)."""
    for transport in list(_LIVE):
        transport.close()


class ChannelTransport(ReplyFutureTransport):
    """FfnTransport over one Channel per FFN node (gloo, shm, NCCL...); generic over the backend."""

    def __init__(
        self,
        channels: Mapping[str, Channel],
        limits: FrameLimits,
        config: ChannelTransportConfig | None = None,
        opener: ChannelOpener | None = None,
    ) -> None:
        """channels: FFN node id -> an open channel to it (owned by the transport from now on);
        limits: what replies must look like (FrameLimits.for_model); opener: how `set_peers` opens new ones."""
        super().__init__()
        self.config = config or ChannelTransportConfig()
        self.reply_device = self.config.device
        self.limits = limits
        self.opener = opener
        self._seq = itertools.count(1)
        self._links: dict[str, _Link] = {}
        self._addresses: dict[str, str] = {}
        self._closed = False
        for node, channel in channels.items():
            self.add_channel(node, channel)
        _LIVE.add(self)

    @classmethod
    def for_model(
        cls,
        spec: ModelSpec,
        peers: Mapping[str, str],
        opener: ChannelOpener,
        config: ChannelTransportConfig | None = None,
    ) -> ChannelTransport:
        """A transport whose channels `opener` opens to `peers` (FFN node id -> "host:port" of its FfnNode)."""
        transport = cls({}, FrameLimits.for_model(spec), config, opener)
        transport.set_peers(peers)
        return transport

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(self._links)

    @property
    def peers(self) -> dict[str, str]:
        """FFN node id -> control-plane address, for the channels `set_peers` opened."""
        return {node: self._addresses[node] for node in self._links if node in self._addresses}

    def set_peers(self, peers: Mapping[str, str]) -> None:
        """Switch to a new set of FFN nodes (between steps): channels to new nodes are opened (blocking:
        OpenChannel, then the backend's set-up), those to gone, moved or failed nodes closed.

        Raises ConfigError without an opener, PeerError naming a node that cannot be joined.
        """
        if self.opener is None:
            raise ConfigError("set_peers needs a ChannelOpener (ChannelTransport.for_model)")
        for node, link in list(self._links.items()):
            if node not in peers or peers[node] != self._addresses.get(node) or link.error is not None:
                self.remove_channel(node)
        new = {node: address for node, address in peers.items() if node not in self._links}
        if new:
            for node, channel in self.opener(new).items():
                self.add_channel(node, channel, new[node])

    def add_channel(self, node: str, channel: Channel, address: str | None = None) -> None:
        """Start using `channel` for FFN node `node` (replacing and closing an existing one)."""
        if self._closed:
            channel.close()
            raise PeerError(node, "the transport is closed")
        old = self._links.get(node)
        self._links = {**self._links, node: _Link(node, channel, self.limits, self.config)}
        if address is not None:
            self._addresses[node] = address
        if old is not None:
            old.close()

    def remove_channel(self, node: str) -> None:
        """Stop using (and close) the channel of `node`; its pending requests fail with PeerError."""
        links = dict(self._links)
        link = links.pop(node, None)
        self._links = links
        self._addresses.pop(node, None)
        if link is not None:
            link.close()

    @property
    def reply_timeout_s(self) -> float:
        return self.config.timeout_s

    def _send(self, node: str, request: FfnRequest) -> tuple[int, concurrent.futures.Future[torch.Tensor]]:
        link = self._links.get(node)
        if link is None:
            raise PeerError(node, f"no channel to this node (channels: {sorted(self._links)})")
        if link.error is not None:
            raise link.error
        if not link.slots.acquire(timeout=self.config.timeout_s):
            raise PeerError(node, f"{self.config.max_in_flight} frames unanswered for {self.config.timeout_s}s")
        seq = next(self._seq)
        try:
            header, tensors = encode_request(request, seq, self.config.sender)
        except BaseException:
            link.slots.release()
            raise
        future = link.expect(seq, request)
        try:
            link.channel.send(header, tensors)
        except PeerError as exc:
            link.forget([seq], str(exc))
            raise
        return seq, future

    def _abandon(self, futures: dict[str, tuple[int, concurrent.futures.Future[torch.Tensor]]], reason: str) -> None:
        for node, (seq, future) in futures.items():
            link = self._links.get(node)
            if link is not None and not future.done():
                link.forget([seq], reason)

    def close(self) -> None:
        """Close every channel (the FFN nodes' serving loops end); idempotent."""
        if self._closed:
            return
        self._closed = True
        links, self._links = self._links, {}
        for link in links.values():
            link.close()
        for link in links.values():
            link.receiver.join(timeout=2.0)
        if self.opener is not None:
            self.opener.listeners.close()

    def __enter__(self) -> ChannelTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------
# Opening channels over the control plane
# ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ChannelOpener:
    """How a ChannelTransport opens channels to FFN nodes given their control-plane addresses."""

    backend: str
    """Channel backend: "gloo", "shm" or "nccl"."""
    attention_node_id: str
    """This attention node's id, sent in OpenChannel."""
    listeners: ChannelListeners = field(default_factory=ChannelListeners)
    """Makes the attention side's listeners (holds the gloo store shared by the pairs)."""
    auth: ClusterAuth = field(default_factory=ClusterAuth)
    """Cluster token / mTLS of the OpenChannel calls."""
    timeout_s: float = 30.0
    """Longest wait for one node to join."""

    def __call__(self, peers: Mapping[str, str]) -> dict[str, Channel]:
        return open_channels(peers, self.backend, self.attention_node_id, self.listeners, self.auth, self.timeout_s)


def open_channels(
    peers: Mapping[str, str],
    backend: str,
    attention_node_id: str,
    listeners: ChannelListeners | None = None,
    auth: ClusterAuth | None = None,
    timeout: float = 30.0,
) -> dict[str, Channel]:
    """One channel of `backend` to every FFN node of `peers` (node id -> "host:port" of its FfnNode service).

    Each node is asked to join with FfnNode.OpenChannel carrying the listener's rendezvous. Raises PeerError
    naming a node that refuses or does not join within `timeout` seconds (channels opened so far are closed).
    """
    listeners = listeners or ChannelListeners()
    auth = auth or ClusterAuth()
    opened: dict[str, Channel] = {}
    try:
        for node, address in peers.items():

            def ask(rendezvous: bytes, node: str = node, address: str = address) -> None:
                request = pb.OpenChannelRequest(
                    attention_node_id=attention_node_id, transport=backend, rendezvous=rendezvous
                )
                with auth.channel(address) as control:
                    try:
                        pb_grpc.FfnNodeStub(control).OpenChannel(request, timeout=timeout)
                    except grpc.RpcError as exc:
                        raise PeerError(
                            node, f"refused a {backend} channel: {exc.code().name}: {exc.details()}"
                        ) from None

            opened[node] = establish(listeners.listener(backend, node), ask, timeout)
    except BaseException:
        for channel in opened.values():
            channel.close()
        raise
    return opened
