"""How an FFN node answers a request frame, whichever door it came through (a gRPC stream or a channel).

decode -> compute -> encode, with one error mapping: every request frame gets exactly one reply frame, the
partial sum or an ERROR frame naming what went wrong, carrying the request's sequence number whenever it
could be read, so the attention node fails that one request and the stream or channel goes on. The doors
only differ in how bytes arrive (one packed buffer on gRPC, a header and tensors on a channel); both hand
a decoded header here.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Awaitable, Callable

import torch

from afd.ffn_messages import FfnRequest
from afd.wire.frames import UNKNOWN, FrameError, FrameHeader, encode_error, encode_response, request_from_frame

log = logging.getLogger("ffn_nodes.server")

ReplyFrame = tuple[bytes, list[torch.Tensor]]
"""A frame to send back: msgpack header and tensors (what Channel.send and pack_parts take)."""
Submit = Callable[[FfnRequest], Awaitable[torch.Tensor]]
"""Computes a request's partial sum (the node's batcher, from the event loop)."""
SubmitThreadsafe = Callable[[FfnRequest], "concurrent.futures.Future[torch.Tensor]"]
"""Computes a request's partial sum (the node's batcher, from any thread)."""


async def answer(
    submit: Submit, node_id: str, header: FrameHeader, tensors: list[torch.Tensor], peer: str
) -> ReplyFrame:
    """The reply to the request frame `header` + `tensors`: its partial sum, or an ERROR frame for it."""
    request = _request(node_id, header, tensors, peer)
    if not isinstance(request, FfnRequest):
        return request
    try:
        partial = await submit(request)
    except Exception as exc:  # this request failed (bad ids for its shard, a stale placement, the node stopping)
        return _reply(node_id, header, exc, peer)
    return _reply(node_id, header, partial, peer)


def answer_threadsafe(
    submit: SubmitThreadsafe, node_id: str, header: FrameHeader, tensors: list[torch.Tensor], peer: str
) -> concurrent.futures.Future[ReplyFrame]:
    """`answer` for a door on its own threads: the reply frame is encoded on the batch thread as the partial
    sum lands, so no event loop sits between the frame's arrival and its reply."""
    reply: concurrent.futures.Future[ReplyFrame] = concurrent.futures.Future()
    request = _request(node_id, header, tensors, peer)
    if not isinstance(request, FfnRequest):
        reply.set_result(request)
        return reply

    def encode(partial: concurrent.futures.Future[torch.Tensor]) -> None:
        try:
            error = partial.exception()
            reply.set_result(_reply(node_id, header, error if error is not None else partial.result(), peer))
        except Exception as exc:  # a callback's exception would only be logged: the send thread must see it
            reply.set_exception(exc)

    submit(request).add_done_callback(encode)
    return reply


def _request(node_id: str, header: FrameHeader, tensors: list[torch.Tensor], peer: str) -> FfnRequest | ReplyFrame:
    """The request a frame carries, or the ERROR frame saying why it cannot be read."""
    try:
        return request_from_frame(header, tensors)
    except FrameError as exc:
        log.warning("bad frame from %s (seq %d): %s", peer, header.seq, exc)
        return encode_error(str(exc), header.layer, header.microbatch, header.seq, node_id)


def _reply(node_id: str, header: FrameHeader, outcome: torch.Tensor | BaseException, peer: str) -> ReplyFrame:
    """The partial sum's frame, or the ERROR frame of a request that failed (bad ids for its shard, a stale
    placement, the node stopping)."""
    if isinstance(outcome, BaseException):
        log.warning("request seq %d from %s failed: %s", header.seq, peer, outcome)
        reason = f"{type(outcome).__name__}: {outcome}"
        return encode_error(reason, header.layer, header.microbatch, header.seq, node_id)
    return encode_response(outcome, header.layer, header.microbatch, header.seq, node_id)


def refusal(reason: str, node_id: str, seq: int = UNKNOWN) -> ReplyFrame:
    """The ERROR frame for a frame whose header could not be read (`seq` when at least that was readable)."""
    return encode_error(reason, UNKNOWN, UNKNOWN, seq, node_id)
