"""Point-to-point channels: the building block of the gloo, shared-memory and NCCL transports.

A channel links one attention node with one FFN node and carries frames both ways, in order. A frame is
a msgpack header (bytes, see afd.wire.frames) plus the tensors it describes. Byte-stream backends pack
both into one buffer; tensor backends (gloo, NCCL) send the header, then each tensor, so tensors never
pass through Python bytes. The receiver learns the tensors' shapes and dtypes from the validated header
(`tensor_specs`), which is why `recv` takes that function: a header that fails validation raises before
any tensor buffer is allocated.

Channels are pairwise on purpose: membership changes at run time, so no backend may depend on a world
size fixed at start-up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from afd.errors import PeerError
from afd.wire.frames import TensorSpec

__all__ = ["Channel", "ChannelTimeout", "SpecsFromHeader", "TensorSpec"]


class ChannelTimeout(PeerError):
    """No frame arrived within `recv`'s timeout; the channel is intact and the next `recv` may succeed.

    Every other PeerError from a channel means it is closed or broken: a serving loop polls on this one
    and ends on the others, instead of guessing from how long the call took.
    """


#: Parses and validates a header, returning the specs of the tensors that follow it (raises on a bad header).
SpecsFromHeader = Callable[[bytes], Sequence[TensorSpec]]


class Channel(ABC):
    """Ordered, reliable, bidirectional frame link to one peer."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        """Id of the node at the other end (used in error messages)."""

    @abstractmethod
    def send(self, header: bytes, tensors: Sequence[torch.Tensor]) -> None:
        """Send one frame; raises PeerError naming the peer if it is gone or the send times out."""

    @abstractmethod
    def recv(self, specs: SpecsFromHeader, timeout: float) -> tuple[bytes, list[torch.Tensor]]:
        """Receive one frame within `timeout` seconds (`math.inf`: until one arrives or the channel closes);
        raises ChannelTimeout when no frame came in time, PeerError (naming the peer) on the peer's death and
        when either end closes."""

    @abstractmethod
    def close(self) -> None:
        """Release the link; idempotent."""
