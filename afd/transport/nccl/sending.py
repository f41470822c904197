"""The sending direction of an NCCL channel (see channel.py): `send`, `flush` and posting a frame's groups.

On the wire a frame is its first message (first_message.py), then the header on its own if it did not
fit, then the tensors' bytes as one group of ncclSend/ncclRecv. Sender and receiver (receiving.py) post
the same groups in the same order. `send` posts and returns; up to `max_pending_frames` frames may be in
flight, each of which must be taken by the peer within `io_timeout`, or a later `send`/`flush` raises
PeerError. On a loopback `send` queues the frame for `recv` to post.

Streams and the host (checked for issue 9; what tests/gpu/test_nccl_channel.py asserts on a GPU):
- Every transfer runs on the channel's own send stream (`_Direction.stream`), never on the caller's.
  `_post_frame` makes that stream wait for the caller's current stream (`wait_stream`: an event recorded
  on the compute stream, waited for on the device), so the tensors are sent once the kernels that write
  them are done, and the host does not wait for those kernels. Nothing makes the compute stream wait
  for the send stream: compute goes on while the frame is in flight.
- The host waits only for NCCL to *enqueue* each group (`comm.ready`, ncclInProgress of a non-blocking
  communicator), not for the transfer; a frame's completion is an event (`_InFlight.done`) polled when a
  slot is needed (`max_pending_frames`) or in `flush`. There is no host synchronisation per frame.
- Tensor payloads go device to device: a flat uint8 view of each tensor (a copy only when it is strided
  or on another device). Only the envelope (ENVELOPE_BYTES, and a header too long for it) is written on
  the host, into a pinned buffer copied to the device with a non-blocking copy on the send stream.
- The payload tensors are kept referenced (`keep`) until their frame's event is done, so the caching
  allocator cannot reuse their memory while the send stream still reads it. The caller must not write
  them in place before that (the engine sends fresh tensors per microbatch and layer).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from afd.errors import PeerError
from afd.transport.envelope import EnvelopeKind, check_frame
from afd.transport.nccl import channel_base
from afd.transport.nccl.channel_base import NcclChannelBase, _InFlight, _never, _Queued, byte_buffer
from afd.transport.nccl.first_message import ENVELOPE_BYTES, HEADER_ROOM, pack_first_message

MAX_LOOPBACK_QUEUE = 1024
"""Loopback only: most messages `send` may queue before a `recv` takes them."""


class SendSide(NcclChannelBase):
    """What `send` and `flush` do; the state they use is NcclChannelBase's."""

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
        # Looked up on channel_base when called, so that one replacement there (the unit tests' CPU fabric)
        # reaches every pinned buffer of the channel.
        host = channel_base._pinned(size)
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
