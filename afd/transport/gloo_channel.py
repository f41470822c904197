"""A gloo point-to-point channel: one torch.distributed process group of world size 2 per attention/FFN pair.

Why a group per pair rather than `init_process_group` over the cluster: a global group fixes the world
size at start-up, and FFN nodes join and leave at run time. A `ProcessGroupGloo` built directly over a
`PrefixStore` needs only the two ends, so an FFN process holds one small group per attention node that
talks to it, and a new pair costs one TCP connection. The attention node hosts a `TCPStore`
(`GlooStoreServer`, one per attention node, shared by its pairs under distinct prefixes); the rendezvous
bytes carried by FfnNode.OpenChannel are that store's host, port, the pair's key prefix and secret.

A TCPStore has no authentication: anyone who reaches its port can list, set and delete its keys, the
pair-rendezvous keys included. So the store listens on the attention node's host only (a socket bound
here and handed to the store, which would otherwise listen on every interface), and a formed pair is
authenticated before it carries a frame: each end sends an HMAC of the pair's prefix and its rank keyed
with a per-pair random secret, which travels only in the rendezvous bytes over the authenticated
control plane (FfnNode.OpenChannel). An end that cannot prove it holds the secret - a third party that
took a rank's slot in the store - is refused, and that pair never forms.

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

import atexit
import collections
import contextlib
import datetime
import hashlib
import hmac
import math
import os
import queue
import re
import secrets
import socket
import threading
import uuid
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroupGloo

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
from afd.transport.rendezvous import (
    ChannelListener,
    RendezvousError,
    local_address_towards,
    pack_rendezvous,
    unpack_rendezvous,
)
from afd.wire.frames import PayloadMismatch

INLINE_FRAME_BYTES = 128 * 1024
"""Frames up to this size (envelope fields, header and tensors) travel as one message; also the most an
envelope may hold, so a header is at most this size minus the fixed fields."""
ENVELOPES_AHEAD = 8
"""Envelope receives kept posted ahead of the reader (see GlooChannel._fill_posted)."""
INLINE = 1
"""Envelope flag: the tensors' bytes follow the header inside the envelope message."""
EXIT_GRACE_S = 2.0
"""At interpreter exit, how long open channels get to finish the gloo waits of their threads (see _WAITS)."""
_ENVELOPE_TAG = 0
_DATA_TAG = 1
"""Envelopes and tensor payloads travel on separate gloo tags (slots), so the receiver can post the next
envelope's receive ahead of time without it matching the current frame's tensors."""
_PREFIX = re.compile(r"afd-gloo/[0-9a-f]{32}/")
_AUTH_TAG = 2
"""The pair's authentication messages travel on a tag of their own, before any envelope or payload."""
PAIR_SECRET_BYTES = 32
"""Random bytes of a pair's secret (sent hex-encoded in the rendezvous)."""
_SECRET = re.compile(f"[0-9a-f]{{{2 * PAIR_SECRET_BYTES}}}")
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*")
_FOREVER = datetime.timedelta(days=365)
"""gloo has no "no timeout"; a year is as good as forever and still far from overflowing its clock."""


class _PairGroup(Protocol):
    """What this module uses of a ProcessGroupGloo (torch's stubs do not declare its send/recv)."""

    def send(self, tensors: list[torch.Tensor], dst_rank: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], src_rank: int, tag: int) -> dist.Work: ...


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
        # TCPStore(host, ...) as a server listens on every interface whatever `host` says; a socket
        # bound to `host` and handed over (master_listen_fd, libuv backend) is the one way to scope it
        listening = _listen(host, port)
        bound_port = int(listening.getsockname()[1])
        fd = listening.detach()  # the store owns the descriptor from here on
        try:
            self._store: dist.TCPStore | None = dist.TCPStore(
                host,
                bound_port,
                None,
                True,
                datetime.timedelta(seconds=60),
                wait_for_workers=False,
                master_listen_fd=fd,
                use_libuv=True,
            )
        except BaseException:
            os.close(fd)
            raise
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


def _listen(host: str, port: int) -> socket.socket:
    """A TCP socket listening on `host`:`port` only (port 0: an ephemeral one)."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listening = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"cannot resolve the gloo store address {host}:{port}: {exc}") from None
    try:
        listening.bind(address)
        listening.listen(128)
    except OSError as exc:
        listening.close()
        raise ConfigError(f"cannot listen for the gloo store on {host}:{port}: {exc}") from None
    return listening


class GlooListener(ChannelListener):
    """Rank 0 of one pair (the attention side)."""

    def __init__(self, peer: str, server: GlooStoreServer, options: GlooOptions) -> None:
        self.peer = peer
        self.options = options
        self._server = server
        self._prefix = f"afd-gloo/{uuid.uuid4().hex}/"
        self._secret = secrets.token_hex(PAIR_SECRET_BYTES)

    @property
    def rendezvous(self) -> bytes:
        fields: dict[str, str | int] = {"host": self._server.host, "port": self._server.port}
        fields |= {"prefix": self._prefix, "secret": self._secret}
        return pack_rendezvous("gloo", fields)

    def accept(self, timeout: float) -> GlooChannel:
        group = _form_group(self.peer, self._server.store, self._prefix, 0, self._server.host, timeout)
        _authenticate_pair(self.peer, group, 0, self._secret, self._prefix, timeout)
        return GlooChannel(self.peer, group, 0, self.options)

    def close(self) -> None:
        """Nothing to release: the store belongs to the server and the keys are tiny."""


def check_gloo_rendezvous(rendezvous: bytes) -> dict[str, Any]:
    """The fields of gloo rendezvous bytes; raises RendezvousError naming what is wrong."""
    fields = unpack_rendezvous(rendezvous, "gloo", {"host": str, "port": int, "prefix": str, "secret": str})
    host, port, prefix = fields["host"], fields["port"], fields["prefix"]
    if not 0 < port < 65536 or not _PREFIX.fullmatch(prefix) or not 0 < len(host) <= 255:
        raise RendezvousError(f"gloo rendezvous names an invalid store {host!r}:{port} / {prefix!r}")
    if not _SECRET.fullmatch(fields["secret"]):
        raise RendezvousError(f"gloo rendezvous secret must be {2 * PAIR_SECRET_BYTES} lower-case hex digits")
    return fields


def connect_gloo(rendezvous: bytes, peer: str, options: GlooOptions | None = None) -> GlooChannel:
    """The FFN side (rank 1) of a pair: join the store named by `rendezvous` and form the group with `peer`."""
    options = options or GlooOptions()
    fields = check_gloo_rendezvous(rendezvous)
    host, port = fields["host"], fields["port"]
    local = local_address_towards(host, port)
    try:
        store = dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=options.connect_timeout))
    except (RuntimeError, OSError) as exc:
        raise PeerError(peer, f"cannot reach its gloo store at {host}:{port}: {_first_line(exc)}") from None
    group = _form_group(peer, store, fields["prefix"], 1, local, options.connect_timeout)
    _authenticate_pair(peer, group, 1, fields["secret"], fields["prefix"], options.connect_timeout)
    return GlooChannel(peer, group, 1, options)


def _form_group(peer: str, store: dist.Store, prefix: str, rank: int, hostname: str, timeout: float) -> _PairGroup:
    gloo_options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # not in torch's stubs
    gloo_options._devices = [ProcessGroupGloo.create_device(hostname=hostname)]
    gloo_options._timeout = datetime.timedelta(seconds=timeout)
    try:
        return cast(_PairGroup, ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, 2, gloo_options))
    except RuntimeError as exc:
        raise PeerError(peer, f"did not form a gloo pair within {timeout:.1f}s: {_first_line(exc)}") from None


def _pair_proof(secret: str, prefix: str, rank: int) -> bytes:
    """What `rank` of the pair under `prefix` sends to prove it holds the pair's secret."""
    return hmac.new(bytes.fromhex(secret), f"afd-gloo-pair {prefix} rank {rank}".encode(), hashlib.sha256).digest()


def _authenticate_pair(peer: str, group: _PairGroup, rank: int, secret: str, prefix: str, timeout: float) -> None:
    """Exchange proofs with the other end of a freshly formed pair; raises PeerError (and the group is
    dropped) unless the other end proves it holds the same secret.

    The proofs differ per rank and per prefix (fresh for every pair), so one seen on the wire is of no
    use for another pair or for the other rank.
    """
    mine = torch.frombuffer(bytearray(_pair_proof(secret, prefix, rank)), dtype=torch.uint8)
    theirs = torch.zeros(len(mine), dtype=torch.uint8)
    wait = datetime.timedelta(seconds=timeout)
    try:
        with _WAITS.inside():
            received = group.recv([theirs], 1 - rank, _AUTH_TAG)
            sent = group.send([mine], 1 - rank, _AUTH_TAG)
            received.wait(wait)
            if not hmac.compare_digest(theirs.numpy().tobytes(), _pair_proof(secret, prefix, 1 - rank)):
                raise PeerError(peer, "gloo pair refused: the other end does not hold the pair's secret")
            sent.wait(wait)
    except PeerError:
        raise
    except RuntimeError as exc:  # gloo's errors (timeouts, a closed connection, a size mismatch)
        raise PeerError(peer, f"gloo pair not authenticated within {timeout:.1f}s: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    """gloo's message without its source location and advice: "Connection closed by peer [127.0.0.1]:4321"."""
    lines = str(exc).strip().splitlines()
    text = _SOURCE_LOCATION.sub("", lines[0]) if lines else type(exc).__name__
    return text.split(". This is typically", 1)[0][:300]


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view (copy only if not contiguous/CPU) of `tensor`'s raw bytes."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


class _PendingWait:
    """A posted receive being waited on by a channel's waiter thread."""

    def __init__(self, work: dist.Work, buffer: torch.Tensor) -> None:
        self.work: dist.Work | None = work
        self.buffer = buffer
        """Where the message lands."""
        self.handed = False
        """Given to the waiter thread (then only its `done` event may be waited on)."""
        self.done = threading.Event()
        self.error: str | None = None


class _GlooWaits:
    """Counts threads inside a gloo wait, so that interpreter exit can let them come back first.

    Why: CPython ends a daemon thread that re-takes the GIL after finalization began with a forced
    unwind, which torch's C++ frames (a returning gloo wait, a Work freed without the GIL) turn into
    std::terminate — an abort at exit, typically when the peer's exit drops the connection under a wait
    at that very moment. So threads free their Work objects as soon as a wait ends, and
    `_quiesce_at_exit` closes every channel (the CLOSE/ACK exchange ends the peer's and our waits) and
    gives the waits EXIT_GRACE_S.
    """

    def __init__(self) -> None:
        self._inside = 0
        self._changed = threading.Condition()

    def add(self) -> None:
        """A wait is about to happen (counted from when it is handed to a thread, not when it starts)."""
        with self._changed:
            self._inside += 1

    def done(self) -> None:
        with self._changed:
            self._inside -= 1
            self._changed.notify_all()

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        self.add()
        try:
            yield
        finally:
            self.done()

    def wait_quiet(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._inside == 0, timeout)


_WAITS = _GlooWaits()
_LIVE: weakref.WeakSet[GlooChannel] = weakref.WeakSet()


_RETIRED: collections.deque[tuple[_PairGroup | None, list[tuple[dist.Work, torch.Tensor]]]] = collections.deque(
    maxlen=256
)
"""Groups and unawaited CLOSE sends of closed channels. Kept here, not on the channel, because a channel
may be freed by whichever daemon thread drops it last — at exit, freeing a Work there aborts the process
(see _GlooWaits); from here they are freed by a later close or by the main thread at exit."""


def _retire(group: _PairGroup | None, control: list[tuple[dist.Work, torch.Tensor]]) -> None:
    _RETIRED.append((group, control))


@atexit.register
def _quiesce_at_exit() -> None:
    for channel in list(_LIVE):
        channel.close()
    _WAITS.wait_quiet(EXIT_GRACE_S)


def _wait_loop(waits: queue.SimpleQueue[_PendingWait | None]) -> None:
    while (pending := waits.get()) is not None:
        try:
            assert pending.work is not None
            pending.work.wait(_FOREVER)
        except RuntimeError as exc:
            pending.error = _first_line(exc)
        finally:
            pending.work = None  # freed here, not by a frame torn down during interpreter exit
            _WAITS.done()  # counted when it was queued (see GlooChannel._wait_envelope)
        pending.done.set()


class _Sends:
    """A channel's posted sends and the thread that waits on them, so their buffers are released once taken.

    (A gloo send is only marked complete by waiting on it; nothing else would free its tensors.) The
    thread holds this object, never the channel: a thread that ends holding the last reference to
    tensors frees them, and freeing a tensor during interpreter exit aborts the process (_GlooWaits).
    """

    def __init__(self, peer: str, io_timeout: float, max_pending: int) -> None:
        self.io_timeout = io_timeout
        self.max_pending = max_pending
        self.queue: queue.SimpleQueue[tuple[list[dist.Work], list[torch.Tensor]] | None] = queue.SimpleQueue()
        self.changed = threading.Condition()
        self.outstanding = 0
        """Frames posted and not yet taken by the peer."""
        self.error: str | None = None
        threading.Thread(target=self._wait_loop, name=f"gloo-send-{peer}", daemon=True).start()

    def reserve(self) -> bool:
        """Claim a slot for one more frame; False if none frees up within io_timeout."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.outstanding < self.max_pending, self.io_timeout):
                return False
            self.outstanding += 1
            return True

    def release(self) -> None:
        with self.changed:
            self.outstanding -= 1
            self.changed.notify_all()

    def drained(self) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.outstanding == 0, self.io_timeout)

    def _wait_loop(self) -> None:
        io = datetime.timedelta(seconds=self.io_timeout)
        while (item := self.queue.get()) is not None:
            try:
                for work in item[0]:
                    work.wait(io)
            except RuntimeError as exc:
                self.error = self.error or f"gloo send failed or timed out: {_first_line(exc)}"
            finally:
                work = item = None  # type: ignore[assignment]  # freed here, not at interpreter exit
                _WAITS.done()  # counted when it was queued (see post)
            self.release()

    def post(self, item: tuple[list[dist.Work], list[torch.Tensor]]) -> None:
        _WAITS.add()
        self.queue.put(item)


class GlooChannel(Channel):
    """One end of a gloo pair. `send` and `recv` may be called from different threads."""

    def __init__(self, peer: str, group: _PairGroup, rank: int, options: GlooOptions) -> None:
        super().__init__(peer)
        self.options = options
        self._group: _PairGroup | None = group
        self._peer_rank = 1 - rank
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._envelope_buffers = [
            torch.empty(INLINE_FRAME_BYTES, dtype=torch.uint8) for _ in range(ENVELOPES_AHEAD + 1)
        ]
        """Where frames' first messages land, in rotation: ENVELOPES_AHEAD posted, one being read."""
        self._next_buffer = 0
        self._sends = _Sends(peer, options.io_timeout, options.max_pending_frames)
        weakref.finalize(self, self._sends.queue.put, None)  # a channel dropped unclosed still ends its thread
        self._posted_envelopes: collections.deque[_PendingWait] = collections.deque()
        """Receives posted ahead for the next envelopes, oldest first (guarded by the receive lock)."""
        self._waits: queue.SimpleQueue[_PendingWait | None] | None = None
        self._control: list[tuple[dist.Work, torch.Tensor]] = []
        """CLOSE / CLOSE_ACK sends: posted, kept alive, never waited for (nobody may be receiving)."""
        self._broken: str | None = None
        self._closed = False
        _LIVE.add(self)

    # -- sending ------------------------------------------------------------------------------------

    def send(self, header: bytes, tensors: Sequence[torch.Tensor]) -> None:
        check_frame(header, len(tensors), "gloo")
        payload = [_as_bytes(t) for t in tensors]
        sizes = [p.numel() for p in payload]
        inline = FIELDS.size + len(header) + sum(sizes) <= INLINE_FRAME_BYTES
        envelope = self._envelope(header, sizes, payload if inline else [])
        messages = [envelope] if inline else [envelope, *(p for p in payload if p.numel())]
        if not self._sends.reserve():
            raise self._fail(f"peer took no frame for {self.options.io_timeout:.1f}s")
        try:
            with self._send_lock:
                group = self._usable()
                try:
                    works = [group.send([messages[0]], self._peer_rank, _ENVELOPE_TAG)]
                    works += [group.send([m], self._peer_rank, _DATA_TAG) for m in messages[1:]]
                except RuntimeError as exc:
                    raise self._fail(f"gloo send failed: {_first_line(exc)}") from None
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

    def _fill_posted(self, group: _PairGroup) -> None:
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
                raise self._fail(f"connection lost ({_first_line(exc)})") from None
            self._posted_envelopes.append(_PendingWait(work, buffer))

    def _retire_posted(self) -> None:
        """Hand posted receives nobody waits on to _RETIRED (see there); receive lock held."""
        idle = [(p.work, p.buffer) for p in self._posted_envelopes if not p.handed and p.work is not None]
        self._posted_envelopes.clear()
        if idle:
            _retire(None, idle)  # type: ignore[arg-type]

    def _wait_envelope(self, group: _PairGroup, timeout: float) -> torch.Tensor:
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
                self._wait_works([pending.work], _FOREVER, "")
            finally:
                pending.work = None
                self._posted_envelopes.popleft()
            return pending.buffer
        if not pending.handed:
            pending.handed = True
            _WAITS.add()
            self._waiter().put(pending)
        if not pending.done.wait(None if math.isinf(timeout) else max(timeout, 0.0)):
            raise ChannelTimeout(self.peer, f"no frame within {timeout:.1f}s")
        self._posted_envelopes.popleft()
        if pending.error is not None:
            raise self._fail(f"connection lost ({pending.error})")
        return pending.buffer

    def _waiter(self) -> queue.SimpleQueue[_PendingWait | None]:
        if self._waits is None:
            self._waits = queue.SimpleQueue()
            threading.Thread(target=_wait_loop, args=(self._waits,), name=f"gloo-wait-{self.peer}", daemon=True).start()
        return self._waits

    def _drain(self, group: _PairGroup, sizes: list[int]) -> None:
        """Receive and drop the tensors of a rejected frame, so the next frame starts in step."""
        scratch = [torch.empty(size, dtype=torch.uint8) for size in sizes if size]
        self._wait_recv(group, scratch, self._io_wait(), "rejected frame's payload cut short")

    def _io_wait(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.options.io_timeout)

    def _wait_recv(self, group: _PairGroup, targets: list[torch.Tensor], wait: datetime.timedelta, what: str) -> None:
        # Post every receive before waiting on any, so gloo fills them back to back.
        try:
            works = [group.recv([t], self._peer_rank, _DATA_TAG) for t in targets]
        except RuntimeError as exc:
            raise self._fail(f"connection lost ({_first_line(exc)})") from None
        self._wait_works(works, wait, what)

    def _wait_works(self, works: list[dist.Work], wait: datetime.timedelta, what: str) -> None:
        try:
            with _WAITS.inside():
                for work in works:
                    work.wait(wait)
        except RuntimeError as exc:
            text = _first_line(exc)
            reason = what if "Timed out" in text else f"connection lost ({text})"
            raise self._fail(reason) from None

    # -- lifecycle ----------------------------------------------------------------------------------

    def _usable(self) -> _PairGroup:
        if self._closed or self._group is None:
            raise PeerError(self.peer, "channel is closed")
        self._broken = self._broken or self._sends.error
        if self._broken is not None:
            raise PeerError(self.peer, f"channel is broken: {self._broken}")
        return self._group

    def _fail(self, reason: str) -> PeerError:
        self._broken = self._broken or reason
        return PeerError(self.peer, reason)

    def _post_control(self, group: _PairGroup, kind: int) -> None:
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
            _retire(self._group, self._control)
            self._group, self._control = None, []
