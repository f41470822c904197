"""The channel doors' answer (ffn_nodes.answers.answer_threadsafe): one reply frame per request frame, settled on
the batch thread, and never a reply that stays pending."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from afd.ffn_messages import FfnRequest
from afd.wire.frames import BadDtype, FrameKind, FrameLimits, decode_header, encode_request, partial_from_frame
from ffn_nodes.answers import answer_threadsafe

HIDDEN, TOP_K = 8, 2
LIMITS = FrameLimits(HIDDEN, num_layers=2, top_k=TOP_K, max_local_experts=4)


def _frame(seq: int) -> tuple[object, list[torch.Tensor]]:
    ids = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    request = FfnRequest(0, torch.randn(2, HIDDEN), ids, torch.rand(2, TOP_K))
    header, tensors = encode_request(request, seq, "attn-0")
    return decode_header(header, LIMITS), tensors


def _settled(value: torch.Tensor | Exception) -> concurrent.futures.Future[torch.Tensor]:
    future: concurrent.futures.Future[torch.Tensor] = concurrent.futures.Future()
    if isinstance(value, Exception):
        future.set_exception(value)
    else:
        future.set_result(value)
    return future


def test_the_partial_sum_and_a_failed_request_each_get_their_frame() -> None:
    header, tensors = _frame(seq=7)
    partial = torch.randn(2, HIDDEN)
    body, parts = answer_threadsafe(lambda request: _settled(partial), "ffn-0", header, tensors, "attn-0").result(5)
    reply = decode_header(body, LIMITS)
    assert (reply.kind, reply.seq) == (FrameKind.FFN_RESPONSE, 7)
    assert torch.equal(partial_from_frame(reply, parts), partial)

    failed = answer_threadsafe(lambda r: _settled(ValueError("stale placement")), "ffn-0", header, tensors, "attn-0")
    error = decode_header(failed.result(5)[0], LIMITS)
    assert (error.kind, error.seq) == (FrameKind.ERROR, 7) and "ValueError: stale placement" in (error.error or "")


def test_a_reply_that_cannot_be_encoded_fails_the_reply_instead_of_leaving_it_pending() -> None:
    # the send thread waits on this future: an exception lost in a done-callback would block it for good
    header, tensors = _frame(seq=3)
    unsendable = torch.zeros(2, HIDDEN, dtype=torch.int64)
    reply = answer_threadsafe(lambda request: _settled(unsendable), "ffn-0", header, tensors, "attn-0")
    with pytest.raises(BadDtype):
        reply.result(5)
