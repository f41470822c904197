"""The receiving direction of an NCCL channel (see channel.py): `recv` and posting a frame's receives.

The receiver validates the header with the caller's `specs` before allocating anything and posts
receives straight into the result tensors, in the groups the sender (sending.py) posted. `recv` waits
`timeout` for the next frame (a timeout there leaves the channel intact, its receive still posted),
then `io_timeout` for the rest of the frame. On a loopback `recv` posts each message's ncclSend and
ncclRecv in one group (NCCL's self send/recv).

Streams and the host (checked for issue 9). Receives run on the channel's own receive stream, into
tensors allocated on that stream, so they never wait for the compute stream. The host waits twice per
frame, and both waits are the protocol's, on the thread that calls `recv` (the transport's receiver
thread, not the compute thread):
- for the envelope, which must be read on the host before anything is allocated (sizes, the header to
  validate): one 4 KiB copy to pinned memory;
- for the payload's event, which is what bounds a dead or stuck peer with `io_timeout` (on one host NCCL
  cannot tell that the peer process died) and keeps a reply from being handed to `combine` before it has
  landed. Returning before the payload landed, with an event for the consumer to wait on, would save
  one poll but turn a peer that dies mid-frame into a consumer stream blocked on the device forever,
  which no timeout could end.
A received tensor is used on the consumer's stream once `recv` returned, so no device-side wait is
needed for ordering. For the allocator, the tensor is marked as used by the receiving thread's current
stream here, and by the consumer's current stream when the transport's `combine` hands it over
(afd.transport.staging.to_device, with the transport's `device` set): the memory is not given to a
later receive before the consumer's queued work is done with it.
"""

from __future__ import annotations

import math
import time

import torch

from afd.errors import PeerError
from afd.transport.channel import ChannelTimeout, SpecsFromHeader
from afd.transport.envelope import EnvelopeKind, MalformedEnvelope
from afd.transport.nccl import channel_base
from afd.transport.nccl.channel_base import NcclChannelBase, byte_buffer
from afd.transport.nccl.first_message import parse_first_message
from afd.transport.nccl.library import DeviceBuffer
from afd.wire.frames import PayloadMismatch


def _stage_to_host(host: torch.Tensor, source: torch.Tensor, stream: torch.cuda.Stream) -> None:
    """Queue a copy of `source` (device) into `host` (pinned) on `stream`, after what is queued there."""
    with torch.cuda.stream(stream):
        host.copy_(source, non_blocking=True)


class ReceiveSide(NcclChannelBase):
    """What `recv` does; the state it uses is NcclChannelBase's."""

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
        host = channel_base._pinned(length)  # looked up when called: see SendSide._to_device
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
