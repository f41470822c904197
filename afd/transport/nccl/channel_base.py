"""What both directions of an NCCL channel (channel.py) share: its state, and how a call waits and fails.

Waiting and failure. Communicators are non-blocking (see communicator.py): every NCCL call returns at once
and completion is watched through CUDA events and ncclCommGetAsyncError in `poll_until` loops with
deadlines. Any failure other than a `recv` timeout aborts the communicator (ncclCommAbort, which ends
kernels stuck on a dead peer) and breaks the channel. On one host NCCL cannot see that a peer process
died, so these deadlines are what detects it there; across hosts NCCL also reports the dead connection.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from afd.errors import ConfigError, PeerError
from afd.transport.channel import Channel
from afd.transport.nccl.communicator import Communicator, poll_until
from afd.transport.nccl.first_message import ENVELOPE_BYTES
from afd.transport.nccl.library import DataType, DeviceBuffer, NcclError

# The channel's logger, named as before the split so that logging configuration naming it still applies.
log = logging.getLogger("afd.transport.nccl.channel")


@dataclass(frozen=True, slots=True)
class NcclOptions:
    """Timeouts and bounds of an NCCL channel."""

    connect_timeout: float = 60.0
    """Seconds both communicators of a pair may take to form; the peer must join within this."""
    io_timeout: float = 30.0
    """Seconds one transfer may take once under way: a sent frame being taken, the rest of a frame."""
    max_pending_frames: int = 16
    """Frames `send` may have in flight; beyond this it waits for the oldest to be taken."""
    max_message_bytes: int = 1 << 30
    """Largest tensor an envelope may announce; a larger one breaks the channel rather than allocating."""
    close_grace: float = 2.0
    """Seconds `close` lets the CLOSE envelope and earlier frames reach the peer before aborting."""
    library_path: str | None = None
    """A libnccl.so.2 to load instead of searching (see library.library_candidates)."""

    def __post_init__(self) -> None:
        if min(self.connect_timeout, self.io_timeout) <= 0 or self.close_grace < 0:
            raise ConfigError("NcclOptions timeouts must be > 0 (close_grace >= 0)")
        if self.max_pending_frames < 1 or self.max_message_bytes < 1:
            raise ConfigError("NcclOptions.max_pending_frames and max_message_bytes must be >= 1")


def byte_buffer(tensor: torch.Tensor) -> DeviceBuffer:
    """A flat contiguous uint8 tensor as an NCCL buffer."""
    return DeviceBuffer(tensor.data_ptr(), tensor.numel(), DataType.UINT8)


class _Direction:
    """One way of a pair: the communicator it uses, its CUDA stream and the lock of its thread."""

    def __init__(self, name: str, comm: Communicator | None, device: torch.device) -> None:
        self.name = name
        self.comm = comm
        """None for the sending side of a loopback, which queues instead of calling NCCL."""
        self.stream = torch.cuda.Stream(device)
        self.lock = threading.Lock()


class _InFlight(NamedTuple):
    """A frame posted by `send` and not yet known to be taken by the peer."""

    done: torch.cuda.Event
    deadline: float
    keep: list[torch.Tensor]
    """Buffers the transfer reads; they must outlive it."""


class _Queued(NamedTuple):
    """Loopback: one group of a frame waiting for `recv` to post the matching receives."""

    buffers: list[torch.Tensor]
    ready: torch.cuda.Event
    """Recorded after the buffers were written."""
    keep: list[torch.Tensor]
    """Everything else the frame's copies read."""


def _pinned(size: int) -> torch.Tensor:
    """A zeroed page-locked host buffer: what copies to and from the device run asynchronously against."""
    return torch.zeros(size, dtype=torch.uint8, pin_memory=True)


class NcclChannelBase(Channel):
    """The state of one end of an NCCL pair and the waiting and failing its two directions share."""

    def _setup(
        self,
        peer: str,
        device: torch.device,
        options: NcclOptions,
        send: Communicator | None,
        recv: Communicator,
        peer_rank: int,
    ) -> None:
        super().__init__(peer)
        self.device = device
        """The CUDA device this end's buffers live on; received tensors are allocated here."""
        self.options = options
        self._peer_rank = peer_rank
        self._loopback = send is None
        self._send = _Direction("send", send, device)
        self._recv = _Direction("receive", recv, device)
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        """Posted sends, oldest first (send lock)."""
        self._queued: collections.deque[_Queued] = collections.deque()
        """Loopback only: sent groups awaiting their receives (guarded by `_queue_changed`)."""
        self._queue_changed = threading.Condition()
        with torch.cuda.stream(self._recv.stream):
            self._envelope = torch.empty(ENVELOPE_BYTES, dtype=torch.uint8, device=device)
        self._envelope_host = _pinned(ENVELOPE_BYTES)
        self._posted: torch.cuda.Event | None = None
        """The next envelope's receive (and copy to the host), posted and not yet read (receive lock)."""
        self._posted_from: _Queued | None = None
        self._broken: str | None = None
        self._closed = False
        self._close_lock = threading.Lock()

    # -- waiting and failing ------------------------------------------------------------------------

    @staticmethod
    def _stream_id(direction: _Direction) -> int:
        return int(direction.stream.cuda_stream)

    def _call(self, direction: _Direction, post: Callable[[], None]) -> None:
        """Run an NCCL call of `direction`'s communicator; an NCCL error breaks the channel."""
        try:
            with torch.cuda.device(self.device):
                post()
        except NcclError as exc:
            raise self._break(f"NCCL failed: {exc}", direction) from None

    def _wait(
        self,
        direction: _Direction,
        done: Callable[[], bool],
        deadline: float,
        stop: Callable[[], bool] | None = None,
    ) -> bool:
        """Poll `done` and the communicator's health until `deadline` (False then).

        PeerError if the channel is closed meanwhile (unless `stop` replaces that check) or NCCL reports
        an error, such as a dropped connection to the peer.
        """
        comm = direction.comm
        assert comm is not None
        stopped = stop or self._is_closed

        def finished() -> bool:
            comm.ready()  # raises NcclError once the communicator has failed
            return bool(done())

        try:
            if poll_until(finished, deadline, stopped):
                return True
        except NcclError as exc:
            raise self._break(f"connection lost ({exc})", direction) from None
        if stopped():
            raise PeerError(self.peer, "channel is closed")
        return False

    def _is_closed(self) -> bool:
        return self._closed

    def _usable(self, direction: _Direction) -> None:
        if self._closed:
            raise PeerError(self.peer, "channel is closed")
        if self._broken is not None:
            self._abort(direction)
            raise PeerError(self.peer, f"channel is broken: {self._broken}")

    def _break(self, reason: str, direction: _Direction) -> PeerError:
        """Mark the channel broken and abort `direction`'s communicator (its lock is held); the error to raise."""
        self._broken = self._broken or reason
        self._abort(direction)
        return PeerError(self.peer, reason)

    def _abort(self, direction: _Direction) -> None:
        comm = direction.comm
        if comm is None or comm.aborted:
            return
        try:
            with torch.cuda.device(self.device):
                comm.abort()
        except NcclError as exc:
            log.warning("aborting the NCCL communicator of %s failed: %s", self.peer, exc)
        if direction is self._send:
            self._in_flight.clear()
        else:
            self._posted = self._posted_from = None


def _never() -> bool:
    return False
