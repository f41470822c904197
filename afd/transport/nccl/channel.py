"""An NCCL point-to-point channel between one attention node (rank 0) and one FFN node (rank 1).

How the two ends meet - the pair id, its rendezvous bytes, forming the two communicators - is
afd/transport/nccl/pairing.py; a frame's first message (envelope and inline header) is first_message.py.
The channel is split by direction: sending.py (`send`, `flush`) and receiving.py (`recv`), over
channel_base.py (the state both share, and how a call waits and fails). This module puts them together
with how a channel is made and closed, and holds its two ends (`NcclListener`, rank 0; `connect_nccl`,
rank 1). `close` sends a CLOSE envelope so that a peer blocked in `recv` learns at once, then aborts
both communicators.

A one-GPU loopback (`NcclChannel.loopback`) pairs the channel with itself through a one-rank
communicator (sending.py and receiving.py say what each direction does then). Until NCCL 2.30 two ranks
of a communicator may not share a GPU, so this is how the frame path is tested, and measured, on a single
device.
"""

from __future__ import annotations

import atexit
import contextlib
import time
import weakref
from dataclasses import replace

import torch

from afd.errors import ConfigError, PeerError
from afd.transport.envelope import EnvelopeKind
from afd.transport.nccl.channel_base import NcclOptions, _never, log
from afd.transport.nccl.first_message import (
    ENVELOPE_BYTES,
    HEADER_ROOM,
    pack_first_message,
    parse_first_message,
)
from afd.transport.nccl.library import NCCL_UNIQUE_ID_BYTES, load_library, require_cuda
from afd.transport.nccl.pairing import PAIR_ID_BYTES, check_nccl_rendezvous, form_communicators, nccl_rendezvous
from afd.transport.nccl.receiving import ReceiveSide
from afd.transport.nccl.sending import MAX_LOOPBACK_QUEUE, SendSide
from afd.transport.rendezvous import ChannelListener

__all__ = [
    "ENVELOPE_BYTES",
    "HEADER_ROOM",
    "MAX_LOOPBACK_QUEUE",
    "PAIR_ID_BYTES",
    "NcclChannel",
    "NcclListener",
    "NcclOptions",
    "check_nccl_rendezvous",
    "connect_nccl",
    "nccl_rendezvous",
    "pack_first_message",
    "parse_first_message",
]

_LOCK_WAIT_S = 5.0
"""How long `close` waits for a thread inside send/recv to notice the channel closing (they poll every ms)."""


def resolve_device(device: torch.device | int | str | None) -> torch.device:
    require_cuda()
    resolved = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if resolved.type != "cuda":
        raise ConfigError(f"an NCCL channel needs a CUDA device, got {resolved}")
    if resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    if resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"no CUDA device {resolved}: this machine has {torch.cuda.device_count()}")
    return resolved


class NcclChannel(SendSide, ReceiveSide):
    """One end of an NCCL pair. `send` and `recv` may be called from different threads."""

    def __init__(
        self,
        peer: str,
        unique_id: bytes,
        rank: int,
        device: torch.device | int | str | None = None,
        options: NcclOptions | None = None,
    ) -> None:
        """Join the pair named by `unique_id` (from `create_unique_id`) as `rank` (0 attention, 1 FFN).

        Blocks until the peer has joined too; PeerError after `options.connect_timeout` seconds.
        NcclUnavailableError without CUDA or libnccl.
        """
        options = options or NcclOptions()
        if len(unique_id) != PAIR_ID_BYTES:
            raise ConfigError(f"an NCCL pair id is {PAIR_ID_BYTES} bytes, got {len(unique_id)}")
        if rank not in (0, 1):
            raise ConfigError(f"rank must be 0 (attention node) or 1 (FFN node), got {rank}")
        device = resolve_device(device)  # no GPU is the more basic gap, so it is reported first
        library = load_library(options.library_path)
        ids = [unique_id[:NCCL_UNIQUE_ID_BYTES], unique_id[NCCL_UNIQUE_ID_BYTES:]]
        to_ffn, to_attention = form_communicators(
            peer, library, device, [(uid, rank, 2) for uid in ids], options.connect_timeout
        )
        send, recv = (to_ffn, to_attention) if rank == 0 else (to_attention, to_ffn)
        self._setup(peer, device, options, send, recv, peer_rank=1 - rank)
        _LIVE.add(self)

    @staticmethod
    def create_unique_id(library_path: str | None = None) -> bytes:
        """A fresh pair id (PAIR_ID_BYTES): made by the attention node, sent to the FFN node."""
        library = load_library(library_path)
        return library.get_unique_id() + library.get_unique_id()

    @classmethod
    def loopback(
        cls, peer: str = "self", device: torch.device | int | str | None = None, options: NcclOptions | None = None
    ) -> NcclChannel:
        """A channel to itself on one GPU (NCCL self send/recv), for tests and the self test."""
        options = options or NcclOptions()
        device = resolve_device(device)
        library = load_library(options.library_path)
        (comm,) = form_communicators(peer, library, device, [(library.get_unique_id(), 0, 1)], options.connect_timeout)
        channel = cls.__new__(cls)
        channel._setup(peer, device, options, None, comm, peer_rank=0)
        _LIVE.add(channel)
        return channel

    # -- lifecycle ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Tell the peer (a CLOSE envelope, bounded by close_grace), then abort both communicators; idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True  # waits in other threads end within a poll interval
        _LIVE.discard(self)
        with self._queue_changed:
            self._queue_changed.notify_all()
        for direction in (self._send, self._recv):
            if not direction.lock.acquire(timeout=_LOCK_WAIT_S):
                log.warning("channel to %s: a %s call did not end; its communicator is left", self.peer, direction.name)
                continue
            try:
                if direction is self._send and not self._loopback and self._broken is None:
                    self._say_goodbye()
                self._abort(direction)
            finally:
                direction.lock.release()
        with self._queue_changed:
            self._queued.clear()

    def _say_goodbye(self) -> None:
        """Send CLOSE and give it and the frames before it close_grace to be taken (send lock held)."""
        try:
            self._post_frame(EnvelopeKind.CLOSE, b"", [], closing=True)
            deadline = time.monotonic() + self.options.close_grace
            for frame in self._in_flight:
                if not self._wait(self._send, frame.done.query, deadline, stop=_never):
                    break
        except PeerError as exc:
            log.info("channel to %s closed without a goodbye: %s", self.peer, exc)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"broken: {self._broken}" if self._broken else "open"
        return f"NcclChannel(peer={self.peer!r}, device={self.device}, {state})"


class NcclListener(ChannelListener):
    """Rank 0 of one pair (the attention side): makes the pair id and joins with it."""

    def __init__(
        self, peer: str, device: torch.device | int | str | None = None, options: NcclOptions | None = None
    ) -> None:
        self.peer = peer
        self.options = options or NcclOptions()
        self.device = device
        self._unique_id = NcclChannel.create_unique_id(self.options.library_path)

    @property
    def rendezvous(self) -> bytes:
        return nccl_rendezvous(self._unique_id)

    def accept(self, timeout: float) -> NcclChannel:
        options = replace(self.options, connect_timeout=timeout)
        return NcclChannel(self.peer, self._unique_id, 0, self.device, options)

    def close(self) -> None:
        """Nothing to release: an unused unique id costs NCCL one idle bootstrap socket."""


def connect_nccl(
    rendezvous: bytes, peer: str, device: torch.device | int | str | None = None, options: NcclOptions | None = None
) -> NcclChannel:
    """The FFN side (rank 1) of a pair: join the pair named by the attention node's rendezvous."""
    return NcclChannel(peer, check_nccl_rendezvous(rendezvous), 1, device, options)


_LIVE: weakref.WeakSet[NcclChannel] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """Channels left open would leave NCCL kernels spinning on the device while the process ends."""
    for channel in list(_LIVE):
        with contextlib.suppress(Exception):
            channel.close()
