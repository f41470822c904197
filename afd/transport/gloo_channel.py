"""A gloo point-to-point channel: one torch.distributed process group of world size 2 per attention/FFN pair.

How the two ends meet - the attention node's pair store, the rendezvous bytes and the per-pair secret
proof - is afd/transport/gloo_pairing.py; the threads that wait on gloo work are afd/transport/gloo_waits.py.
This module holds the channel and its two ends: `GlooStoreServer.listener` (rank 0, the attention side)
and `connect_gloo` (rank 1, the FFN side).

On the wire a frame starts with an *envelope* message: the envelope fields of afd/transport/envelope.py
(header length, the byte size of every tensor that follows, flag INLINE), then the header. A small
frame (up to INLINE_FRAME_BYTES, e.g. one decode microbatch of a small
model, or the 64 KiB latency probe) carries its tensors inside the envelope too, so it costs one gloo
message — each extra message costs a round of gloo's receive-ready handshake, about 0.1 ms here. A large
frame sends each tensor's raw bytes as its own message (bfloat16 travels as uint8, gloo only moves bytes),
received straight into the destination tensor. The receiver always posts an INLINE_FRAME_BYTES buffer
for the envelope; gloo accepts a shorter message into it. Sizes in the envelope let a receiver drain a
frame whose header it rejects, so a bad frame costs that frame, not the channel.

Gloo's own behaviour shapes the rest. A send completes only once the peer posts the matching receive,
so `send` posts and returns (bounded by `max_pending_frames`) and a failure surfaces on a later call. A
timed-out gloo wait tears the pair down, so waiting for the next frame with a finite timeout goes through
a waiter thread (see `_wait_envelope`) and a timeout there leaves the channel intact; a timeout in the
middle of a frame does break it (PeerError). A closed peer is seen as a failed receive, which is how a
blocked receiver learns of `close`: `close` tells the peer, and when the peer drops its end the
connection closes under any receive still waiting here.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import math
import queue
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from afd.errors import ConfigError, PeerError
from afd.transport.channel import Channel, ChannelTimeout, SpecsFromHeader
from afd.transport.envelope import (
    FIELDS,
    EnvelopeKind,
    MalformedEnvelope,
    check_frame,
    pack_envelope,
    parse_envelope,
)
from afd.transport.gloo_pairing import (
    authenticate_pair,
    check_gloo_rendezvous,
    form_group,
    new_pair_keys,
    open_store,
)
from afd.transport.gloo_waits import (
    FOREVER,
    LIVE,
    WAITS,
    PairGroup,
    PendingWait,
    Sends,
    first_line,
    retire,
    wait_loop,
)
from afd.transport.rendezvous import ChannelListener, local_address_towards, pack_rendezvous
from afd.transport.staging import HostStaging, stage_once
from afd.wire.frames import PayloadMismatch

__all__ = [
    "ENVELOPES_AHEAD",
    "INLINE",
    "INLINE_FRAME_BYTES",
    "GlooChannel",
    "GlooListener",
    "GlooOptions",
    "GlooStoreServer",
    "check_gloo_rendezvous",
    "connect_gloo",
]

INLINE_FRAME_BYTES = 128 * 1024
"""Frames up to this size (envelope fields, header and tensors) travel as one message; also the most an
envelope may hold, so a header is at most this size minus the fixed fields."""
ENVELOPES_AHEAD = 8
"""Envelope receives kept posted ahead of the reader (see GlooChannel._fill_posted)."""
INLINE = 1
"""Envelope flag: the tensors' bytes follow the header inside the envelope message."""
_ENVELOPE_TAG = 0
_DATA_TAG = 1
"""Envelopes and tensor payloads travel on separate gloo tags (slots), so the receiver can post the next
envelope's receive ahead of time without it matching the current frame's tensors."""


@dataclass(frozen=True, slots=True)
class GlooOptions:
    """Timeouts and bounds of a gloo channel."""

    connect_timeout: float = 30.0
    """Seconds each side waits for the other while the pair's process group forms."""
    io_timeout: float = 60.0
    """Seconds one transfer may take (a posted send being taken, the rest of a frame after its envelope)."""
    max_pending_frames: int = 16
    """Frames whose sends may be posted but not yet taken by the peer; `send` waits beyond this."""
    max_message_bytes: int = 1 << 30
    """Largest tensor an envelope may announce; a bigger one breaks the channel rather than allocating."""

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0 or self.io_timeout <= 0:
            raise ConfigError("GlooOptions timeouts must be > 0")
        if self.max_pending_frames < 1 or self.max_message_bytes < 1:
            raise ConfigError("GlooOptions.max_pending_frames and max_message_bytes must be >= 1")


class GlooStoreServer:
    """The attention node's TCPStore where its gloo pairs meet; one per attention node."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None) -> None:
        """`host`: address to bind (and to advertise unless `advertise_host` is given); port 0 = ephemeral."""
        self.host = advertise_host or host
        self._store: dist.TCPStore | None = open_store(host, port)
        self.port = int(self._store.port)

    @property
    def store(self) -> dist.TCPStore:
        if self._store is None:
            raise ConfigError("GlooStoreServer is closed")
        return self._store

    def listener(self, peer: str, options: GlooOptions | None = None) -> GlooListener:
        """A listener for FFN node `peer` under a fresh key prefix."""
        return GlooListener(peer, self, options or GlooOptions())

    def close(self) -> None:
        self._store = None


class GlooListener(ChannelListener):
    """Rank 0 of one pair (the attention side)."""

    def __init__(self, peer: str, server: GlooStoreServer, options: GlooOptions) -> None:
        self.peer = peer
        self.options = options
        self._server = server
        self._prefix, self._secret = new_pair_keys()

    @property
    def rendezvous(self) -> bytes:
        fields: dict[str, str | int] = {"host": self._server.host, "port": self._server.port}
        fields |= {"prefix": self._prefix, "secret": self._secret}
        return pack_rendezvous("gloo", fields)

    def accept(self, timeout: float) -> GlooChannel:
        group = form_group(self.peer, self._server.store, self._prefix, 0, self._server.host, timeout)
        authenticate_pair(self.peer, group, 0, self._secret, self._prefix, timeout)
        return GlooChannel(self.peer, group, 0, self.options)

    def close(self) -> None:
        """Nothing to release: the store belongs to the server and the keys are tiny."""


def connect_gloo(rendezvous: bytes, peer: str, options: GlooOptions | None = None) -> GlooChannel:
    """The FFN side (rank 1) of a pair: join the store named by `rendezvous` and form the group with `peer`."""
    options = options or GlooOptions()
    fields = check_gloo_rendezvous(rendezvous)
    host, port = fields["host"], fields["port"]
    local = local_address_towards(host, port)
    try:
        store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=options.connect_timeout))
    except (RuntimeError, OSError) as exc:
        raise PeerError(peer, f"cannot reach its gloo store at {host}:{port}: {first_line(exc)}") from None
    group = form_group(peer, store, fields["prefix"], 1, local, options.connect_timeout)
    authenticate_pair(peer, group, 1, fields["secret"], fields["prefix"], options.connect_timeout)
    return GlooChannel(peer, group, 1, options)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view (copy only if not contiguous) of a CPU tensor's raw bytes (device ones are staged first)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


class GlooChannel(Channel):
    """One end of a gloo pair. `send` and `recv` may be called from different threads."""

    def __init__(self, peer: str, group: PairGroup, rank: int, options: GlooOptions) -> None:
        super().__init__(peer)
        self.options = options
        self._group: PairGroup | None = group
        self._peer_rank = 1 - rank
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._envelope_buffers = [
            torch.empty(INLINE_FRAME_BYTES, dtype=torch.uint8) for _ in range(ENVELOPES_AHEAD + 1)
        ]
        """Where frames' first messages land, in rotation: ENVELOPES_AHEAD posted, one being read."""
        self._next_buffer = 0
        self._staging = HostStaging()
        """Pinned host buffer the tensors of small (inline) frames of an accelerator node are staged in."""
        self._sends = Sends(peer, options.io_timeout, options.max_pending_frames)
        weakref.finalize(self, self._sends.queue.put, None)  # a channel dropped unclosed still ends its thread
        self._posted_envelopes: collections.deque[PendingWait] = collections.deque()
        """Receives posted ahead for the next envelopes, oldest first (guarded by the receive lock)."""
        self._waits: queue.SimpleQueue[PendingWait | None] | None = None
        self._control: list[tuple[dist.Work, torch.Tensor]] = []
        """CLOSE / CLOSE_ACK sends: posted, kept alive, never waited for (nobody may be receiving)."""
        self._broken: str | None = None
        self._closed = False
        LIVE.add(self)

    # -- sending ------------------------------------------------------------------------------------

    def send(self, header: bytes, tensors: Sequence[torch.Tensor]) -> None:
        check_frame(header, len(tensors), "gloo")
        sizes = [t.numel() * t.element_size() for t in tensors]
        inline = FIELDS.size + len(header) + sum(sizes) <= INLINE_FRAME_BYTES
        if inline:
            # Device tensors go through the reused pinned staging buffer: copied into the envelope right here.
            with self._staging.host_tensors(tensors) as host:
                envelope = self._envelope(header, sizes, [_as_bytes(t) for t in host])
            messages = [envelope]
        else:
            # Posted sends read the payload after `send` returns, so it is staged in buffers of its own
            # (torch's caching pinned allocator), kept alive by the posted sends until the peer takes them.
            payload = [_as_bytes(t) for t in stage_once(tensors)]
            envelope = self._envelope(header, sizes, [])
            messages = [envelope, *(p for p in payload if p.numel())]
        if not self._sends.reserve():
            raise self._fail(f"peer took no frame for {self.options.io_timeout:.1f}s")
        try:
            with self._send_lock:
                group = self._usable()
                try:
                    works = [group.send([messages[0]], self._peer_rank, _ENVELOPE_TAG)]
                    works += [group.send([m], self._peer_rank, _DATA_TAG) for m in messages[1:]]
                except RuntimeError as exc:
                    raise self._fail(f"gloo send failed: {first_line(exc)}") from None
                self._sends.post((works, messages))
        except BaseException:
            self._sends.release()
            raise

    @staticmethod
    def _envelope(
        header: bytes, sizes: list[int], inline: list[torch.Tensor], kind: int = EnvelopeKind.FRAME
    ) -> torch.Tensor:
        """The first message of a frame: envelope fields, header, then the tensors' bytes if `inline`."""
        total = FIELDS.size + len(header) + sum(t.numel() for t in inline)
        envelope = torch.empty(total, dtype=torch.uint8)
        fields = pack_envelope(kind, len(header), sizes, INLINE if inline else 0)
        envelope[: FIELDS.size] = torch.frombuffer(bytearray(fields), dtype=torch.uint8)
        offset = FIELDS.size
        if header:
            envelope[offset : offset + len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        offset += len(header)
        for part in inline:
            envelope[offset : offset + part.numel()] = part
            offset += part.numel()
        return envelope

    def flush(self) -> None:
        """Wait until the peer has taken every frame sent so far; raises PeerError if it does not in time."""
        if not self._sends.drained():
            raise self._fail(f"peer took no frame for {self.options.io_timeout:.1f}s")
        self._usable()

    # -- receiving ----------------------------------------------------------------------------------

    def recv(self, specs: SpecsFromHeader, timeout: float) -> tuple[bytes, list[torch.Tensor]]:
        """`timeout` may be math.inf: wait until a frame arrives, the peer goes away or either side closes."""
        with self._recv_lock:
            try:
                return self._recv(specs, timeout)
            finally:
                if self._closed:
                    self._retire_posted()

    def _recv(self, specs: SpecsFromHeader, timeout: float) -> tuple[bytes, list[torch.Tensor]]:
        group = self._usable()
        envelope = self._wait_envelope(group, timeout)
        try:
            kind, header_len, sizes, flags = parse_envelope(
                envelope[: FIELDS.size].numpy().tobytes(), self.options.max_message_bytes
            )
        except MalformedEnvelope as exc:
            raise self._fail(f"sent a malformed envelope: {exc}") from None
        if kind == EnvelopeKind.FRAME and not self._closed:
            self._fill_posted(group)
        if kind == EnvelopeKind.CLOSE:
            self._broken = "the peer closed the channel"
            if not self._closed:
                self._post_control(group, EnvelopeKind.CLOSE_ACK)  # ends the closer's own pending receive
            raise PeerError(self.peer, "closed the channel")
        if kind == EnvelopeKind.CLOSE_ACK:
            self._broken = "closed"
            raise PeerError(self.peer, "channel is closed")
        inline = flags & INLINE
        if flags & ~INLINE:
            raise self._fail(f"sent an envelope with unknown flags {flags:#x}")
        if inline and FIELDS.size + header_len + sum(sizes) > INLINE_FRAME_BYTES:
            raise self._fail("announced an inline frame larger than an envelope")
        header = bytes(envelope[FIELDS.size : FIELDS.size + header_len].numpy())
        try:
            tensor_specs = list(specs(header))
            expected = [math.prod(s.shape) * s.dtype.itemsize for s in tensor_specs]
            if expected != sizes:
                raise PayloadMismatch(f"header announces tensors of {expected} bytes, envelope says {sizes}")
        except Exception:
            if not inline:
                self._drain(group, sizes)
            raise
        tensors = [torch.empty(s.shape, dtype=s.dtype) for s in tensor_specs]
        targets = [t.view(-1).view(torch.uint8) for t in tensors if t.numel()]
        if inline:
            offset = FIELDS.size + header_len
            for target in targets:
                target.copy_(envelope[offset : offset + target.numel()])
                offset += target.numel()
        else:
            self._wait_recv(group, targets, self._io_wait(), "frame payload cut short")
        return header, tensors

    def _fill_posted(self, group: PairGroup) -> None:
        """Keep ENVELOPES_AHEAD envelope receives posted.

        A gloo message goes out only once its receive is posted, and each receive-ready notice costs a
        trip through both sides' gloo loop threads (~0.1 ms here); receives posted ahead let a stream
        of small frames flow without that round trip per frame.
        """
        while len(self._posted_envelopes) < ENVELOPES_AHEAD:
            buffer = self._envelope_buffers[self._next_buffer]
            self._next_buffer = (self._next_buffer + 1) % len(self._envelope_buffers)
            try:
                work = group.recv([buffer], self._peer_rank, _ENVELOPE_TAG)
            except RuntimeError as exc:
                raise self._fail(f"connection lost ({first_line(exc)})") from None
            self._posted_envelopes.append(PendingWait(work, buffer))

    def _retire_posted(self) -> None:
        """Hand posted receives nobody waits on to gloo_waits.retire (see there); receive lock held."""
        idle = [(p.work, p.buffer) for p in self._posted_envelopes if not p.handed and p.work is not None]
        self._posted_envelopes.clear()
        if idle:
            retire(None, idle)  # type: ignore[arg-type]

    def _wait_envelope(self, group: PairGroup, timeout: float) -> torch.Tensor:
        """Wait for the next frame's envelope and return the buffer it is in; a timeout leaves the channel intact.

        A timed-out gloo wait tears the pair down, so a finite wait is never given to gloo: the posted
        receive is handed to a waiter thread that waits without limit, and this call waits on the
        waiter's event. On timeout the posted receive stays pending for the next call; polling loops
        (`recv(specs, 1.0)` until shutdown) cost one thread hop per frame, `math.inf` none.
        """
        self._fill_posted(group)
        pending = self._posted_envelopes[0]
        if not pending.handed and math.isinf(timeout):
            assert pending.work is not None
            try:
                self._wait_works([pending.work], FOREVER, "")
            finally:
                pending.work = None
                self._posted_envelopes.popleft()
            return pending.buffer
        if not pending.handed:
            pending.handed = True
            WAITS.add()
            self._waiter().put(pending)
        if not pending.done.wait(None if math.isinf(timeout) else max(timeout, 0.0)):
            raise ChannelTimeout(self.peer, f"no frame within {timeout:.1f}s")
        self._posted_envelopes.popleft()
        if pending.error is not None:
            raise self._fail(f"connection lost ({pending.error})")
        return pending.buffer

    def _waiter(self) -> queue.SimpleQueue[PendingWait | None]:
        if self._waits is None:
            self._waits = queue.SimpleQueue()
            threading.Thread(target=wait_loop, args=(self._waits,), name=f"gloo-wait-{self.peer}", daemon=True).start()
        return self._waits

    def _drain(self, group: PairGroup, sizes: list[int]) -> None:
        """Receive and drop the tensors of a rejected frame, so the next frame starts in step."""
        scratch = [torch.empty(size, dtype=torch.uint8) for size in sizes if size]
        self._wait_recv(group, scratch, self._io_wait(), "rejected frame's payload cut short")

    def _io_wait(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.options.io_timeout)

    def _wait_recv(self, group: PairGroup, targets: list[torch.Tensor], wait: datetime.timedelta, what: str) -> None:
        # Post every receive before waiting on any, so gloo fills them back to back.
        try:
            works = [group.recv([t], self._peer_rank, _DATA_TAG) for t in targets]
        except RuntimeError as exc:
            raise self._fail(f"connection lost ({first_line(exc)})") from None
        self._wait_works(works, wait, what)

    def _wait_works(self, works: list[dist.Work], wait: datetime.timedelta, what: str) -> None:
        try:
            with WAITS.inside():
                for work in works:
                    work.wait(wait)
        except RuntimeError as exc:
            text = first_line(exc)
            reason = what if "Timed out" in text else f"connection lost ({text})"
            raise self._fail(reason) from None

    # -- lifecycle ----------------------------------------------------------------------------------

    def _usable(self) -> PairGroup:
        if self._closed or self._group is None:
            raise PeerError(self.peer, "channel is closed")
        self._broken = self._broken or self._sends.error
        if self._broken is not None:
            raise PeerError(self.peer, f"channel is broken: {self._broken}")
        return self._group

    def _fail(self, reason: str) -> PeerError:
        self._broken = self._broken or reason
        return PeerError(self.peer, reason)

    def _post_control(self, group: PairGroup, kind: int) -> None:
        envelope = self._envelope(b"", [], [], kind=kind)
        with contextlib.suppress(RuntimeError):  # the pair is already gone: nothing to tell
            self._control.append((group.send([envelope], self._peer_rank, _ENVELOPE_TAG), envelope))

    def close(self) -> None:
        """Post a CLOSE to the peer and drop the group; returns at once.

        A peer blocked in recv gets the CLOSE and answers CLOSE_ACK, which ends a receive of ours still
        waiting here; the CLOSE itself is never waited for, since the peer may not be receiving at all.
        Once every holder of the group is gone, its connection closes, which fails the peer's receives too.
        """
        with self._send_lock:
            if self._closed:
                return
            self._closed = True
            if self._broken is None and self._group is not None:
                self._post_control(self._group, EnvelopeKind.CLOSE)
            self._sends.queue.put(None)
            if self._waits is not None:
                self._waits.put(None)  # the waiter exits once its current wait ends
            if self._recv_lock.acquire(blocking=False):  # else the receive in progress retires them
                self._retire_posted()
                self._recv_lock.release()
            retire(self._group, self._control)
            self._group, self._control = None, []
