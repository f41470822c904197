"""One non-blocking NCCL communicator, and the polling every wait on it goes through.

Communicators are created *non-blocking* (`ncclConfig_t.blocking = 0`, see library.py's CommConfig):
every NCCL call then returns at once (`ncclInProgress` while work is
under way) and all waiting happens in Python, in `poll_until` loops with deadlines. That is what lets a
channel give up on a peer that never joins or has died — `ncclCommAbort` ends whatever is stuck — rather
than sit in a C call forever. The price is a helper thread that NCCL starts per group call; the self
test (`python -m afd.transport.nccl.selftest`) shows what it costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from afd.transport.nccl.library import DeviceBuffer, NcclError, NcclLibrary, Result


def _never() -> bool:
    return False


def poll_until(done: Callable[[], bool], deadline: float, stop: Callable[[], bool] = _never) -> bool:
    """Call `done` until it is true (True), or `deadline` (time.monotonic) passes or `stop` is true (False).

    Spins without sleeping for the first polls, since a transfer usually ends within microseconds, then
    backs off to 1 ms so a long wait does not burn a core. Exceptions from `done` propagate.
    """
    spins = 0
    pause = 10e-6
    while True:
        if done():
            return True
        if stop() or time.monotonic() >= deadline:
            return False
        spins += 1
        if spins < 64:
            time.sleep(0)  # let other threads have the GIL
        else:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)


class Communicator:
    """One non-blocking NCCL communicator: calls return at once, waits are polls with deadlines.

    Not thread-safe, like an NCCL communicator: one thread at a time (the channel holds a lock per
    communicator).
    """

    def __init__(self, library: NcclLibrary, handle: int, rank: int, nranks: int) -> None:
        self.library = library
        self.rank = rank
        self.nranks = nranks
        self._handle: int | None = handle

    @classmethod
    def begin(cls, library: NcclLibrary, unique_id: bytes, rank: int, nranks: int) -> Communicator:
        """Start forming a communicator on the current CUDA device; `wait_ready` until it has formed."""
        return cls(library, library.comm_init_rank(nranks, unique_id, rank, blocking=False), rank, nranks)

    @property
    def handle(self) -> int:
        if self._handle is None:
            raise NcclError("ncclCommGetAsyncError", Result.INVALID_USAGE, "the communicator was aborted")
        return self._handle

    @property
    def aborted(self) -> bool:
        return self._handle is None

    def ready(self) -> bool:
        """True once the last call's work is enqueued (or the communicator has formed); raises NcclError."""
        state = self.library.comm_get_async_error(self.handle)
        if state == Result.IN_PROGRESS:
            return False
        self.library.check(state, "ncclCommGetAsyncError", self.handle)
        return True

    def wait_ready(self, deadline: float, stop: Callable[[], bool] = _never) -> bool:
        return poll_until(self.ready, deadline, stop)

    def post(self, sends: Sequence[DeviceBuffer], recvs: Sequence[DeviceBuffer], peer: int, stream: int) -> None:
        """Enqueue `sends` to and `recvs` from `peer` as one group on `stream`; then `wait_ready` before more calls."""
        library = self.library
        library.group_start()
        try:
            for buffer in sends:
                library.send(buffer, peer, self.handle, stream)
            for buffer in recvs:
                library.recv(buffer, peer, self.handle, stream)
        finally:
            library.group_end()  # a group is always closed, or this thread's next NCCL call would join it

    def abort(self) -> None:
        """Stop whatever is running on the device and free the communicator; idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self.library.comm_abort(handle)
