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
import time
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from afd.transport.base import FfnTransport, PendingCombine
from afd.transport.deadlines import ExchangeWatch, Withdrawn
from afd.transport.staging import to_device
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
        self.sent_at = time.monotonic()
        """When the requests were handed to the transport (monotonic seconds)."""
        self.sent_bytes: dict[str, int] = {}
        """Payload bytes sent to each node."""
        self.missed: set[str] = set()
        """Nodes that had not replied when one of this exchange's deadlines passed."""


def request_bytes(request: FfnRequest) -> int:
    """Payload bytes of `request` on the wire (its tensors; the header is small and not counted)."""
    tensors = (request.hidden, request.hidden_scale, request.expert_ids, request.expert_weights, request.shared_scale)
    return sum(t.nbytes for t in tensors if t is not None)


class ReplyFutureTransport(FfnTransport):
    """dispatch / combine over one future per FFN node; subclasses send a request and forget abandoned ones.

    `combine` returns the partial sums on `reply_device` when one is set (afd.transport.staging.to_device).

    `combine` waits with a deadline: the first failed node's PeerError is raised, or PeerError naming a node
    whose partial sum did not come within `reply_timeout_s`; the other requests of that dispatch are forgotten
    so their slots are freed and late replies are dropped. Within that wait, `watch` (afd/transport/deadlines.py)
    times every reply and counts the straggler deadlines each pending node misses; it never shortens the wait.
    """

    _closed: bool = False
    reply_device: torch.device | None = None
    """Where `combine` returns the partial sums (the attention node's compute device); None: where the
    backend received them (the CPU for host transports, the channel's GPU for NCCL)."""

    def __init__(self) -> None:
        self.watch = ExchangeWatch()
        """Per-exchange deadlines, stragglers and per-peer link fits; its config and callback are the owner's."""
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
        pending = PendingReplies(futures)
        for node, (_, future) in futures.items():
            pending.sent_bytes[node] = request_bytes(requests[node])
            self._track(node, future)
            future.add_done_callback(self._timer(node, pending))
        if requests:
            first = next(iter(requests.values()))
            pending.layer, pending.microbatch = first.layer, first.microbatch
        return pending

    def _track(self, node: str, future: concurrent.futures.Future[torch.Tensor]) -> None:
        with self._awaited_lock:
            self._awaited_by_node.setdefault(node, set()).add(future)
        future.add_done_callback(lambda settled: self._untrack(node, settled))

    def _timer(self, node: str, pending: PendingReplies) -> Callable[[concurrent.futures.Future[torch.Tensor]], None]:
        return lambda settled: self._timed(node, settled, pending)

    def _timed(self, node: str, future: concurrent.futures.Future[torch.Tensor], pending: PendingReplies) -> None:
        """A reply of `node` settled `future`: its time and bytes feed the watch (failures do not)."""
        if future.cancelled() or future.exception() is not None:
            return
        seconds = time.monotonic() - pending.sent_at
        received = future.result().nbytes
        self.watch.replied(node, pending.sent_bytes.get(node, 0), received, seconds, node in pending.missed)

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

    def withdraw_peer(self, node: str, reason: str) -> int:
        with self._awaited_lock:
            awaited = list(self._awaited_by_node.get(node, ()))
        error = Withdrawn(node, reason)
        for future in awaited:
            fail(future, error)
        return len(awaited)

    def combine(self, pending: PendingCombine) -> dict[str, torch.Tensor]:
        """Partial sums `[num_tokens_of_node, hidden_size]` per node, in the hidden dtype."""
        assert isinstance(pending, PendingReplies), f"not a dispatch of this transport: {type(pending).__name__}"
        futures = {node: future for node, (_, future) in pending.futures.items()}
        timeout = self.reply_timeout_s
        give_up = time.monotonic() + timeout  # the failure timeout runs from here, as it always did
        period = self.watch.deadline(max(pending.sent_bytes.values(), default=0), timeout)
        due = pending.sent_at + period if period is not None else give_up
        while True:
            done, not_done = concurrent.futures.wait(
                futures.values(),
                timeout=max(0.0, min(due, give_up) - time.monotonic()),
                return_when=concurrent.futures.FIRST_EXCEPTION,
            )
            if not not_done or any(f.exception() is not None for f in done) or time.monotonic() >= give_up:
                break
            if period is not None and time.monotonic() >= due:
                # Keep waiting for the real partial sums (tokens never change); count who is late.
                behind = [node for node, f in futures.items() if f in not_done]
                pending.missed.update(behind)
                self.watch.missed(behind, len(futures), time.monotonic() - pending.sent_at)
                due += period
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
        # Moved here, on the caller's thread and current stream, not on a receiver thread: the copy is then
        # ordered before whatever the caller queues next (the residual add), with no host wait.
        return {node: to_device(future.result(), self.reply_device) for node, future in futures.items()}
