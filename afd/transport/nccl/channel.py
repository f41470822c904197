"""An NCCL point-to-point channel between one attention node (rank 0) and one FFN node (rank 1).

How the two ends meet - the pair id, its rendezvous bytes, forming the two communicators - is
afd/transport/nccl/pairing.py; a frame's first message (envelope and inline header) is first_message.py.
This module holds the channel and its two ends (`NcclListener`, rank 0; `connect_nccl`, rank 1).

On the wire a frame is its first message (first_message.py), then the header on its own if it did not
fit, then the tensors' bytes as one group of ncclSend/ncclRecv. The receiver validates the header with
the caller's `specs` before allocating anything and posts receives straight into the result tensors.
Sender and receiver post the same groups in the same order.

Waiting and failure. Communicators are non-blocking (see communicator.py): every NCCL call returns at once
and completion is watched through CUDA events and ncclCommGetAsyncError in `poll_until` loops with
deadlines. `send` posts and returns; up to `max_pending_frames` frames may be in flight, each of which
must be taken by the peer within `io_timeout`, or a later `send`/`flush` raises PeerError. `recv` waits
`timeout` for the next frame (a timeout there leaves the channel intact, its receive still posted),
then `io_timeout` for the rest of the frame. Any other failure aborts the communicator
(ncclCommAbort, which ends kernels stuck on a dead peer) and breaks the channel. On one host NCCL
cannot see that a peer process died, so these deadlines are what detects it there; across hosts NCCL
also reports the dead connection. `close` sends a CLOSE envelope so that a peer blocked in `recv` learns
at once, then aborts both communicators.

A one-GPU loopback (`NcclChannel.loopback`) pairs the channel with itself through a one-rank
communicator: `send` queues the frame and `recv` posts each message's ncclSend and ncclRecv in one group
(NCCL's self send/recv). Until NCCL 2.30 two ranks of a communicator may not share a GPU, so this is how
the frame path is tested, and measured, on a single device.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from afd.errors import ConfigError, PeerError
from afd.transport.channel import Channel, ChannelTimeout, SpecsFromHeader
from afd.transport.envelope import EnvelopeKind, MalformedEnvelope, check_frame
from afd.transport.nccl.communicator import Communicator, poll_until
from afd.transport.nccl.first_message import (
    ENVELOPE_BYTES,
    HEADER_ROOM,
    pack_first_message,
    parse_first_message,
)
from afd.transport.nccl.library import (
    NCCL_UNIQUE_ID_BYTES,
    DataType,
    DeviceBuffer,
    NcclError,
    load_library,
    require_cuda,
)
from afd.transport.nccl.pairing import PAIR_ID_BYTES, check_nccl_rendezvous, form_communicators, nccl_rendezvous
from afd.transport.rendezvous import ChannelListener
from afd.wire.frames import PayloadMismatch

log = logging.getLogger(__name__)

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

MAX_LOOPBACK_QUEUE = 1024
"""Loopback only: most messages `send` may queue before a `recv` takes them."""
_LOCK_WAIT_S = 5.0
"""How long `close` waits for a thread inside send/recv to notice the channel closing (they poll every ms)."""


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


def _stage_to_host(host: torch.Tensor, source: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """Queue a copy of `source` (device) into `host` (pinned) on `stream`, after what is queued there."""
    with torch.cuda.stream(stream):
        host.copy_(source, non_blocking=True)


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


class NcclChannel(Channel):
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
        return channel

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
        _LIVE.add(self)

    # -- sending ------------------------------------------------------------------------------------

    def send(self, header: bytes, tensors: Sequence[torch.Tensor]) -> None:
        """Post one frame and return; raises PeerError if earlier frames were not taken in time."""
        check_frame(header, len(tensors), "NCCL")
        with self._send.lock:
            self._usable(self._send)
            payload = [self._as_bytes(tensor) for tensor in tensors]
            limit = self.options.max_message_bytes
            too_large = [p.numel() for p in payload if p.numel() > limit]
            if too_large:
                raise ValueError(f"tensors of {too_large} bytes exceed max_message_bytes={limit}")
            self._reserve_slot()
            self._post_frame(EnvelopeKind.FRAME, header, payload)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the peer has taken every frame sent so far (within `timeout`, default io_timeout)."""
        with self._send.lock:
            self._usable(self._send)
            deadline = time.monotonic() + (self.options.io_timeout if timeout is None else timeout)
            while self._in_flight:
                self._settle_oldest(min(deadline, self._in_flight[0].deadline))
            if self._loopback:
                with self._queue_changed:
                    self._queue_changed.wait_for(lambda: not self._queued or self._closed, deadline - time.monotonic())
                    if self._queued:
                        raise PeerError(self.peer, "loopback frames were not received in time")

    def _as_bytes(self, tensor: torch.Tensor) -> torch.Tensor:
        """A flat uint8 view of `tensor` on this channel's device (copied only if elsewhere or strided)."""
        tensor = tensor.detach()
        if tensor.device != self.device:
            tensor = tensor.to(self.device)
        return tensor.contiguous().reshape(-1).view(torch.uint8)

    def _reserve_slot(self) -> None:
        """Retire frames the peer has taken; wait for the oldest if max_pending_frames are in flight."""
        while self._in_flight and self._in_flight[0].done.query():
            self._in_flight.popleft()
        if self._in_flight and time.monotonic() >= self._in_flight[0].deadline:
            raise self._break(f"took no frame for {self.options.io_timeout:.1f}s", self._send)
        if len(self._in_flight) >= self.options.max_pending_frames:
            self._settle_oldest(self._in_flight[0].deadline)

    def _settle_oldest(self, deadline: float) -> None:
        oldest = self._in_flight[0]
        if not self._wait(self._send, oldest.done.query, deadline):
            raise self._break(f"took no frame for {self.options.io_timeout:.1f}s", self._send)
        self._in_flight.popleft()

    def _post_frame(self, kind: int, header: bytes, payload: list[torch.Tensor], closing: bool = False) -> None:
        """Enqueue the groups of one frame on the send stream (send lock held)."""
        producer = torch.cuda.current_stream(self.device)
        stream = self._send.stream
        keep = list(payload)
        with torch.cuda.device(self.device):
            stream.wait_stream(producer)  # the tensors are written by work queued on the caller's stream
            with torch.cuda.stream(stream):
                envelope = pack_first_message(kind, header, [p.numel() for p in payload])
                groups = [[self._to_device(envelope, ENVELOPE_BYTES, keep)]]
                if len(header) > HEADER_ROOM:
                    groups.append([self._to_device(header, len(header), keep)])
                body = [p for p in payload if p.numel()]
                if body:
                    groups.append(body)
                deadline = time.monotonic() + self.options.io_timeout
                for group in groups:
                    self._transmit(group, deadline, keep, closing)
                done = torch.cuda.Event()
                done.record(stream)
        if not self._loopback:
            self._in_flight.append(_InFlight(done, deadline, keep))

    def _to_device(self, data: bytes, size: int, keep: list[torch.Tensor]) -> torch.Tensor:
        """`data`, zero-padded to `size` bytes, on the device (copied on the current stream: the send stream)."""
        host = _pinned(size)
        host[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        device = torch.empty(size, dtype=torch.uint8, device=self.device)
        device.copy_(host, non_blocking=True)
        keep += [host, device]
        return device

    def _transmit(self, group: list[torch.Tensor], deadline: float, keep: list[torch.Tensor], closing: bool) -> None:
        if self._loopback:
            ready = torch.cuda.Event()
            ready.record(self._send.stream)
            with self._queue_changed:
                if len(self._queued) >= MAX_LOOPBACK_QUEUE:
                    raise PeerError(self.peer, f"loopback queue full: {MAX_LOOPBACK_QUEUE} messages not received")
                self._queued.append(_Queued(group, ready, keep))
                self._queue_changed.notify_all()
            return
        comm = self._send.comm
        assert comm is not None
        buffers = [byte_buffer(t) for t in group]
        self._call(self._send, lambda: comm.post(buffers, [], self._peer_rank, self._stream_id(self._send)))
        if not self._wait(self._send, comm.ready, deadline, stop=_never if closing else None):
            raise self._break("NCCL did not enqueue a send in time", self._send)

    # -- receiving ----------------------------------------------------------------------------------

    def recv(self, specs: SpecsFromHeader, timeout: float) -> tuple[bytes, list[torch.Tensor]]:
        """Receive one frame; `timeout` (may be math.inf) bounds the wait for it to start."""
        with self._recv.lock:
            self._usable(self._recv)
            if not self._await_envelope(timeout):
                raise ChannelTimeout(self.peer, f"no frame within {timeout:.1f}s")
            try:
                first = parse_first_message(self._envelope_host.numpy().tobytes(), self.options.max_message_bytes)
            except MalformedEnvelope as exc:
                raise self._break(f"sent a malformed frame ({exc})", self._recv) from None
            envelope = first.envelope
            if envelope.kind != EnvelopeKind.FRAME:
                self._broken = self._broken or "the peer closed the channel"
                raise PeerError(self.peer, "closed the channel")
            deadline = time.monotonic() + self.options.io_timeout
            header = first.header
            if header is None:
                header = self._receive_header(envelope.header_length, deadline)
            try:
                tensor_specs = list(specs(header))
                expected = [math.prod(s.shape) * s.dtype.itemsize for s in tensor_specs]
                if expected != envelope.sizes:
                    sizes = envelope.sizes
                    raise PayloadMismatch(f"header announces tensors of {expected} bytes, envelope says {sizes}")
            except Exception:
                self._drain(envelope.sizes, deadline)  # the next frame must start in step
                raise
            with torch.cuda.stream(self._recv.stream):
                tensors = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in tensor_specs]
            targets = [t.reshape(-1).view(torch.uint8) for t in tensors if t.numel()]
            if targets:
                self._receive(targets, deadline, "the rest of a frame")
            consumer = torch.cuda.current_stream(self.device)
            for tensor in tensors:
                # Allocated on the receive stream, used on the caller's: the allocator must not hand the
                # memory to the next receive before the caller's queued work is done with it.
                tensor.record_stream(consumer)
            return header, tensors

    def _await_envelope(self, timeout: float) -> bool:
        """Wait up to `timeout` for the next envelope to land in `_envelope_host`; False if none did."""
        deadline = time.monotonic() + timeout if math.isfinite(timeout) else math.inf
        if self._posted is None:
            if self._loopback and not self._wait_queued(deadline):
                return False
            self._posted = self._post_receive([self._envelope], copy_to=self._envelope_host)
        if self._loopback:  # the frame is there: what remains is a local copy
            deadline = time.monotonic() + self.options.io_timeout
        if not self._wait(self._recv, self._posted.query, deadline):
            if self._loopback:
                raise self._break("a loopback frame did not arrive in time", self._recv)
            return False  # still posted: the next recv goes on waiting for it
        self._posted = self._posted_from = None
        return True

    def _wait_queued(self, deadline: float) -> bool:
        with self._queue_changed:
            while not self._queued:
                if self._closed:
                    raise PeerError(self.peer, "channel is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue_changed.wait(min(left, 1.0))
        return True

    def _receive_header(self, length: int, deadline: float) -> bytes:
        with torch.cuda.stream(self._recv.stream):
            buffer = torch.empty(length, dtype=torch.uint8, device=self.device)
        host = _pinned(length)
        self._receive([buffer], deadline, "a frame's header", copy_to=host)
        return host.numpy().tobytes()

    def _drain(self, sizes: list[int], deadline: float) -> None:
        """Receive and drop the tensors of a rejected frame."""
        sizes = [size for size in sizes if size]
        if sizes:
            with torch.cuda.stream(self._recv.stream):
                scratch = torch.empty(max(sizes), dtype=torch.uint8, device=self.device)
            self._receive([scratch[:size] for size in sizes], deadline, "a rejected frame's tensors")

    def _receive(
        self, targets: list[torch.Tensor], deadline: float, what: str, copy_to: torch.Tensor | None = None
    ) -> None:
        if self._loopback and not self._wait_queued(deadline):
            raise self._break(f"{what} did not arrive within {self.options.io_timeout:.1f}s", self._recv)
        done = self._post_receive(targets, copy_to)
        if not self._wait(self._recv, done.query, deadline):
            raise self._break(f"{what} did not arrive within {self.options.io_timeout:.1f}s", self._recv)
        self._posted_from = None

    def _post_receive(self, targets: list[torch.Tensor], copy_to: torch.Tensor | None = None) -> torch.cuda.Event:
        """Post one group of receives on the receive stream (and a copy of the first target to the host)."""
        comm = self._recv.comm
        assert comm is not None
        stream = self._recv.stream
        # Targets are allocated on the receive stream, so nothing queued on the caller's stream (compute,
        # typically) can still be using them: the receive need not wait for that work, and does not.
        with torch.cuda.device(self.device):
            sends: list[DeviceBuffer] = []
            if self._loopback:
                with self._queue_changed:
                    queued = self._queued.popleft()
                    self._queue_changed.notify_all()
                if [t.numel() for t in queued.buffers] != [t.numel() for t in targets]:
                    raise self._break("loopback frame out of step with its receives (a bug)", self._recv)
                stream.wait_event(queued.ready)
                sends = [byte_buffer(t) for t in queued.buffers]
                self._posted_from = queued  # kept alive until the receive is done
            recvs = [byte_buffer(t) for t in targets]
            self._call(self._recv, lambda: comm.post(sends, recvs, self._peer_rank, self._stream_id(self._recv)))
            if not self._wait(self._recv, comm.ready, time.monotonic() + self.options.io_timeout):
                raise self._break("NCCL did not enqueue a receive in time", self._recv)
            if copy_to is not None:
                _stage_to_host(copy_to, targets[0], stream)
            done = torch.cuda.Event()
            done.record(stream)
        return done

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


def _never() -> bool:
    return False


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
