"""Matching FFN replies to the requests awaiting them, and dispatch/combine over their futures: shared by
the gRPC and channel transports.

Both send a request frame, remember what they expect back (layer, microbatch, token count) under its
sequence number, and resolve a future when the reply frame arrives. A reply that is an error, cannot be
decoded or answers something else fails that request's future with PeerError naming the node; nothing
is raised on the receiving thread, which keeps reading for the other requests.
"""

from __future__ import annotations

import concurrent.futures
import threading
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from afd.transport.base import FfnTransport, PendingCombine
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


class PendingReplies(PendingCombine):
    """The futures of one dispatch: FFN node id -> (sequence number, future of its partial sum)."""

    def __init__(self, futures: dict[str, tuple[int, concurrent.futures.Future[torch.Tensor]]]) -> None:
        super().__init__(tuple(futures))
        self.futures = futures
        self.layer = -1
        self.microbatch = -1


class ReplyFutureTransport(FfnTransport):
    """dispatch / combine over one future per FFN node; subclasses send a request and forget abandoned ones.

    `combine` waits with a deadline: the first failed node's PeerError is raised, or PeerError naming a node
    whose partial sum did not come within `reply_timeout_s`; the other requests of that dispatch are forgotten
    so their slots are freed and late replies are dropped.
    """

    _closed: bool = False

    def __init__(self) -> None:
        self._awaited_lock = threading.Lock()
        self._awaited_by_node: dict[str, set[concurrent.futures.Future[torch.Tensor]]] = {}
        """FFN node id -> its unsettled reply futures (what `fail_peer` fails); entries leave when settled."""

    @property
    @abstractmethod
    def reply_timeout_s(self) -> float:
        """Longest wait in combine for a node's partial sum."""

    @abstractmethod
    def _send(self, node: str, request: FfnRequest) -> tuple[int, concurrent.futures.Future[torch.Tensor]]:
        """Send `request` to `node`; (its sequence number, the future of its reply). Raises PeerError."""

    @abstractmethod
    def _abandon(self, futures: dict[str, tuple[int, concurrent.futures.Future[torch.Tensor]]], reason: str) -> None:
        """Stop waiting for `futures` (failing the unsettled ones with `reason`)."""

    def _late_detail(self, node: str) -> str:
        """Extra words for the timeout error of `node` (e.g. its address)."""
        return ""

    def dispatch(self, requests: Mapping[str, FfnRequest]) -> PendingCombine:
        if self._closed:
            raise PeerError(next(iter(requests), "?"), "the transport is closed")
        futures: dict[str, tuple[int, concurrent.futures.Future[torch.Tensor]]] = {}
        try:
            for node, request in requests.items():
                futures[node] = self._send(node, request)
        except BaseException:
            self._abandon(futures, "dispatch failed")
            raise
        for node, (_, future) in futures.items():
            self._track(node, future)
        pending = PendingReplies(futures)
        if requests:
            first = next(iter(requests.values()))
            pending.layer, pending.microbatch = first.layer, first.microbatch
        return pending

    def _track(self, node: str, future: concurrent.futures.Future[torch.Tensor]) -> None:
        with self._awaited_lock:
            self._awaited_by_node.setdefault(node, set()).add(future)
        future.add_done_callback(lambda settled: self._untrack(node, settled))

    def _untrack(self, node: str, future: concurrent.futures.Future[torch.Tensor]) -> None:
        with self._awaited_lock:
            awaited = self._awaited_by_node.get(node)
            if awaited is not None:
                awaited.discard(future)
                if not awaited:
                    del self._awaited_by_node[node]

    def fail_peer(self, node: str, reason: str) -> int:
        with self._awaited_lock:
            awaited = list(self._awaited_by_node.get(node, ()))
        error = PeerError(node, reason)
        for future in awaited:
            fail(future, error)  # combine wakes at once (FIRST_EXCEPTION) and abandons the rest
        return len(awaited)

    def combine(self, pending: PendingCombine) -> dict[str, torch.Tensor]:
        """Partial sums `[num_tokens_of_node, hidden_size]` per node, in the hidden dtype."""
        assert isinstance(pending, PendingReplies), f"not a dispatch of this transport: {type(pending).__name__}"
        futures = {node: future for node, (_, future) in pending.futures.items()}
        timeout = self.reply_timeout_s
        done, not_done = concurrent.futures.wait(
            futures.values(), timeout=timeout, return_when=concurrent.futures.FIRST_EXCEPTION
        )
        failed = next((node for node, f in futures.items() if f in done and f.exception() is not None), None)
        if failed is not None:
            self._abandon(pending.futures, f"combine failed on {failed}")
            error = futures[failed].exception()
            assert error is not None
            raise error
        if not_done:
            late = next(node for node, f in futures.items() if f in not_done)
            reason = f"no partial sum for layer {pending.layer} microbatch {pending.microbatch} within {timeout}s"
            reason += self._late_detail(late)
            self._abandon(pending.futures, reason)
            raise PeerError(late, reason)
        return {node: future.result() for node, future in futures.items()}
