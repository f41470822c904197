"""A node's attachment to the router: register with retry, heartbeat (registering again when the router
forgot the node), leave, and report failures. Attention and FFN nodes attach the same way; what they
report and how they act on a heartbeat's answer is theirs (the callbacks).

Registration retries while the router is unreachable (it may start after the node) but not when it
refuses: a wrong cluster token or another checkpoint is a ConfigError at once, naming the reason.
A heartbeat answered NOT_FOUND means the router restarted or declared this node dead: the node registers
again, unless it is leaving. No heartbeat waits on anything but the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio

from afd.errors import ConfigError
from afd.wire.auth import ClusterAuth
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc

log = logging.getLogger("afd.attachment")

REGISTER_RPC_TIMEOUT_S = 10.0
RETRY_INTERVAL_S = 0.5
_REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT)


class RouterAttachment:
    """The control-plane link of one node to the router at `router` (host:port)."""

    def __init__(self, router: str, auth: ClusterAuth, node_id: str) -> None:
        self.router = router
        self.node_id = node_id
        self.interval_s = 1.0
        """Heartbeat interval, as the router asked at registration."""
        self.leaving = False
        """Set when the node leaves or fails: it must not register again."""
        self._channel = auth.aio_channel(router)
        self.stub = pb_grpc.RouterStub(self._channel)

    async def register(self, request: pb.RegisterRequest, timeout_s: float) -> pb.RegisterResponse:
        """Register, retrying for `timeout_s` while the router is unreachable; ConfigError if it refuses."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                response = await self.stub.Register(request, timeout=REGISTER_RPC_TIMEOUT_S)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _REFUSALS:
                    raise ConfigError(f"the router refused registration: {exc.details()}") from exc
                if time.monotonic() > deadline:
                    raise ConfigError(f"router {self.router} unreachable: {exc.details()}") from exc
                await asyncio.sleep(RETRY_INTERVAL_S)
        self.interval_s = max(0.05, response.heartbeat_interval_ms / 1000)
        return response

    async def heartbeats(
        self,
        beat: Callable[[], pb.HeartbeatRequest],
        on_response: Callable[[pb.HeartbeatResponse], Awaitable[None]],
        registration: Callable[[], pb.RegisterRequest],
        on_registered: Callable[[pb.RegisterResponse], Awaitable[None]],
    ) -> None:
        """Heartbeat every `interval_s` until cancelled.

        beat: the request of this heartbeat (load, state, placement version); on_response: what the node
        does with the router's answer; registration / on_registered: how it registers again when forgotten.
        """
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                response = await self.stub.Heartbeat(beat(), timeout=max(2.0, 3 * self.interval_s))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND and not self.leaving:
                    log.warning("router forgot node %s; registering again", self.node_id)
                    try:
                        await on_registered(await self.register(registration(), REGISTER_RPC_TIMEOUT_S))
                    except ConfigError as error:
                        log.warning("registering again failed: %s", error)
                elif exc.code() != grpc.StatusCode.NOT_FOUND:
                    log.warning("heartbeat failed: %s", exc.details())
                continue
            await on_response(response)

    async def leave(self, reason: str, timeout_s: float) -> None:
        """Tell the router this node goes (it moves an FFN node's experts first); errors are only logged."""
        self.leaving = True
        try:
            await self.stub.Leave(pb.LeaveRequest(node_id=self.node_id, reason=reason), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not leave the router cleanly: %s", exc.details())

    async def report_failure(
        self, peer: str, error: str, timeout_s: float, degraded: bool = False
    ) -> pb.Placement | None:
        """Report that `peer` (this node itself, or an FFN node it talks to) failed, or with `degraded` that
        it answers late (a straggler); the router's placement without it, or None if the router could not be
        told."""
        report = pb.PeerFailureReport(reporter_id=self.node_id, peer_id=peer, error=error, degraded=degraded)
        try:
            response = await self.stub.ReportPeerFailure(report, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not report the failure of %s to the router: %s", peer, exc.details())
            return None
        return response.placement

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._channel.close(grace=None)
