"""The byte rings under the shared-memory channel: a ring per direction, a Unix-socket doorbell per ring.

Why a module of its own: the channel (afd/transport/shm_channel.py) decides what a frame is and how the
two ends meet; this is how bytes cross - the streaming copy into and out of a ring, the head/tail
positions on the doorbell, and the receive buffers kept for reuse. Each ring is a byte stream. The writer
copies into the ring and rings the doorbell with its new head position (8 bytes on the socket) at the end
of the frame and every `chunk` bytes; the reader copies out and answers with its tail position (credit)
every `chunk` bytes and before it sleeps. The socket syscalls order the memory accesses on both sides,
and the socket doubles as the liveness signal: a peer that exits or dies closes it, so a blocked reader
or writer sees EOF at once and raises PeerError.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
import weakref

import numpy as np

from afd.errors import PeerError

_POSITION = struct.Struct("<Q")
"""A doorbell message: the sender's new head (notice) or the receiver's new tail (credit)."""
_FOREVER_S = 1e7
"""A socket timeout that never expires in practice (a fixed value, so the timeout is rarely reset)."""


class WaitTimeout(PeerError):
    """Nothing arrived in time; the stream is still in step if no byte of the frame was read."""


class Doorbell:
    """One end of a ring's socket: sends positions, waits for the other end's latest position."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self._partial = b""
        self._timeout: float | None = None

    def _set_timeout(self, timeout: float) -> None:
        # settimeout costs two fcntl calls each time; skip it while the value stays put (the common case).
        value = _FOREVER_S if math.isinf(timeout) else max(timeout, 1e-4)
        if value != self._timeout:
            self.sock.settimeout(value)
            self._timeout = value

    def ring(self, position: int, timeout: float) -> None:
        try:
            self._set_timeout(timeout)
            self.sock.sendall(_POSITION.pack(position))
        except TimeoutError:
            raise PeerError(self.peer, "does not drain its shared-memory doorbell") from None
        except OSError as exc:
            raise PeerError(self.peer, f"shared-memory doorbell failed ({exc}); the peer closed or died") from None

    def wait(self, timeout: float, what: str) -> int:
        """The newest position the peer sent, blocking up to `timeout` seconds (math.inf: no limit)."""
        self._set_timeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise WaitTimeout(self.peer, what) from None
        except OSError as exc:
            raise PeerError(self.peer, f"shared-memory doorbell failed ({exc}); the peer closed or died") from None
        if not data:
            raise PeerError(self.peer, "closed the channel (or exited)")
        data = self._partial + data
        whole = len(data) // _POSITION.size * _POSITION.size
        self._partial = data[whole:]
        if whole == 0:
            return -1
        return _POSITION.unpack_from(data, whole - _POSITION.size)[0]


class RingWriter:
    def __init__(self, ring: np.ndarray, doorbell: Doorbell, chunk: int) -> None:
        self.ring = ring
        self.doorbell = doorbell
        self.chunk = chunk
        self.capacity = len(ring)
        self.head = 0
        """Bytes written since the start (monotonic); the ring offset is head % capacity."""
        self.tail = 0
        """Bytes the reader has credited back."""
        self.notified = 0

    def write(self, data: np.ndarray, deadline: float) -> None:
        """Copy `data` (flat uint8) into the ring, waiting for credit when it is full."""
        done, total = 0, len(data)
        while done < total:
            free = self.capacity - (self.head - self.tail)
            if free == 0:
                self.flush(deadline)
                self.tail = max(self.tail, self.doorbell.wait(deadline - time.monotonic(), "no ring space in time"))
                continue
            start = self.head % self.capacity
            n = min(total - done, free, self.capacity - start, self.chunk)
            self.ring[start : start + n] = data[done : done + n]
            self.head += n
            done += n
            if self.head - self.notified >= self.chunk:
                self.flush(deadline)

    def flush(self, deadline: float) -> None:
        if self.head > self.notified:
            self.doorbell.ring(self.head, deadline - time.monotonic())
            self.notified = self.head


class RingReader:
    def __init__(self, ring: np.ndarray, doorbell: Doorbell, chunk: int) -> None:
        self.ring = ring
        self.doorbell = doorbell
        self.chunk = chunk
        self.capacity = len(ring)
        self.tail = 0
        """Bytes consumed since the start (monotonic)."""
        self.head = 0
        """Bytes the writer has announced."""
        self.credited = 0

    def take(self, count: int) -> np.ndarray | None:
        """The next `count` bytes as a view of the ring if they are already there and contiguous (no wait)."""
        start = self.tail % self.capacity
        if self.head - self.tail < count or start + count > self.capacity:
            return None
        self.tail += count
        return self.ring[start : start + count]

    def settle(self, timeout: float) -> None:
        """Credit what was consumed once a chunk's worth has accumulated."""
        if self.tail - self.credited >= self.chunk:
            self.doorbell.ring(self.tail, timeout)
            self.credited = self.tail

    def read(self, out: np.ndarray | None, count: int, timeout: float, what: str) -> None:
        """Copy the next `count` bytes into `out` (flat uint8), or drop them if `out` is None.

        Credit goes back every `chunk` bytes only: with chunk < capacity a full ring always has credit on
        its way, and the writer's socket never fills with credits it has no reason to read.
        """
        deadline = time.monotonic() + timeout
        done = 0
        while done < count:
            available = self.head - self.tail
            if available == 0:
                self.head = max(self.head, self.doorbell.wait(deadline - time.monotonic(), what))
                continue
            start = self.tail % self.capacity
            n = min(count - done, available, self.capacity - start)
            if out is not None:
                out[done : done + n] = self.ring[start : start + n]
            self.tail += n
            done += n
            if self.tail - self.credited >= self.chunk:
                self.doorbell.ring(self.tail, deadline - time.monotonic())
                self.credited = self.tail


class BufferPool:
    """Recycles large receive buffers.

    A fresh multi-MiB allocation is a new mmap whose every page faults on first write, which halves the
    receiver's copy rate; a recycled one is already mapped. A buffer returns to the pool when the last
    tensor viewing it is freed (a finalizer on the view the tensors hold), so callers keep full ownership.
    """

    MIN_BYTES = 1 << 20
    """Smaller payloads come from malloc's own free lists, which are warm anyway."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[np.ndarray]] = {}
        self._pooled = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of exactly `nbytes`."""
        if nbytes < self.MIN_BYTES:
            return np.empty(nbytes, dtype=np.uint8)
        size_class = 1 << (nbytes - 1).bit_length()
        with self._lock:
            spare = self._free.get(size_class)
            base = spare.pop() if spare else None
            if base is not None:
                self._pooled -= base.nbytes
        if base is None:
            base = np.empty(size_class, dtype=np.uint8)
        view = base[:nbytes]
        weakref.finalize(view, self._give_back, base)
        return view

    def _give_back(self, base: np.ndarray) -> None:
        with self._lock:
            if self._pooled + base.nbytes <= self.max_bytes:
                self._free.setdefault(base.nbytes, []).append(base)
                self._pooled += base.nbytes
