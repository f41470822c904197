"""An FFN node in a cluster: the FFN server plus the router protocol (register, heartbeat, leave).

The router tells the node what to hold with LoadExperts; the node reports its speed at registration
(a short calibration on its own hardware), its load in heartbeats, and on SIGTERM asks the router to
move its experts elsewhere before it stops serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import torch

from afd.checkpoint import CheckpointReader
from afd.dtypes import resolve_dtype
from afd.errors import ConfigError
from afd.model_spec import ModelSpec, model_fingerprint
from afd.tensor_names import TensorNames
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from afd.wire.placement_proto import placement_from_proto
from ffn_nodes.experts import StackedExperts
from ffn_nodes.server import FfnNodeServer, FfnServerConfig

log = logging.getLogger("afd.ffn")


@dataclass(frozen=True, slots=True)
class ClusterAttachment:
    """How an FFN node joins a cluster."""

    router: str
    """Router control-plane address host:port."""
    advertise_host: str | None = None
    """Host attention nodes reach this node at; the bind host when None."""
    register_timeout_s: float = 120.0
    """How long to retry reaching the router at start-up."""
    leave_timeout_s: float = 120.0
    """How long a graceful leave waits for the router to move this node's experts."""
    failure_report_timeout_s: float = 10.0
    """How long a failed node waits for the router to take its report before it exits."""


class FfnClusterNode(FfnNodeServer):
    def __init__(self, config: FfnServerConfig, attachment: ClusterAttachment) -> None:
        super().__init__(config)
        self.attachment = attachment
        self._router_channel: grpc.aio.Channel | None = None
        self._router: pb_grpc.RouterStub | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._interval = 1.0
        self.leaving = False
        self._tasks: set[asyncio.Future] = set()

    @property
    def advertised(self) -> str:
        return f"{self.attachment.advertise_host or self.config.host}:{self.port}"

    async def after_start(self) -> None:
        capacity = await asyncio.to_thread(self._measure_capacity)
        self._router_channel = self.config.auth.aio_channel(self.attachment.router)
        self._router = pb_grpc.RouterStub(self._router_channel)
        request = pb.RegisterRequest(
            node_id=self.config.node_id,
            role=pb.ROLE_FFN,
            address=self.advertised,
            capacity=capacity,
            transports=["grpc", *sorted(self.acceptors)],
            model_fingerprint=model_fingerprint(self.config.model_dir),
        )
        deadline = time.monotonic() + self.attachment.register_timeout_s
        while True:
            try:
                response = await self._router.Register(request, timeout=10)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
                    raise ConfigError(f"the router refused registration: {exc.details()}") from exc
                if time.monotonic() > deadline:
                    raise ConfigError(f"router {self.attachment.router} unreachable: {exc.details()}") from exc
                await asyncio.sleep(0.5)
        self._interval = max(0.05, response.heartbeat_interval_ms / 1000)
        self._heartbeat_task = asyncio.ensure_future(self._heartbeats(request))
        self._heartbeat_task.add_done_callback(self._heartbeats_ended)

    def _heartbeats_ended(self, task: asyncio.Task) -> None:
        """Heartbeats only end by cancellation (shutdown); a node that stopped them otherwise would be
        declared dead by the router while looking alive here, so that is a failure of the node."""
        if task.cancelled() or task.exception() is None:
            return
        self.fail(task.exception() or RuntimeError("heartbeats ended"), "the heartbeat loop")

    def _measure_capacity(self) -> pb.CapacityProfile:
        spec = ModelSpec.from_pretrained(self.config.model_dir)
        dtype = resolve_dtype(self.config.dtype, spec.dtype)
        memory = 0
        with contextlib.suppress(ValueError, OSError, AttributeError):
            import os

            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return pb.CapacityProfile(
            device_kind=f"cpu ({torch.get_num_threads()} threads)",
            device_memory_bytes=int(memory),
            device_count=1,
            ffn_us_per_token_expert=ffn_us_per_token_expert(self.config.model_dir, spec, dtype),
        )

    async def _heartbeats(self, register: pb.RegisterRequest) -> None:
        assert self._router is not None
        while True:
            await asyncio.sleep(self._interval)
            shard = self.shard
            request = pb.HeartbeatRequest(
                node_id=self.config.node_id,
                state=pb.NODE_STATE_DRAINING if self.leaving else pb.NODE_STATE_READY,
                load=self.take_load(reset=True),
                placement_version=shard.placement.version if shard is not None else -1,
            )
            try:
                response = await self._router.Heartbeat(request, timeout=max(2.0, 3 * self._interval))
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND and not self.leaving:
                    log.warning("router forgot FFN node %s; registering again", self.config.node_id)
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await self._router.Register(register, timeout=10)
                else:
                    log.warning("heartbeat failed: %s", exc.details())
                continue
            if response.HasField("placement") and self.config.node_id in [n.node_id for n in response.placement.nodes]:
                placement, _ = placement_from_proto(response.placement)
                if shard is None or placement.version > shard.placement.version:
                    await self.load_experts(placement)
            if response.drain and not self.leaving:
                asyncio.get_running_loop().call_soon(self._request_stop)

    def _request_stop(self) -> None:
        task = asyncio.ensure_future(self.shutdown())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def before_shutdown(self) -> None:
        """Ask the router to move this node's experts first, while this node still serves.

        A failed node (see FfnNodeServer.fail) cannot serve while they move: it stops its heartbeats (which
        would register it again) and reports itself dead, so the router re-places its experts at once
        rather than after the heartbeat timeout.
        """
        self.leaving = True
        if self.failure is not None:
            await self._report_own_failure(self.failure)
        elif self._router is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._router.Leave(
                    pb.LeaveRequest(node_id=self.config.node_id, reason="shutting down"),
                    timeout=self.attachment.leave_timeout_s,
                )
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            with contextlib.suppress(BaseException):
                await self._heartbeat_task
        if self._router_channel is not None:
            await self._router_channel.close(grace=None)

    async def _report_own_failure(self, failure: BaseException) -> None:
        task = self._heartbeat_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        if self._router is None:
            return
        report = pb.PeerFailureReport(reporter_id=self.config.node_id, peer_id=self.config.node_id, error=str(failure))
        try:
            await self._router.ReportPeerFailure(report, timeout=self.attachment.failure_report_timeout_s)
        except grpc.aio.AioRpcError as exc:  # the router declares it dead after its heartbeat timeout anyway
            log.warning("could not report this node's failure to the router: %s", exc.details())


@torch.inference_mode()
def ffn_us_per_token_expert(model_dir: str | Path, spec: ModelSpec, dtype: torch.dtype, tokens: int = 16) -> float:
    """Microseconds for one token through one routed expert (or through the whole dense MLP of layer 0)."""
    reader = CheckpointReader(model_dir, dtype=dtype)
    names = TensorNames(spec)
    layer = next((i for i, spec_layer in enumerate(spec.layers) if spec_layer.moe is not None), 0)
    moe = spec.layers[layer].moe
    n = names.expert(layer, 0) if moe is not None else names.dense_mlp(layer)
    gate, up, down = reader.get(n.gate), reader.get(n.up), reader.get(n.down)
    experts = StackedExperts(torch.cat((gate, up)).unsqueeze(0), down.unsqueeze(0), strategy="looped")
    hidden = torch.randn(tokens, spec.hidden_size, dtype=dtype) * 0.1
    ids = torch.zeros(tokens, 1, dtype=torch.int32)
    weights = torch.ones(tokens, 1)
    out = torch.zeros_like(hidden)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        experts.forward(hidden, ids, weights, out)
        best = min(best, time.perf_counter() - start)
    return best * 1e6 / tokens


async def run_ffn_node(config: FfnServerConfig, attachment: ClusterAttachment, ready_file: Path | None = None) -> None:
    node = FfnClusterNode(config, attachment)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node._request_stop)
    try:
        await node.start()
        if ready_file is not None:
            ready_file.write_text(str(node.port))
        await node.serve()
    finally:
        await node.shutdown()
