"""An FFN node in a cluster: the FFN server attached to the router (afd/router_attachment.py), and the
`afd node ffn` process.

The router tells the node what to hold with LoadExperts; the node reports its speed at registration
(a short calibration on its own hardware), its load in heartbeats, and on SIGTERM asks the router to
move its experts elsewhere before it stops serving. Without a router (a placement file instead) the node
serves that placement on its own, for benchmarks and tests that drive FFN nodes directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from afd.checkpoint import CheckpointReader
from afd.devices import DeviceInfo, synchronize
from afd.dtypes import resolve_dtype
from afd.model_spec import ModelSpec, model_fingerprint
from afd.node_lifecycle import run_until_signal
from afd.router_attachment import RouterAttachment
from afd.tensor_names import TensorNames
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.placement_proto import placement_from_proto
from ffn_nodes.experts import ClampedSwigluExperts, StackedExperts
from ffn_nodes.limited_swiglu import LimitedSwigluExperts
from ffn_nodes.server import FfnNodeServer, FfnServerConfig
from ffn_nodes.shard import load_fused_experts, load_stacked_experts

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
        self.router: RouterAttachment | None = None
        self._capacity = pb.CapacityProfile()
        self._heartbeat_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Future] = set()

    @property
    def advertised(self) -> str:
        return f"{self.attachment.advertise_host or self.config.host}:{self.port}"

    @property
    def leaving(self) -> bool:
        return self.router is not None and self.router.leaving

    async def after_start(self) -> None:
        self._capacity = await asyncio.to_thread(self._measure_capacity)
        self.router = RouterAttachment(self.attachment.router, self.config.auth, self.config.node_id)
        await self.router.register(self._registration(), self.attachment.register_timeout_s)
        self._heartbeat_task = asyncio.ensure_future(
            self.router.heartbeats(self._beat, self._on_heartbeat, self._registration, self._registered)
        )
        self._heartbeat_task.add_done_callback(self._heartbeats_ended)

    def _registration(self) -> pb.RegisterRequest:
        return pb.RegisterRequest(
            node_id=self.config.node_id,
            role=pb.ROLE_FFN,
            address=self.advertised,
            capacity=self._capacity,
            transports=["grpc", *sorted(self.acceptors)],
            model_fingerprint=model_fingerprint(self.config.model_dir),
        )

    async def _registered(self, response: pb.RegisterResponse) -> None:
        """Registered again: the router sends what to hold with LoadExperts, nothing to do here."""

    def _heartbeats_ended(self, task: asyncio.Task) -> None:
        """Heartbeats only end by cancellation (shutdown); a node that stopped them otherwise would be
        declared dead by the router while looking alive here, so that is a failure of the node."""
        if task.cancelled() or task.exception() is None:
            return
        self.fail(task.exception() or RuntimeError("heartbeats ended"), "the heartbeat loop")

    def _measure_capacity(self) -> pb.CapacityProfile:
        spec = ModelSpec.from_pretrained(self.config.model_dir)
        dtype = resolve_dtype(self.config.dtype, spec.dtype)
        device = self.config.compute_device
        info = DeviceInfo.of(device)
        return pb.CapacityProfile(
            device_kind=info.name,  # "NVIDIA H200", "cpu (8 threads)"
            device_memory_bytes=info.memory_bytes,
            device_count=1,
            ffn_us_per_token_expert=ffn_us_per_token_expert(self.config.model_dir, spec, dtype, device=device),
        )

    def _beat(self) -> pb.HeartbeatRequest:
        # the shard first: the load is of this shard's experts (take_load reads self.shard again, the same one
        # unless a LoadExperts lands in between, which the router then maps by the version sent here)
        shard = self.shard
        return pb.HeartbeatRequest(
            node_id=self.config.node_id,
            state=pb.NODE_STATE_DRAINING if self.leaving else pb.NODE_STATE_READY,
            load=self.batcher.take_load(shard, reset=True),
            placement_version=shard.placement.version if shard is not None else -1,
        )

    async def _on_heartbeat(self, response: pb.HeartbeatResponse) -> None:
        shard = self.shard
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
        router = self.router
        if router is None:
            return
        router.leaving = True
        task = self._heartbeat_task
        if self.failure is not None:
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await router.report_failure(
                self.config.node_id, str(self.failure), self.attachment.failure_report_timeout_s
            )
        else:
            await router.leave("shutting down", self.attachment.leave_timeout_s)
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await router.close()


@torch.inference_mode()
def ffn_us_per_token_expert(
    model_dir: str | Path,
    spec: ModelSpec,
    dtype: torch.dtype,
    tokens: int = 16,
    device: torch.device | None = None,
) -> float:
    """Microseconds for one token through one routed expert (or through the whole dense MLP of layer 0), on
    `device` (None: the CPU) through the path the node computes with there; an accelerator is synchronised
    around each timed call, so the time is the device's, not the host's queueing."""
    device = device or torch.device("cpu")
    reader = CheckpointReader(model_dir, dtype=dtype, device=device)
    names = TensorNames(spec)
    layer = next((i for i, spec_layer in enumerate(spec.layers) if spec_layer.moe is not None), 0)
    moe = spec.layers[layer].moe
    experts: StackedExperts | ClampedSwigluExperts | LimitedSwigluExperts
    if names.fused_experts(layer) is not None:  # gpt-oss stacks its experts in one tensor per projection
        experts = load_fused_experts(reader, names, spec, layer, (0,))
    elif names.stacked_experts(layer) is not None:  # Step-3.5: one tensor per projection, one row per expert
        experts = load_stacked_experts(reader, names, spec, layer, (0,))
    else:
        n = names.expert(layer, 0) if moe is not None else names.dense_mlp(layer)
        gate, up, down = reader.get(n.gate), reader.get(n.up), reader.get(n.down)
        experts = StackedExperts(torch.cat((gate, up)).unsqueeze(0), down.unsqueeze(0), strategy="looped")
    hidden = (torch.randn(tokens, spec.hidden_size, dtype=dtype) * 0.1).to(device)
    ids = torch.zeros(tokens, 1, dtype=torch.int32, device=device)
    weights = torch.ones(tokens, 1, device=device)
    out = torch.zeros_like(hidden)
    best = float("inf")
    for _ in range(5):  # the best of 5: the first also warms up (kernel loading, the CPU tuner)
        synchronize(device)
        start = time.perf_counter()
        experts.forward(hidden, ids, weights, out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best * 1e6 / tokens


async def run_ffn_node(
    config: FfnServerConfig, attachment: ClusterAttachment | None, ready_file: Path | None = None
) -> None:
    """The `afd node ffn` process: attached to the router, or (attachment None) serving config.placement
    on its own; until a signal (the first one leaves the router gracefully, as shutdown does)."""
    node = FfnClusterNode(config, attachment) if attachment is not None else FfnNodeServer(config)
    await run_until_signal(node, lambda: {"port": node.port or 0}, ready_file)
