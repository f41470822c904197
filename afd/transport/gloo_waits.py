"""Threads that wait on gloo work for the gloo channel, and getting them out of the way at interpreter exit.

Why a module of its own: gloo marks a send complete only once it is waited on, and a timed-out gloo wait
tears the pair down, so the channel (afd/transport/gloo_channel.py) waits on threads - one per channel for
posted sends (`Sends`), one for envelope receives given a finite timeout (`wait_loop`). Those threads must
neither be inside a wait nor free a gloo Work while the interpreter finalizes (see `GlooWaits`); this
module counts them, keeps closed channels' groups alive (`retire`) and closes every live channel at exit.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import datetime
import queue
import re
import threading
import weakref
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.distributed as dist

EXIT_GRACE_S = 2.0
"""At interpreter exit, how long open channels get to finish the gloo waits of their threads (see WAITS)."""
_SOURCE_LOCATION = re.compile(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*")
FOREVER = datetime.timedelta(days=365)
"""gloo has no "no timeout"; a year is as good as forever and still far from overflowing its clock."""


class PairGroup(Protocol):
    """What the gloo channel uses of a ProcessGroupGloo (torch's stubs do not declare its send/recv)."""

    def send(self, tensors: list[torch.Tensor], dst_rank: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], src_rank: int, tag: int) -> dist.Work: ...


class _Closable(Protocol):
    """What exit needs of a live channel."""

    def close(self) -> None: ...


def first_line(exc: BaseException) -> str:
    """gloo's message without its source location and advice: "Connection closed by peer [127.0.0.1]:4321"."""
    lines = str(exc).strip().splitlines()
    text = _SOURCE_LOCATION.sub("", lines[0]) if lines else type(exc).__name__
    return text.split(". This is typically", 1)[0][:300]


class PendingWait:
    """A posted receive being waited on by a channel's waiter thread."""

    def __init__(self, work: dist.Work, buffer: torch.Tensor) -> None:
        self.work: dist.Work | None = work
        self.buffer = buffer
        """Where the message lands."""
        self.handed = False
        """Given to the waiter thread (then only its `done` event may be waited on)."""
        self.done = threading.Event()
        self.error: str | None = None


class GlooWaits:
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


WAITS = GlooWaits()
LIVE: weakref.WeakSet[_Closable] = weakref.WeakSet()
"""Open channels, closed at exit (each channel adds itself)."""


_RETIRED: collections.deque[tuple[PairGroup | None, list[tuple[dist.Work, torch.Tensor]]]] = collections.deque(
    maxlen=256
)
"""Groups and unawaited CLOSE sends of closed channels. Kept here, not on the channel, because a channel
may be freed by whichever daemon thread drops it last — at exit, freeing a Work there aborts the process
(see GlooWaits); from here they are freed by a later close or by the main thread at exit."""


def retire(group: PairGroup | None, control: list[tuple[dist.Work, torch.Tensor]]) -> None:
    _RETIRED.append((group, control))


@atexit.register
def _quiesce_at_exit() -> None:
    for channel in list(LIVE):
        channel.close()
    WAITS.wait_quiet(EXIT_GRACE_S)


def wait_loop(waits: queue.SimpleQueue[PendingWait | None]) -> None:
    while (pending := waits.get()) is not None:
        try:
            assert pending.work is not None
            pending.work.wait(FOREVER)
        except RuntimeError as exc:
            pending.error = first_line(exc)
        finally:
            pending.work = None  # freed here, not by a frame torn down during interpreter exit
            WAITS.done()  # counted when it was queued (see GlooChannel._wait_envelope in gloo_channel.py)
        pending.done.set()


class Sends:
    """A channel's posted sends and the thread that waits on them, so their buffers are released once taken.

    (A gloo send is only marked complete by waiting on it; nothing else would free its tensors.) The
    thread holds this object, never the channel: a thread that ends holding the last reference to
    tensors frees them, and freeing a tensor during interpreter exit aborts the process (GlooWaits).
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
                self.error = self.error or f"gloo send failed or timed out: {first_line(exc)}"
            finally:
                work = item = None  # type: ignore[assignment]  # freed here, not at interpreter exit
                WAITS.done()  # counted when it was queued (see post)
            self.release()

    def post(self, item: tuple[list[dist.Work], list[torch.Tensor]]) -> None:
        WAITS.add()
        self.queue.put(item)
