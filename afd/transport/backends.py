"""The pairwise channel backends by name, each with both of its halves, imported only when it is used.

A channel backend (gloo, shm, NCCL) has two halves: the attention node *listens* (it hosts the rendezvous,
see afd/transport/rendezvous.py) and the FFN node *accepts* (it checks the rendezvous bytes the attention
node sent in FfnNode.OpenChannel and joins). Both halves of every backend are in one table here, so adding
a backend is one entry, and neither side keeps a registry that modules fill when they are imported. Each
entry imports its module on first use, so a node without a GPU never loads the NCCL code, and an unknown
name is a clear error that lists the backends there are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from afd.errors import ConfigError
from afd.transport.channel import Channel

if TYPE_CHECKING:
    from afd.transport.gloo_channel import GlooOptions, GlooStoreServer
    from afd.transport.nccl.channel import NcclOptions
    from afd.transport.rendezvous import ChannelListener
    from afd.transport.shm_channel import ShmOptions


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    """What an attention node asked an FFN node for in OpenChannel."""

    attention_node_id: str
    rendezvous: bytes
    """Backend-specific: TCPStore address, NCCL unique id, shm segment names..."""
    ffn_node_id: str
    device: str | None = None
    """The FFN node's compute device ("cuda:1"): where an NCCL channel's buffers live (None: the current CUDA
    device). Host backends ignore it (they stage through host memory, afd.transport.staging)."""


@dataclass(frozen=True, slots=True)
class ChannelOffer:
    """An acceptor's answer: the reply rendezvous, and how to complete the link."""

    reply: bytes
    """Returned to the attention node in OpenChannelResponse.rendezvous."""
    connect: Callable[[], Channel]
    """Completes the link; may block until the attention side joins. Runs on a thread of its own."""


ChannelAcceptor = Callable[[ChannelRequest], ChannelOffer]
"""The FFN half: checks the request's rendezvous at once (raise AfdError to refuse) and says how to join."""


@dataclass(slots=True)
class ChannelListeners:
    """The attention half's settings, and what several pairs of one node share (gloo's store)."""

    gloo_host: str = "127.0.0.1"
    """Address of this attention node that FFN nodes reach for gloo (its TCPStore and gloo pairs bind it)."""
    gloo: GlooOptions | None = None
    """Options of gloo channels (the backend's defaults when None)."""
    shm: ShmOptions | None = None
    """Options of shared-memory channels (the backend's defaults when None)."""
    nccl: NcclOptions | None = None
    """Options of NCCL channels (one communicator per pair; the unique id travels in OpenChannel)."""
    nccl_device: int | None = None
    """CUDA device of this node's NCCL communicators; the current device when None."""
    _gloo_store: GlooStoreServer | None = field(default=None, repr=False)

    def listener(self, backend: str, peer: str) -> ChannelListener:
        """A fresh listener of `backend` for FFN node `peer`; ConfigError for a backend that does not exist."""
        return channel_backend(backend).listen(self, peer)

    def gloo_store(self) -> GlooStoreServer:
        """The one TCPStore this node's gloo pairs meet at, started on first use."""
        if self._gloo_store is None:
            from afd.transport.gloo_channel import GlooStoreServer

            self._gloo_store = GlooStoreServer(self.gloo_host)
        return self._gloo_store

    def close(self) -> None:
        if self._gloo_store is not None:
            self._gloo_store.close()
            self._gloo_store = None


@dataclass(frozen=True, slots=True)
class ChannelBackend:
    """One backend's two halves."""

    name: str
    listen: Callable[[ChannelListeners, str], ChannelListener]
    """Attention half: a listener for FFN node `peer` (raises if the backend cannot run here)."""
    accept: ChannelAcceptor
    """FFN half."""
    check_available: Callable[[], None] = lambda: None
    """Raises (naming the reason) when this machine cannot run the backend; called when a node starts."""


def _listen_gloo(listeners: ChannelListeners, peer: str) -> ChannelListener:
    from afd.transport.gloo_channel import GlooOptions

    return listeners.gloo_store().listener(peer, listeners.gloo or GlooOptions())


def _accept_gloo(request: ChannelRequest) -> ChannelOffer:
    from afd.transport.gloo_channel import check_gloo_rendezvous, connect_gloo

    check_gloo_rendezvous(request.rendezvous)
    return ChannelOffer(b"", lambda: connect_gloo(request.rendezvous, request.attention_node_id))


def _listen_shm(listeners: ChannelListeners, peer: str) -> ChannelListener:
    from afd.transport.shm_channel import ShmListener, ShmOptions

    return ShmListener(peer, listeners.shm or ShmOptions())


def _accept_shm(request: ChannelRequest) -> ChannelOffer:
    from afd.transport.shm_channel import check_shm_rendezvous, connect_shm

    check_shm_rendezvous(request.rendezvous)
    return ChannelOffer(b"", lambda: connect_shm(request.rendezvous, request.attention_node_id))


def _listen_nccl(listeners: ChannelListeners, peer: str) -> ChannelListener:
    from afd.transport.nccl.channel import NcclListener, NcclOptions

    return NcclListener(peer, listeners.nccl_device, listeners.nccl or NcclOptions())  # raises without GPU/libnccl


def _accept_nccl(request: ChannelRequest) -> ChannelOffer:
    from afd.transport.nccl.channel import check_nccl_rendezvous, connect_nccl

    check_nccl_rendezvous(request.rendezvous)
    device = request.device
    return ChannelOffer(b"", lambda: connect_nccl(request.rendezvous, request.attention_node_id, device, None))


def _check_nccl() -> None:
    from afd.transport.nccl import NcclUnavailableError, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        raise NcclUnavailableError(reason)


CHANNEL_BACKENDS: Mapping[str, ChannelBackend] = {
    "gloo": ChannelBackend("gloo", _listen_gloo, _accept_gloo),
    "shm": ChannelBackend("shm", _listen_shm, _accept_shm),
    "nccl": ChannelBackend("nccl", _listen_nccl, _accept_nccl, _check_nccl),
}
"""Every channel backend, by the name `--transport` takes."""


def channel_backend(name: str) -> ChannelBackend:
    """The backend called `name`; ConfigError listing the backends for any other name."""
    backend = CHANNEL_BACKENDS.get(name)
    if backend is None:
        raise ConfigError(f"no channel backend {name!r}; choose one of {', '.join(sorted(CHANNEL_BACKENDS))}")
    return backend


def channel_acceptors(extra: Mapping[str, ChannelAcceptor] | None = None) -> dict[str, ChannelAcceptor]:
    """The FFN half of every backend by name, with `extra` (tests, embedding) added or overriding."""
    acceptors: dict[str, Any] = {name: backend.accept for name, backend in CHANNEL_BACKENDS.items()}
    return acceptors | dict(extra or {})
