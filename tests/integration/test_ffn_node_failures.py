"""An FFN node under churn and faults: placement changes racing compute, a core loop that fails, a peer that
stops reading. Each server runs in this process (tests/cluster_helpers.ffn_server_in_thread) on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.transport.grpc_transport import GrpcTransport, GrpcTransportConfig
from afd.wire import grpc_data
from afd.wire.event_loop import EventLoopThread
from afd.wire.frames import OutOfRange, encode_request, pack
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from ffn_nodes.batching import StalePlacementError
from ffn_nodes.node import ClusterAttachment, FfnClusterNode
from ffn_nodes.server import FfnNodeServer, FfnServerConfig, NodeFailure
from tests.cluster_helpers import READY_TIMEOUT_S, ffn_server_in_thread

NODE = "ffn-0"
REPLY_TIMEOUT_S = 10.0
"""Longer than any batch of these tiny requests takes on a loaded 2-core machine: no reply by then is a hang."""


def _request(spec: ModelSpec, shard_local: int, version: int, tokens: int, gen: torch.Generator) -> FfnRequest:
    moe = spec.moe(0)
    assert moe is not None
    ids = torch.randint(-1, shard_local, (tokens, moe.top_k), generator=gen, dtype=torch.int32)
    weights = torch.where(ids >= 0, torch.rand(tokens, moe.top_k, generator=gen), 0.0)
    request = FfnRequest(0, torch.randn(tokens, spec.hidden_size, generator=gen), ids, weights)
    request.placement_version = version
    return request


def _local(server: FfnNodeServer) -> tuple[int, int]:
    """(version, local expert count) of the server's current shard."""
    shard = server.shard
    assert shard is not None
    return shard.placement.version, len(shard.placement.experts[shard.placement.index(NODE)])


@pytest.fixture
def qwen3(tiny_checkpoint) -> tuple[Path, ModelSpec]:
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    assert spec.num_experts == 8  # alone the node holds 8 experts, beside ffn-1 it holds 4
    return directory, spec


def test_placement_changes_under_load_never_stop_the_node(qwen3) -> None:
    """Issue 15 (1): the share flips between 8 and 4 local experts while frames stream in and the load is
    taken (reset) all the time; every request must be answered (a result, or a stale-placement error when
    two changes overtook it), and the batch loop must live on."""
    directory, spec = qwen3
    churn_s, switch_s = 10.0, 0.03
    config = FfnServerConfig(directory, NODE, ExpertPlacement.balanced(spec.num_experts, [NODE], version=1))
    with ffn_server_in_thread(config) as server:
        assert server._loop is not None
        outcome: dict[str, int] = {"answered": 0, "stale": 0, "switches": 0, "loads": 0}

        async def client(index: int, until: float) -> None:
            gen = torch.Generator().manual_seed(index)
            while time.monotonic() < until:
                version, local = _local(server)
                request = _request(spec, local, version, tokens=1, gen=gen)
                try:
                    await asyncio.wait_for(server.submit(request), REPLY_TIMEOUT_S)
                    outcome["answered"] += 1
                except (StalePlacementError, OutOfRange):
                    outcome["stale"] += 1
                except TimeoutError:
                    died = server.batcher.failure
                    raise AssertionError(f"no reply within {REPLY_TIMEOUT_S} s; batch loop died of {died!r}") from None

        async def placements(until: float) -> None:
            version = 1
            while time.monotonic() < until:
                version += 1
                nodes = [NODE] if version % 2 else [NODE, "ffn-1"]
                await server.load_experts(ExpertPlacement.balanced(spec.num_experts, nodes, version=version))
                outcome["switches"] += 1
                await asyncio.sleep(switch_s)

        async def loads(until: float) -> None:
            while time.monotonic() < until:
                server.take_load(reset=True)
                outcome["loads"] += 1
                await asyncio.sleep(0.05)

        async def churn() -> None:
            until = time.monotonic() + churn_s
            await asyncio.gather(*(client(i, until) for i in range(96)), placements(until), loads(until))

        asyncio.run_coroutine_threadsafe(churn(), server._loop).result(churn_s + 3 * REPLY_TIMEOUT_S)
        assert server.batcher.alive, server.batcher.failure
        assert outcome["switches"] >= 10 and outcome["answered"] > 100, outcome


def test_taking_the_load_while_computing_loses_no_counts(qwen3) -> None:
    """take_load(reset=True) racing the compute thread: the periods' counts add up to everything computed."""
    directory, spec = qwen3
    config = FfnServerConfig(directory, NODE, ExpertPlacement.balanced(spec.num_experts, [NODE, "ffn-1"]))
    with ffn_server_in_thread(config) as server:
        assert server._loop is not None
        version, local = _local(server)
        server.take_load(reset=True)  # start from zero
        pairs = 0
        counted: list[int] = []

        async def client(index: int) -> None:
            nonlocal pairs
            gen = torch.Generator().manual_seed(index)
            for _ in range(60):
                request = _request(spec, local, version, tokens=1 + index % 4, gen=gen)
                await asyncio.wait_for(server.submit(request), REPLY_TIMEOUT_S)
                assert request.expert_ids is not None
                pairs += int((request.expert_ids >= 0).sum())

        async def loads(done: asyncio.Event) -> None:
            while not done.is_set():
                counted.append(sum(server.take_load(reset=True).expert_token_counts))
                # not sleep(0): a loop that never idles holds the GIL and starves the batch thread it races
                await asyncio.sleep(0.001)

        async def scenario() -> None:
            done = asyncio.Event()
            taker = asyncio.ensure_future(loads(done))
            await asyncio.gather(*(client(i) for i in range(16)))
            done.set()
            await taker
            counted.append(sum(server.take_load(reset=True).expert_token_counts))

        asyncio.run_coroutine_threadsafe(scenario(), server._loop).result(60)
        assert len(counted) > 10
        assert sum(counted) == pairs


def test_an_unexpected_error_in_the_batch_loop_stops_the_node_loudly(qwen3, caplog) -> None:
    """A bug in the node's core loop: pending requests get error replies (not a hang), health turns
    NOT_SERVING, and serve() raises NodeFailure so the process exits non-zero."""
    directory, spec = qwen3
    placement = ExpertPlacement.balanced(spec.num_experts, [NODE])
    server = FfnNodeServer(FfnServerConfig(directory, NODE, placement))
    loop = EventLoopThread("ffn-failure")
    loop.start()
    transport: GrpcTransport | None = None
    try:
        loop.run(server.start(), READY_TIMEOUT_S)
        assert loop.loop is not None
        serving = asyncio.run_coroutine_threadsafe(server.serve(), loop.loop)
        transport = GrpcTransport.for_model(
            spec, {NODE: server.address}, GrpcTransportConfig(sender="attn-0", timeout_s=60.0)
        )
        gen = torch.Generator().manual_seed(0)
        assert transport.combine(transport.dispatch({NODE: _request(spec, 8, 0, 2, gen)}))[NODE].shape == (2, 64)

        def broken(*args: object) -> list[torch.Tensor | Exception]:
            raise RuntimeError("injected bug")

        server.batcher._timed_compute = broken  # type: ignore[method-assign]
        started = time.monotonic()
        pending = [transport.dispatch({NODE: _request(spec, 8, 0, 2, gen)}) for _ in range(3)]
        errors = []
        for handle in pending:
            with pytest.raises(PeerError) as raised:
                transport.combine(handle)
            errors.append(str(raised.value))
        assert time.monotonic() - started < REPLY_TIMEOUT_S, "the replies came only at the transport's timeout"
        assert "injected bug" in errors[0], errors
        with pytest.raises(NodeFailure, match="injected bug"):
            serving.result(REPLY_TIMEOUT_S)
        assert any("injected bug" in (r.exc_text or "") for r in caplog.records), "logged with its traceback"

        async def health() -> int:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status

        with pytest.raises(grpc.aio.AioRpcError):  # stopped: the port no longer answers
            loop.run(health(), 10)
    finally:
        if transport is not None:
            transport.close()
        loop.run(server.shutdown(), 30)
        loop.stop()


def test_a_peer_that_never_reads_cannot_grow_the_reply_queue(qwen3) -> None:
    """Issue 15 (9): a peer sends many frames on one stream and reads nothing; the node stops reading that
    stream after its in-flight slots (whose replies are not yet written), and other streams are served."""
    directory, spec = qwen3
    slots, frames_sent = 4, 150
    config = FfnServerConfig(
        directory, NODE, ExpertPlacement.balanced(spec.num_experts, [NODE]), max_in_flight_per_stream=slots
    )
    tokens = 4096  # about 1 MiB per reply: gRPC's own buffers hold only a few of them
    gen = torch.Generator().manual_seed(3)
    frame = grpc_data.envelope_bytes(pack(*encode_request(_request(spec, 8, 0, tokens, gen), 7, "attn-stuck")))
    with ffn_server_in_thread(config) as server:
        assert server._loop is not None

        async def stuck_peer(written: list[int]) -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                call = grpc_data.exchange_call(channel)()
                for _ in range(frames_sent):
                    await call.write(frame)  # blocks once the node stops reading: back-pressure
                    written[0] += 1

        written = [0]
        stuck = asyncio.run_coroutine_threadsafe(stuck_peer(written), server._loop)
        deadline = time.monotonic() + 30
        settled, last = 0, -1
        while time.monotonic() < deadline and settled < 10:  # until the node computed nothing new for 1 s
            now = server.batcher.counters.requests
            settled = settled + 1 if now == last else 0
            last = now
            time.sleep(0.1)
        computed = server.batcher.counters.requests
        try:
            assert computed <= 4 * slots + 16, f"computed {computed} of {written[0]} frames nobody reads"
            assert 0 < server.queued_reply_bytes <= slots * len(frame)  # a reply is smaller than its request
            other = GrpcTransport.for_model(spec, {NODE: server.address}, GrpcTransportConfig(sender="attn-1"))
            try:
                request = _request(spec, 8, 0, 3, gen)
                assert other.combine(other.dispatch({NODE: request}))[NODE].shape == (3, spec.hidden_size)
            finally:
                other.close()
        finally:
            stuck.cancel()


class _StubRouter(pb_grpc.RouterServicer):
    """Records what an FFN node tells the router."""

    def __init__(self) -> None:
        self.heartbeats = 0
        self.failures: list[pb.PeerFailureReport] = []
        self.leaves: list[str] = []

    async def Register(self, request: pb.RegisterRequest, context: object) -> pb.RegisterResponse:
        return pb.RegisterResponse(heartbeat_interval_ms=100)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: object) -> pb.HeartbeatResponse:
        self.heartbeats += 1
        return pb.HeartbeatResponse()

    async def Leave(self, request: pb.LeaveRequest, context: object) -> pb.LeaveResponse:
        self.leaves.append(request.node_id)
        return pb.LeaveResponse()

    async def ReportPeerFailure(self, request: pb.PeerFailureReport, context: object) -> pb.PeerFailureResponse:
        self.failures.append(request)
        return pb.PeerFailureResponse()


def test_a_failed_cluster_node_reports_itself_dead_and_stops_heartbeating(qwen3) -> None:
    """FfnClusterNode: a core failure is reported to the router at once (not a graceful Leave, which would
    wait for experts to move off a node that cannot serve), heartbeats stop, and serve() raises."""
    directory, spec = qwen3
    stub = _StubRouter()
    loop = EventLoopThread("ffn-cluster-failure")
    loop.start()

    async def start_router() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()  # on the loop it serves from
        pb_grpc.add_RouterServicer_to_server(stub, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    router, router_port = loop.run(start_router(), 10)
    config = FfnServerConfig(directory, NODE, ExpertPlacement.balanced(spec.num_experts, [NODE]))
    node = FfnClusterNode(config, ClusterAttachment(router=f"127.0.0.1:{router_port}"))
    try:
        loop.run(node.start(), READY_TIMEOUT_S)
        assert loop.loop is not None
        serving = asyncio.run_coroutine_threadsafe(node.serve(), loop.loop)
        deadline = time.monotonic() + 10
        while stub.heartbeats < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub.heartbeats >= 2

        def broken(*args: object) -> list[torch.Tensor | Exception]:
            raise RuntimeError("injected bug")

        node.batcher._timed_compute = broken  # type: ignore[method-assign]

        async def one_request() -> None:
            await node.submit(_request(spec, 8, 0, 2, torch.Generator().manual_seed(1)))

        with pytest.raises(PeerError, match="injected bug"):
            loop.run(one_request(), REPLY_TIMEOUT_S)
        with pytest.raises(NodeFailure):
            serving.result(REPLY_TIMEOUT_S)
        assert [(r.reporter_id, r.peer_id) for r in stub.failures] == [(NODE, NODE)]
        assert "injected bug" in stub.failures[0].error and stub.leaves == []
        beats = stub.heartbeats
        time.sleep(0.5)  # five heartbeat intervals: none may come from a stopped node
        assert stub.heartbeats == beats
    finally:
        loop.run(node.shutdown(), 30)
        loop.run(router.stop(None), 10)
        loop.stop()


def test_the_node_process_exits_non_zero_when_its_core_fails(qwen3, tmp_path: Path, monkeypatch) -> None:
    """`afd node ffn`: a failure after start ends serve() and the command exits 2, not 0."""
    from typer.testing import CliRunner

    from orchestration.cli import app

    directory, spec = qwen3
    placement_file = tmp_path / "placement.json"
    placement_file.write_text(json.dumps(ExpertPlacement.balanced(spec.num_experts, [NODE]).to_dict()))

    async def fail_once_started(self: FfnNodeServer) -> None:
        self.fail(RuntimeError("injected bug"), "a test")

    monkeypatch.setattr(FfnNodeServer, "after_start", fail_once_started)
    argv = ["node", "ffn", "--model", str(directory), "--node-id", NODE, "--placement-file", str(placement_file)]
    result = CliRunner().invoke(app, [*argv, "--port", "0", "--insecure"])
    assert result.exit_code == 2, result.output
    assert "injected bug" in result.output
