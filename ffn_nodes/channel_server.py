"""The channel door of an FFN node: frames arriving on one pairwise channel (gloo, shm, NCCL), answered.

A receive thread reads frames and answers each (ffn_nodes/answers.py, the same error mapping as the gRPC
door, without the event loop in between). On an idle node the receive thread computes the frame itself
(Batcher.compute_here) and, when no earlier reply still waits, sends the reply too: a lone attention node's
frame then crosses no thread inside the node. Otherwise the frame queues for the batch thread and a send
thread writes its reply once it is computed, earlier replies first. At most `max_in_flight_per_stream`
replies wait, so a peer that stops reading holds back only its own channel. An unexpected exception in
either thread stops the node (FfnNodeServer.fail): a live-looking node whose channel threads died would
never answer again.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from afd.errors import PeerError
from afd.transport.backends import ChannelOffer
from afd.transport.channel import Channel, ChannelTimeout
from afd.wire.frames import FrameError, FrameHeader, decode_header
from ffn_nodes.answers import ReplyFrame, answer_threadsafe, refusal

if TYPE_CHECKING:
    from ffn_nodes.server import FfnNodeServer

log = logging.getLogger("ffn_nodes.server")


class ChannelServer:
    """Serves one attention node's channel until either end closes it."""

    def __init__(self, server: FfnNodeServer, peer: str, offer: ChannelOffer) -> None:
        self.server = server
        self.peer = peer
        self.offer = offer
        self.channel: Channel | None = None
        self._stop = threading.Event()
        self._replies: queue.Queue[concurrent.futures.Future[ReplyFrame] | None] = queue.Queue(
            server.config.max_in_flight_per_stream
        )
        self._threads: list[threading.Thread] = []
        self._send_lock = threading.Lock()
        """One reply on the channel at a time (the receive thread sends too; not every backend allows two)."""

    def start(self) -> None:
        thread = threading.Thread(
            target=self._guarded(self._receive, "receive"), name=f"channel-recv-{self.peer}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _guarded(self, body: Callable[[], None], role: str) -> Callable[[], None]:
        """`body` as a thread target whose unexpected exception stops the node (FfnNodeServer.fail), unless
        the channel is being stopped anyway (a blocked call interrupted by close)."""

        def run() -> None:
            try:
                body()
            except Exception as exc:
                if self._stop.is_set():
                    log.debug("channel %s thread of %s ended while stopping: %s", role, self.peer, exc)
                    return
                self.stop()
                self.server.fail(exc, f"the {role} thread of the channel from {self.peer}")

        return run

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._replies.put_nowait(None)
        if self.channel is not None:
            with contextlib.suppress(Exception):
                self.channel.close()

    def _receive(self) -> None:
        node = self.server.config.node_id
        try:
            self.channel = self.offer.connect()
        except Exception:
            log.exception("channel from %s could not be connected", self.peer)
            return
        sender = threading.Thread(
            target=self._guarded(self._send, "send"), name=f"channel-send-{self.peer}", daemon=True
        )
        self._threads.append(sender)
        sender.start()
        poll = self.server.config.channel_poll_s

        decoded: list[FrameHeader] = []
        """The header `specs` decoded for the frame being received (so it is decoded once, not twice)."""

        def specs(header: bytes) -> list[Any]:
            limits = self.server.limits
            if limits is None:
                raise PeerError(node, "no experts loaded yet")
            decoded[:] = [decode_header(header, limits)]
            return decoded[0].tensor_specs()

        while not self._stop.is_set():
            try:
                header_bytes, tensors = self.channel.recv(specs, poll)
            except ChannelTimeout:
                continue  # idle: no frame within the poll interval
            except FrameError as exc:  # the header itself is bad: which request it was is unknown
                log.warning("bad frame on channel from %s: %s", self.peer, exc)
                self._put(_settled(refusal(str(exc), node)))
                continue
            except PeerError:
                log.info("channel from %s closed", self.peer)
                break
            header = decoded[0]
            if header.limits is not self.server.limits:  # LoadExperts changed them between recv and now
                try:
                    assert self.server.limits is not None
                    header = decode_header(header_bytes, self.server.limits)
                except FrameError as exc:
                    self._put(_settled(refusal(str(exc), node)))
                    continue
            reply = answer_threadsafe(self.server.compute_here, node, header, tensors, self.peer)
            if reply.done() and self._replies.empty():
                if not self._send_reply(reply):
                    break
            else:
                self._put(reply)
        self.stop()

    def _put(self, reply: concurrent.futures.Future[ReplyFrame]) -> None:
        while not self._stop.is_set():
            try:
                self._replies.put(reply, timeout=self.server.config.channel_poll_s)
                return
            except queue.Full:
                continue

    def _send(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self._replies.get(timeout=self.server.config.channel_poll_s)
            except queue.Empty:
                continue
            if reply is None or not self._send_reply(reply):
                return

    def _send_reply(self, reply: concurrent.futures.Future[ReplyFrame]) -> bool:
        """Send `reply` once settled (every request settles, on stop as a refusal); False once the channel is
        gone or failed (the door then stops)."""
        frame = reply.result()
        with self._send_lock:
            if self.channel is None:
                return False
            try:
                self.channel.send(*frame)
            except PeerError as exc:
                log.info("channel to %s failed: %s", self.peer, exc)
                self.stop()
                return False
        return True


def _settled(frame: ReplyFrame) -> concurrent.futures.Future[ReplyFrame]:
    future: concurrent.futures.Future[ReplyFrame] = concurrent.futures.Future()
    future.set_result(frame)
    return future
