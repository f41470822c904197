"""The gRPC door of an FFN node: `afd.v1.FfnData/Exchange`, one bidirectional stream per attention node.

Request frames come in, replies (partial sums or ERROR frames, ffn_nodes/answers.py) go out matched by
sequence number, in whatever order they are computed. A bad frame never ends a stream: it is answered with
an ERROR frame and the node carries on serving everyone else.

Back-pressure: a request frame takes one of the stream's `max_in_flight_per_stream` slots before the stream
is read further, and gives it back only once its reply has been written. A peer that stops reading
therefore holds at most that many requests and replies on this node; after that the node stops reading
its frames and HTTP/2 flow control stops the peer's sends, while other streams are served as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc.aio

from afd.errors import PeerError
from afd.wire import grpc_data
from afd.wire.frames import UNKNOWN, FrameError, pack_parts, packed_frame_seq, unpack
from ffn_nodes.answers import ReplyFrame, answer, refusal

if TYPE_CHECKING:
    from ffn_nodes.server import FfnNodeServer

log = logging.getLogger("ffn_nodes.server")


class ExchangeHandler:
    """Serves Exchange streams for `server` (`exchange` is what grpc_data.exchange_handler wraps)."""

    def __init__(self, server: FfnNodeServer) -> None:
        self.server = server

    async def exchange(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        """One stream: read request frames, write one reply per frame (a plain coroutine function, so that
        grpc's asyncio server runs it as one)."""
        peer = context.peer()
        outbox = _StreamOutbox(self.server, self.server.config.max_in_flight_per_stream)
        reader = asyncio.ensure_future(self._read_stream(request_iterator, outbox, peer))
        try:
            while True:
                message = await outbox.queue.get()
                if message is None:
                    break
                try:
                    await context.write(message)  # waits while the peer does not read (HTTP/2 flow control)
                finally:
                    outbox.written(message)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            outbox.close()

    async def _read_stream(self, request_iterator: AsyncIterator[bytes], outbox: _StreamOutbox, peer: str) -> None:
        answering: set[asyncio.Task[None]] = set()
        try:
            async for message in request_iterator:
                await outbox.slots.acquire()  # given back once this request's reply is written
                task = asyncio.ensure_future(self._answer(message, outbox, peer))
                answering.add(task)
                task.add_done_callback(answering.discard)
            if answering:
                await asyncio.gather(*answering, return_exceptions=True)
        finally:
            for task in answering:  # the stream is gone (or ended early): nobody will read these replies
                task.cancel()
            outbox.queue.put_nowait(None)

    async def _answer(self, message: bytes, outbox: _StreamOutbox, peer: str) -> None:
        """Answer one request frame with exactly one reply in `outbox` (which keeps the frame's slot until
        the reply is written)."""
        try:
            header, tensors = await self._reply_to(message, peer)
        except BaseException:  # cancelled with the stream: no reply, give the slot back
            outbox.slots.release()
            raise
        parts, length = pack_parts(header, tensors)
        outbox.put(grpc_data.envelope(parts, length))

    async def _reply_to(self, message: bytes, peer: str) -> ReplyFrame:
        server = self.server
        node = server.config.node_id
        frame: memoryview | None = None
        try:
            frame = grpc_data.open_envelope(message)
            if server.limits is None:
                raise PeerError(node, "no experts loaded yet")
            header, tensors = unpack(frame, server.limits)
        except (FrameError, PeerError) as exc:
            seq = packed_frame_seq(frame) if frame is not None else UNKNOWN
            log.warning("bad frame from %s (seq %d): %s", peer, seq, exc)
            return refusal(str(exc), node, seq)
        return await answer(server.submit, node, header, tensors, peer)


class _StreamOutbox:
    """The replies of one Exchange stream waiting to be written, and the slots that bound them."""

    def __init__(self, server: FfnNodeServer, slots: int) -> None:
        self.server = server
        self.slots = asyncio.Semaphore(slots)
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        """At most `slots` replies (each holds its slot) and the end marker None."""
        self.closed = False

    def put(self, reply: bytes) -> None:
        if self.closed:  # the stream is gone: drop the reply and its slot
            self.slots.release()
            return
        self.server.queued_reply_bytes += len(reply)
        self.queue.put_nowait(reply)

    def written(self, reply: bytes) -> None:
        """`reply` left the queue (written, or the write failed): its slot is free again."""
        self.server.queued_reply_bytes -= len(reply)
        self.slots.release()

    def close(self) -> None:
        """The stream ended: forget the replies nobody will write."""
        self.closed = True
        while not self.queue.empty():
            reply = self.queue.get_nowait()
            if reply is not None:
                self.written(reply)
