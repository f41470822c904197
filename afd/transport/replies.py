"""Matching FFN replies to the requests awaiting them: shared by the gRPC and channel transports.

Both send a request frame, remember what they expect back (layer, microbatch, token count) under its
sequence number, and resolve a future when the reply frame arrives. A reply that is an error, cannot be
decoded or answers something else fails that request's future with PeerError naming the node; nothing
is raised on the receiving thread, which keeps reading for the other requests.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

import torch

from afd.errors import PeerError
from afd.wire.frames import FrameError, FrameHeader, FrameKind, partial_from_frame


@dataclass(slots=True)
class AwaitedReply:
    """A request sent to an FFN node and not yet answered."""

    future: concurrent.futures.Future[torch.Tensor]
    """Resolved with the partial sum `[num_tokens, hidden]`, or failed with PeerError."""
    layer: int
    microbatch: int
    num_tokens: int
    stream: int = -1
    """Which of the node's streams carried it (gRPC); -1 where there is one channel."""


def fail(future: concurrent.futures.Future[torch.Tensor], error: Exception) -> None:
    """Fail `future` unless it is already settled (a late failure after a timeout is dropped)."""
    if not future.done():
        future.set_exception(error)


def resolve(node: str, awaited: AwaitedReply, header: FrameHeader, tensors: list[torch.Tensor]) -> None:
    """Settle `awaited` with the reply `header` + `tensors` from FFN node `node`."""
    if header.kind is FrameKind.ERROR:
        fail(awaited.future, PeerError(node, f"failed layer {awaited.layer}: {header.error}"))
        return
    try:
        partial = partial_from_frame(header, tensors)
    except FrameError as exc:
        fail(awaited.future, PeerError(node, f"sent an invalid reply: {exc}"))
        return
    got = (header.layer, header.microbatch, partial.shape[0])
    if got != (awaited.layer, awaited.microbatch, awaited.num_tokens):
        message = (
            f"reply to seq {header.seq} is for layer {header.layer} microbatch {header.microbatch} with "
            f"{partial.shape[0]} tokens; expected layer {awaited.layer} microbatch {awaited.microbatch} "
            f"with {awaited.num_tokens}"
        )
        fail(awaited.future, PeerError(node, message))
        return
    if not awaited.future.done():
        awaited.future.set_result(partial)
