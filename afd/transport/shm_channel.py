"""A same-host channel: one shared-memory ring per direction, with a Unix socket per ring as the doorbell.

Why: on one machine every socket transport copies each byte through the kernel twice and wakes a
thread per segment; a ring in shared memory costs one copy in (sender) and one copy out (receiver),
and the two run concurrently on a large frame because the ring streams it in chunks. Rejected
alternatives: polling shared counters (burns a core on a 2-core box and needs memory fences Python
cannot issue), an eventfd/futex doorbell (Linux-only, and still needs a liveness signal), and handing
out tensors that view the ring (their lifetime would pin ring space for as long as the caller keeps
them).

A frame crosses its direction's ring (afd/transport/shm_ring.py: the byte stream, its doorbell and the
receive buffers) as the envelope (afd/transport/envelope.py: sizes of every tensor), the header, then
every tensor's raw bytes back to back, each tensor starting at a multiple of 8 bytes.

Set-up: the attention node creates both segments and a listening socket in the abstract namespace; the
FFN node attaches, connects and says so; the attention node then unlinks the segments at once. From that
moment nothing is left in /dev/shm to leak, whichever side dies, and the mappings stay valid until
both sides close.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import mmap
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import torch

from afd.errors import ConfigError, PeerError
from afd.transport.channel import Channel, ChannelTimeout, SpecsFromHeader
from afd.transport.envelope import FIELDS, EnvelopeKind, MalformedEnvelope, check_frame, pack_envelope, parse_envelope
from afd.transport.rendezvous import ChannelListener, RendezvousError, pack_rendezvous, unpack_rendezvous
from afd.transport.shm_ring import BufferPool, Doorbell, RingReader, RingWriter, WaitTimeout
from afd.transport.staging import HostStaging
from afd.wire.frames import PayloadMismatch

_ALIGN = 8
"""Tensors start at multiples of this within a frame's payload, so received views are aligned."""
SHM_DIR = "/dev/shm"
"""Where POSIX shared memory lives on Linux (the segments' names are files here until unlinked)."""
_NAME = re.compile(r"afd-[0-9a-f]{32}-(sock|a2f|f2a)")
_ROLE_A2F = b"A"
_ROLE_F2A = b"F"


@dataclass(frozen=True, slots=True)
class ShmOptions:
    """Sizes and timeouts of a shared-memory channel."""

    ring_bytes: int = 32 * 2**20
    """Bytes of each direction's ring; frames larger than this stream through it."""
    chunk_bytes: int = 1 * 2**20
    """Doorbell granularity within a large frame (the reader starts copying while the writer still writes)."""
    connect_timeout: float = 30.0
    """Seconds the attention side waits for the FFN node to attach."""
    io_timeout: float = 60.0
    """Seconds a writer waits for ring space, or a reader for the rest of a frame it has started."""
    max_frame_bytes: int = 1 << 31
    """Largest payload a prefix may announce; beyond it the stream is taken as corrupt."""
    pooled_bytes: int = 64 * 2**20
    """Receive buffers (of frames >= 1 MiB) kept for reuse once their tensors are freed; 0 disables."""

    def __post_init__(self) -> None:
        # chunk < ring is what guarantees a writer blocked on a full ring always has credit coming.
        if self.ring_bytes < 4096 or self.chunk_bytes < 1 or 2 * self.chunk_bytes > self.ring_bytes:
            raise ConfigError("ShmOptions needs ring_bytes >= 4096 and 1 <= chunk_bytes <= ring_bytes / 2")
        if self.connect_timeout <= 0 or self.io_timeout <= 0 or self.max_frame_bytes < 1:
            raise ConfigError("ShmOptions timeouts and max_frame_bytes must be > 0")
        if self.pooled_bytes < 0:
            raise ConfigError("ShmOptions.pooled_bytes must be >= 0")


def _abstract(name: str) -> str:
    """Linux abstract socket address: no file to create or clean up."""
    return "\0" + name


def _map(name: str, size: int) -> mmap.mmap:
    """Map segment `name` by its /dev/shm path.

    Not through SharedMemory: its mapping refuses to close while numpy views of it exist (and before
    Python 3.13 attaching also registers the segment for unlinking at exit, which is the creator's job).
    A bare mmap is unmapped when the last view of it is gone, whichever thread drops it.
    """
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    except FileNotFoundError:
        raise RendezvousError(f"shared-memory segment {name} not found: the peer is not on this host") from None
    try:
        if os.fstat(fd).st_size < size:
            raise RendezvousError(f"shared-memory segment {name} is smaller than its {size}-byte ring")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor (copied only when strided); device tensors are staged before this."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


_ZEROS = np.zeros(_ALIGN, dtype=np.uint8)


class ShmChannel(Channel):
    """One end of a shared-memory pair. `send` and `recv` may be called from different threads."""

    def __init__(
        self,
        peer: str,
        rings: tuple[mmap.mmap, mmap.mmap],
        sockets: tuple[socket.socket, socket.socket],
        options: ShmOptions,
    ) -> None:
        """`rings` and `sockets` are (outgoing ring, incoming ring) and their doorbells."""
        super().__init__(peer)
        self.options = options
        self._sockets = sockets
        out_ring = np.frombuffer(rings[0], dtype=np.uint8, count=options.ring_bytes)
        in_ring = np.frombuffer(rings[1], dtype=np.uint8, count=options.ring_bytes)
        self._writer: RingWriter | None = RingWriter(out_ring, Doorbell(sockets[0], peer), options.chunk_bytes)
        self._reader: RingReader | None = RingReader(in_ring, Doorbell(sockets[1], peer), options.chunk_bytes)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._buffers = BufferPool(options.pooled_bytes)
        self._staging = HostStaging()
        """Pinned host buffer device tensors are copied into before they are written to the ring."""
        self._broken: str | None = None
        self._closed = False

    def send(self, header: bytes, tensors: Sequence[torch.Tensor]) -> None:
        """Copies the frame into the ring: the caller may change the tensors as soon as this returns."""
        check_frame(header, len(tensors), "shm")
        # Device tensors come through the pinned staging buffer; they are in the ring before the block ends.
        with self._staging.host_tensors(tensors) as host:
            self._write_frame(header, [_as_bytes(t) for t in host])

    def _write_frame(self, header: bytes, payload: list[np.ndarray]) -> None:
        head = pack_envelope(EnvelopeKind.FRAME, len(header), [p.nbytes for p in payload]) + header
        head += bytes(_padded(len(head)) - len(head))
        with self._send_lock:
            writer = self._usable(self._writer)
            assert isinstance(writer, RingWriter)
            deadline = time.monotonic() + self.options.io_timeout
            try:
                writer.write(np.frombuffer(head, dtype=np.uint8), deadline)
                for part in payload:
                    writer.write(part, deadline)
                    if part.nbytes % _ALIGN:
                        writer.write(_ZEROS[: _padded(part.nbytes) - part.nbytes], deadline)
                writer.flush(deadline)
            except PeerError as exc:
                raise self._fail(str(exc)) from None

    def recv(self, specs: SpecsFromHeader, timeout: float) -> tuple[bytes, list[torch.Tensor]]:
        """`timeout` may be math.inf: wait until a frame arrives, the peer goes away or either side closes.

        The tensors are views of one fresh buffer per frame (every tensor 8-byte aligned).
        """
        with self._recv_lock:
            reader = self._usable(self._reader)
            assert isinstance(reader, RingReader)
            io = self.options.io_timeout
            start = reader.tail
            try:
                prefix = reader.take(FIELDS.size)
                if prefix is None:
                    prefix = np.empty(FIELDS.size, dtype=np.uint8)
                    reader.read(prefix, FIELDS.size, timeout, f"no frame within {timeout:.1f}s")
            except WaitTimeout as exc:
                if reader.tail != start:
                    raise self._fail(str(exc)) from None
                raise ChannelTimeout(self.peer, f"no frame within {timeout:.1f}s") from None
            except PeerError as exc:
                raise self._fail(str(exc)) from None
            try:
                envelope = parse_envelope(prefix.tobytes(), self.options.max_frame_bytes)
            except MalformedEnvelope as exc:
                raise self._fail(f"sent a corrupt frame envelope: {exc}") from None
            header_len = envelope.header_length
            payload_len = sum(_padded(n) for n in envelope.sizes)
            if envelope.kind != EnvelopeKind.FRAME or payload_len > self.options.max_frame_bytes:
                raise self._fail(f"sent a corrupt frame envelope (kind {envelope.kind}, {payload_len} payload bytes)")
            try:
                head_len = _padded(FIELDS.size + header_len) - FIELDS.size
                raw_header = reader.take(head_len)
                if raw_header is None:
                    raw_header = np.empty(head_len, dtype=np.uint8)
                    reader.read(raw_header, head_len, io, "frame header cut short")
                header = raw_header[:header_len].tobytes()
                try:
                    tensor_specs = list(specs(header))
                    sizes = [math.prod(s.shape) * s.dtype.itemsize for s in tensor_specs]
                    if sizes != envelope.sizes:
                        raise PayloadMismatch(
                            f"header announces tensors of {sizes} bytes, envelope says {envelope.sizes}"
                        )
                except Exception:
                    reader.read(None, payload_len, io, "rejected frame cut short")
                    reader.settle(io)
                    raise
                buffer = self._buffers.take(payload_len)
                reader.read(buffer, payload_len, io, "frame payload cut short")
                reader.settle(io)
            except PeerError as exc:
                raise self._fail(str(exc)) from None
            tensors = []
            offset = 0
            for spec, nbytes in zip(tensor_specs, sizes, strict=True):
                if nbytes:
                    flat = torch.frombuffer(
                        buffer, dtype=spec.dtype, count=nbytes // spec.dtype.itemsize, offset=offset
                    )
                    tensors.append(flat.view(spec.shape))
                else:
                    tensors.append(torch.empty(spec.shape, dtype=spec.dtype))
                offset += _padded(nbytes)
            return header, tensors

    def _usable(self, end: RingWriter | RingReader | None) -> RingWriter | RingReader:
        if self._closed or end is None:
            raise PeerError(self.peer, "channel is closed")
        if self._broken is not None:
            raise PeerError(self.peer, f"channel is broken: {self._broken}")
        return end

    def _fail(self, reason: str) -> PeerError:
        reason = reason.removeprefix(f"peer {self.peer}: ")
        self._broken = self._broken or reason
        return PeerError(self.peer, reason)

    def close(self) -> None:
        """Close the doorbells (the peer sees EOF at once); the rings unmap when their last view is dropped."""
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets:
            with contextlib.suppress(OSError):  # already disconnected
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._writer = None
        self._reader = None


class ShmListener(ChannelListener):
    """The attention side: creates both rings and the doorbell socket, then waits for the FFN node."""

    def __init__(self, peer: str, options: ShmOptions | None = None) -> None:
        self.peer = peer
        self.options = options or ShmOptions()
        token = uuid.uuid4().hex
        self._socket_name = f"afd-{token}-sock"
        # Created through SharedMemory so that the resource tracker unlinks them should this process die
        # before the peer attaches; mapped separately (see _map), the SharedMemory handles only unlink.
        self._segments: list[SharedMemory] = []
        self._server: socket.socket | None = None
        try:
            for direction in ("a2f", "f2a"):
                segment = SharedMemory(f"afd-{token}-{direction}", create=True, size=self.options.ring_bytes)
                segment.close()
                self._segments.append(segment)
            self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._server.bind(_abstract(self._socket_name))
            self._server.listen(2)
        except BaseException:
            self.close()
            raise

    @property
    def rendezvous(self) -> bytes:
        return pack_rendezvous(
            "shm",
            {
                "socket": self._socket_name,
                "a2f": self._segments[0].name,
                "f2a": self._segments[1].name,
                "ring_bytes": self.options.ring_bytes,
            },
        )

    def accept(self, timeout: float) -> ShmChannel:
        if self._server is None or len(self._segments) != 2:
            raise PeerError(self.peer, "shared-memory listener is closed")
        deadline = time.monotonic() + timeout
        by_role: dict[bytes, socket.socket] = {}
        try:
            rings = (
                _map(self._segments[0].name, self.options.ring_bytes),
                _map(self._segments[1].name, self.options.ring_bytes),
            )
            while len(by_role) < 2:
                self._server.settimeout(max(deadline - time.monotonic(), 1e-3))
                conn, _ = self._server.accept()
                conn.settimeout(max(deadline - time.monotonic(), 1e-3))
                role = conn.recv(1)
                if role not in (_ROLE_A2F, _ROLE_F2A) or role in by_role:
                    conn.close()
                    raise PeerError(self.peer, f"sent an unexpected shared-memory handshake {role!r}")
                by_role[role] = conn
        except TimeoutError:
            for conn in by_role.values():
                conn.close()
            self.close()
            raise PeerError(self.peer, f"did not attach to the shared-memory channel within {timeout:.1f}s") from None
        except BaseException:
            for conn in by_role.values():
                conn.close()
            self.close()
            raise
        # Both sides hold mappings now: unlink at once so nothing can outlive the processes.
        self.close()
        return ShmChannel(self.peer, rings, (by_role[_ROLE_A2F], by_role[_ROLE_F2A]), self.options)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for segment in self._segments:
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
        self._segments = []


def check_shm_rendezvous(rendezvous: bytes, max_ring_bytes: int = 1 << 31) -> dict[str, Any]:
    """The fields of shm rendezvous bytes; raises RendezvousError naming what is wrong."""
    fields = unpack_rendezvous(rendezvous, "shm", {"socket": str, "a2f": str, "f2a": str, "ring_bytes": int})
    for key, suffix in (("socket", "sock"), ("a2f", "a2f"), ("f2a", "f2a")):
        match = _NAME.fullmatch(fields[key])
        if match is None or match.group(1) != suffix:
            raise RendezvousError(f"shm rendezvous field {key!r} is not an AFD {suffix} name: {fields[key]!r}")
    if not 4096 <= fields["ring_bytes"] <= max_ring_bytes:
        raise RendezvousError(f"shm rendezvous announces a ring of {fields['ring_bytes']} bytes")
    return fields


def connect_shm(rendezvous: bytes, peer: str, options: ShmOptions | None = None) -> ShmChannel:
    """The FFN side: attach the rings named by `rendezvous` and connect the doorbells of attention node `peer`."""
    base = options or ShmOptions()
    fields = check_shm_rendezvous(rendezvous, base.max_frame_bytes)
    ring_bytes = fields["ring_bytes"]
    options = dataclasses.replace(base, ring_bytes=ring_bytes, chunk_bytes=min(base.chunk_bytes, ring_bytes // 2))
    rings = (_map(fields["a2f"], ring_bytes), _map(fields["f2a"], ring_bytes))
    sockets: list[socket.socket] = []
    try:
        for role in (_ROLE_A2F, _ROLE_F2A):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.settimeout(options.connect_timeout)
            try:
                sock.connect(_abstract(fields["socket"]))
                sock.sendall(role)
            except OSError as exc:
                raise PeerError(peer, f"cannot reach its shared-memory doorbell: {exc}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    # This side writes the f2a ring and reads the a2f ring.
    return ShmChannel(peer, (rings[1], rings[0]), (sockets[1], sockets[0]), options)
