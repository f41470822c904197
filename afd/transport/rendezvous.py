"""Setting up a pairwise channel: the attention node offers, the FFN node joins.

Every pairwise backend is set up the same way. The attention node creates a `ChannelListener` (it hosts
the rendezvous: a TCPStore for gloo, shared-memory segments and a doorbell socket for shm), sends the
listener's `rendezvous` bytes to the FFN node in the FfnNode.OpenChannel RPC, and the FFN node joins
with them (`connect_gloo`, `connect_shm`). Some backends block on both sides until the other arrives
(gloo's process group needs both ranks), so `establish` runs the attention side's `accept` in a thread
while the RPC is in flight.

Rendezvous bytes come from the network, so they are msgpack (never pickle) and validated field by field.
"""

from __future__ import annotations

import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import msgpack

from afd.errors import AfdError, PeerError
from afd.transport.channel import Channel

MAX_RENDEZVOUS_BYTES = 4096
"""A rendezvous is a few short strings and numbers; anything larger is refused unread."""


class RendezvousError(AfdError, ValueError):
    """Rendezvous bytes are malformed or name a backend/host this node cannot join."""


def pack_rendezvous(backend: str, fields: dict[str, str | int]) -> bytes:
    return msgpack.packb({"backend": backend, **fields}, use_bin_type=True)


def unpack_rendezvous(data: bytes, backend: str, schema: dict[str, type]) -> dict[str, Any]:
    """Decode and check `data` against `schema` (field -> int or str); raises RendezvousError naming the field."""
    if len(data) > MAX_RENDEZVOUS_BYTES:
        raise RendezvousError(f"{backend} rendezvous of {len(data)} bytes exceeds {MAX_RENDEZVOUS_BYTES}")
    try:
        raw = msgpack.unpackb(data, raw=False, max_bin_len=0, max_ext_len=0, max_array_len=16, max_map_len=16)
    except Exception as exc:  # msgpack raises many types for garbage
        raise RendezvousError(f"{backend} rendezvous is not valid msgpack: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise RendezvousError(f"{backend} rendezvous must be a map")
    if raw.get("backend") != backend:
        raise RendezvousError(f"rendezvous is for backend {raw.get('backend')!r}, not {backend!r}")
    expected = {"backend", *schema}
    if set(raw) != expected:
        raise RendezvousError(f"{backend} rendezvous has fields {sorted(map(str, raw))}, expected {sorted(expected)}")
    for key, kind in schema.items():
        if type(raw[key]) is not kind:
            raise RendezvousError(f"{backend} rendezvous field {key!r} must be {kind.__name__}")
    return raw


def local_address_towards(host: str, port: int) -> str:
    """The local interface address this machine would use to reach host:port (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, port))
        except OSError as exc:
            raise RendezvousError(f"no route to {host}:{port}: {exc}") from None
        return str(probe.getsockname()[0])


class ChannelListener(ABC):
    """The attention node's half of a channel set-up; one listener per (attention, FFN) pair."""

    peer: str
    """Id of the FFN node expected to join."""

    @property
    @abstractmethod
    def rendezvous(self) -> bytes:
        """What the FFN node needs to join (sent in FfnNode.OpenChannel)."""

    @abstractmethod
    def accept(self, timeout: float) -> Channel:
        """Wait for the peer to join; raises PeerError naming it if it does not within `timeout` seconds."""

    @abstractmethod
    def close(self) -> None:
        """Release what an un-accepted listener holds; idempotent, harmless after accept."""


def establish(listener: ChannelListener, ask_peer: Callable[[bytes], object], timeout: float) -> Channel:
    """Open a channel: `ask_peer(rendezvous)` (e.g. the OpenChannel RPC) runs while `listener` accepts.

    Raises whatever `ask_peer` raises, or PeerError if the peer does not join within `timeout` seconds;
    the listener is closed on failure.
    """
    accepted: list[Channel] = []
    failed: list[BaseException] = []

    def accept() -> None:
        try:
            accepted.append(listener.accept(timeout))
        except BaseException as exc:  # handed to the caller's thread below
            failed.append(exc)

    acceptor = threading.Thread(target=accept, name=f"accept-{listener.peer}", daemon=True)
    acceptor.start()
    try:
        ask_peer(listener.rendezvous)
    except BaseException:
        listener.close()
        acceptor.join(timeout)
        for channel in accepted:
            channel.close()
        raise
    acceptor.join(timeout + 1.0)
    if failed:
        listener.close()
        raise failed[0]
    if not accepted:
        listener.close()
        raise PeerError(listener.peer, f"did not join the channel within {timeout:.1f}s")
    channel = accepted[0]
    return channel
