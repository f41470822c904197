"""An in-process Channel pair for tests: frames cross a queue as copies, as they would cross a wire."""

from __future__ import annotations

import math
import queue
from collections.abc import Sequence

import torch

from afd.errors import PeerError
from afd.transport.channel import Channel, ChannelTimeout, SpecsFromHeader

_CLOSED = object()


class MemoryChannel(Channel):
    """One end of an in-process channel: frames cross a queue as copies, as they would cross a wire."""

    def __init__(self, peer: str, inbox: queue.Queue, outbox: queue.Queue) -> None:
        super().__init__(peer)
        self.inbox, self.outbox = inbox, outbox
        self.closed = False

    def send(self, header: bytes, tensors: Sequence[torch.Tensor]) -> None:
        if self.closed:
            raise PeerError(self.peer, "channel is closed")
        self.outbox.put((header, [t.clone() for t in tensors]))

    def recv(self, specs: SpecsFromHeader, timeout: float) -> tuple[bytes, list[torch.Tensor]]:
        try:
            item = self.inbox.get(timeout=None if math.isinf(timeout) else timeout)
        except queue.Empty:
            raise ChannelTimeout(self.peer, f"no frame within {timeout}s") from None
        if item is _CLOSED:
            self.inbox.put(_CLOSED)
            raise PeerError(self.peer, "closed the channel")
        header, tensors = item
        assert [(s.shape, s.dtype) for s in specs(header)] == [(tuple(t.shape), t.dtype) for t in tensors]
        return header, tensors

    def close(self) -> None:
        self.closed = True
        self.outbox.put(_CLOSED)
        self.inbox.put(_CLOSED)


def memory_pair(attention: str, ffn: str) -> tuple[MemoryChannel, MemoryChannel]:
    to_ffn: queue.Queue = queue.Queue()
    to_attention: queue.Queue = queue.Queue()
    return MemoryChannel(ffn, to_attention, to_ffn), MemoryChannel(attention, to_ffn, to_attention)
