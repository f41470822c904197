"""The FFN node server: bad frames get ERROR frames while other peers are served; control service; channels."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
import grpc.aio
import msgpack
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.transport.backends import ChannelOffer, ChannelRequest
from afd.transport.grpc_transport import GrpcTransport, GrpcTransportConfig
from afd.wire import frames, grpc_data
from afd.wire.frames import FrameKind, FrameLimits, encode_request, encode_response, pack, unpack
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from afd.wire.placement_proto import placement_to_proto
from ffn_nodes.server import FfnServerConfig
from ffn_nodes.shard import FfnShard
from tests.cluster_helpers import ProcessStartError, ffn_server_in_thread, launch_ffn_server
from tests.engines import uneven_placement
from tests.memory_channel import memory_pair

REPLY_TIMEOUT_S = 30.0


def make_request(spec: ModelSpec, local_experts: int, tokens: int, seed: int, layer: int = 0) -> FfnRequest:
    gen = torch.Generator().manual_seed(seed)
    moe = spec.moe(layer)
    assert moe is not None
    ids = torch.randint(-1, local_experts, (tokens, moe.top_k), generator=gen, dtype=torch.int32)
    weights = torch.where(ids >= 0, torch.rand(tokens, moe.top_k, generator=gen), 0.0)
    return FfnRequest(layer, torch.randn(tokens, spec.hidden_size, generator=gen), ids, weights, microbatch=seed % 3)


async def raw_exchange(address: str, messages: Sequence[bytes]) -> list[bytes]:
    """Send raw serialised DataFrames on one Exchange stream, close it, and collect every reply."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = grpc_data.exchange_call(channel)()
        for message in messages:
            await call.write(message)
        await call.done_writing()
        replies: list[bytes] = []
        while True:
            reply = await asyncio.wait_for(call.read(), REPLY_TIMEOUT_S)
            if reply is grpc.aio.EOF:
                return replies
            replies.append(reply)


def header_with(request: FfnRequest, seq: int, **changes: object) -> bytes:
    header, tensors = encode_request(request, seq, "attn-bad")
    fields = msgpack.unpackb(header, raw=False)
    fields.update(changes)
    return pack(msgpack.packb(fields), tensors)


def test_bad_frames_get_error_frames_and_other_peers_keep_being_served(tiny_checkpoint, tmp_path: Path):
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    placement = uneven_placement(spec, 2)
    node = launch_ffn_server(directory, "ffn-1", placement, tmp_path)
    local = len(placement.experts[1])
    shard = FfnShard.load(directory, placement, "ffn-1")
    limits = FrameLimits.for_model(spec)
    try:
        node.wait_ready()
        good = GrpcTransport.for_model(spec, {"ffn-1": node.address}, GrpcTransportConfig(sender="attn-good"))
        good_requests = [make_request(spec, local, tokens=4, seed=seed) for seed in range(6)]
        good_results: list[torch.Tensor] = []
        errors: list[BaseException] = []

        def good_peer() -> None:  # another attention node, sending valid requests meanwhile
            try:
                for request in good_requests:
                    good_results.append(good.combine(good.dispatch({"ffn-1": request}))["ffn-1"].clone())
            except BaseException as exc:
                errors.append(exc)

        valid = make_request(spec, local, tokens=5, seed=99)
        out_of_range = make_request(spec, local, tokens=2, seed=7)
        assert out_of_range.expert_ids is not None
        out_of_range.expert_ids[0, 0] = local  # one past the node's last local expert
        assert valid.expert_ids is not None and valid.expert_weights is not None
        wider = torch.randn(2, spec.hidden_size + 1)
        wrong_width = FfnRequest(0, wider, valid.expert_ids[:2], valid.expert_weights[:2])
        truncated = pack(*encode_request(valid, 104, "attn-bad"))[:-3]
        response_kind = pack(*encode_response(valid.hidden, 0, 0, 105, "attn-bad"))
        bad = {
            -1: [b"not a DataFrame", grpc_data.envelope_bytes(b"garbage, no magic")],
            101: [grpc_data.envelope_bytes(header_with(valid, 101, layer=spec.num_layers))],
            102: [grpc_data.envelope_bytes(pack(*encode_request(out_of_range, 102, "attn-bad")))],
            103: [grpc_data.envelope_bytes(pack(*encode_request(wrong_width, 103, "attn-bad")))],
            104: [grpc_data.envelope_bytes(truncated)],
            105: [grpc_data.envelope_bytes(response_kind)],
            106: [grpc_data.envelope_bytes(header_with(valid, 106, v=frames.FRAME_VERSION + 1))],
        }
        rng = random.Random(5)
        valid_frame = pack(*encode_request(valid, 200, "attn-bad"))
        flipped = []
        for _ in range(100):  # random damage to the header region
            data = bytearray(valid_frame)
            data[rng.randrange(8, 8 + 40)] ^= 1 << rng.randrange(8)
            flipped.append(grpc_data.envelope_bytes(bytes(data)))
        messages = [m for ms in bad.values() for m in ms] + flipped + [grpc_data.envelope_bytes(valid_frame)]

        thread = threading.Thread(target=good_peer)
        thread.start()
        replies = asyncio.run(raw_exchange(node.address, messages))
        thread.join(REPLY_TIMEOUT_S)
        assert not thread.is_alive() and not errors, errors

        # every message got exactly one reply; each bad one an ERROR frame with the seq when readable
        assert len(replies) == len(messages)
        decoded = [unpack(grpc_data.open_envelope(r), limits) for r in replies]
        error_seqs = sorted(h.seq for h, _ in decoded if h.kind is FrameKind.ERROR)
        for seq in (-1, -1, 101, 102, 103, 104, 105, 106):
            assert seq in error_seqs
        assert error_seqs.count(-1) >= 2
        by_seq = {h.seq: (h, t) for h, t in decoded if h.kind is FrameKind.ERROR}
        assert "expert ids" in (by_seq[102][0].error or "")
        assert "layer" in (by_seq[101][0].error or "")
        # the valid frame after 100+ bad ones is answered correctly (several replies may share seq 200:
        # header bit flips that keep the frame valid, e.g. in the sender name, are real requests)
        answers = [t[0] for h, t in decoded if h.kind is FrameKind.FFN_RESPONSE and h.seq == 200]
        assert answers
        torch.testing.assert_close(answers[-1], shard.compute(valid), atol=1e-5, rtol=1e-5)
        # and the other attention node was served correctly throughout
        assert len(good_results) == len(good_requests)
        for request, result in zip(good_requests, good_results, strict=True):
            torch.testing.assert_close(result, shard.compute(request), atol=1e-5, rtol=1e-5)
        assert node.process.poll() is None, "the node survived"
        good.close()
        node.stop()
        assert node.process.returncode == 0, "SIGTERM is a clean shutdown"
    finally:
        node.stop()


def test_process_refuses_a_placement_without_its_node(tiny_checkpoint, tmp_path: Path):
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    node = launch_ffn_server(directory, "ffn-9", uneven_placement(spec, 2), tmp_path)
    try:
        with pytest.raises(ProcessStartError, match="exited with 2") as caught:
            node.wait_ready()
        assert "ffn-9" in str(caught.value) and "not in the placement" in str(caught.value)
    finally:
        node.stop()


# --------------------------------------------------------------------------------------------------
# In-process server: batching, control service, health, channels
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def qwen3(tiny_checkpoint) -> tuple[Path, ModelSpec, ExpertPlacement]:
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    return directory, spec, uneven_placement(spec, 2)


def test_requests_arriving_together_are_computed_as_one_batch(qwen3):
    directory, spec, placement = qwen3
    config = FfnServerConfig(directory, "ffn-1", placement)
    local = len(placement.experts[1])
    requests = [make_request(spec, local, tokens=3 + i, seed=i, layer=0) for i in range(3)]
    requests.append(make_request(spec, local, tokens=2, seed=9, layer=2))  # another layer: its own group
    with ffn_server_in_thread(config) as server:
        assert server.shard is not None

        async def submit_together() -> list[torch.Tensor]:
            return list(await asyncio.gather(*(server.submit(r) for r in requests)))

        assert server._loop is not None
        results = asyncio.run_coroutine_threadsafe(submit_together(), server._loop).result(REPLY_TIMEOUT_S)
        assert server.batcher.counters.requests == 4 and server.batcher.counters.batches == 1, (
            "arrived together, computed together"
        )
        load = server.take_load(reset=True)  # before the reference computes below, which the shard counts too
        assert sum(load.expert_token_counts) == sum(int((r.expert_ids >= 0).sum()) for r in requests)  # type: ignore[operator]
        assert server.batcher.counters.requests == 0
        for request, result in zip(requests, results, strict=True):
            torch.testing.assert_close(result, server.shard.compute(request), atol=1e-5, rtol=1e-5)


def test_requests_from_door_threads_are_batched_and_refused_once_the_node_fails(qwen3):
    """The channel doors submit from their own threads (computed there when the node is idle, else by the
    batch thread; no event loop on the path): every reply equals the shard's own compute, each computed once,
    and after refuse_all (what a failing node does) a submit fails at once instead of waiting forever."""
    directory, spec, placement = qwen3
    config = FfnServerConfig(directory, "ffn-1", placement)
    local = len(placement.experts[1])
    requests = [make_request(spec, local, tokens=2 + i % 3, seed=i, layer=2 * (i % 2)) for i in range(24)]
    with ffn_server_in_thread(config) as server:
        assert server.shard is not None
        results: dict[int, torch.Tensor] = {}

        def door(first: int) -> None:
            futures = {i: server.compute_here(requests[i]) for i in range(first, len(requests), 4)}
            results.update({i: future.result(REPLY_TIMEOUT_S) for i, future in futures.items()})

        threads = [threading.Thread(target=door, args=(first,)) for first in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(REPLY_TIMEOUT_S)
        assert sorted(results) == list(range(len(requests)))
        assert server.batcher.counters.requests == len(requests)
        for index, request in enumerate(requests):
            torch.testing.assert_close(results[index], server.shard.compute(request), atol=1e-5, rtol=1e-5)

        server.batcher.refuse_all(PeerError("ffn-1", "the node failed and stops"))
        with pytest.raises(PeerError, match="the node failed and stops"):
            server.compute_here(requests[0]).result(REPLY_TIMEOUT_S)
        assert server.batcher.alive  # refusing is not dying: the batch thread still serves a stop


def test_control_service_health_and_reload(qwen3):
    directory, spec, _ = qwen3
    config = FfnServerConfig(directory, "ffn-1", placement=None)  # waits for LoadExperts
    with ffn_server_in_thread(config) as server:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(server.address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                check = health_pb2.HealthCheckRequest(service="afd.v1.FfnData")
                assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
                control = pb_grpc.FfnNodeStub(channel)
                status = await control.Status(pb.StatusRequest())
                assert (status.node_id, status.state, list(status.experts)) == ("ffn-1", pb.NODE_STATE_JOINING, [])

                # a request before any experts are loaded: an ERROR frame, not a broken stream
                request = make_request(spec, 1, tokens=2, seed=1)
                reply = (await raw_exchange_on(channel, [pack(*encode_request(request, 7, "attn-0"))]))[0]
                header, _ = unpack(grpc_data.open_envelope(reply), FrameLimits.for_model(spec))
                assert header.kind is FrameKind.ERROR and header.seq == 7 and "no experts" in (header.error or "")

                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    other = ExpertPlacement.balanced(spec.num_experts, ["ffn-7", "ffn-8"], version=3)
                    await control.LoadExperts(pb.LoadExpertsRequest(placement=placement_to_proto(other)))
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ffn-1" in refused.value.details()

                new = ExpertPlacement.balanced(spec.num_experts, ["ffn-0", "ffn-1"], [3.0, 1.0], version=4)
                loaded = await control.LoadExperts(pb.LoadExpertsRequest(placement=placement_to_proto(new)))
                assert (loaded.version, list(loaded.experts)) == (4, list(new.experts[1]))
                assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.SERVING
                status = await control.Status(pb.StatusRequest())
                assert status.state == pb.NODE_STATE_READY and status.placement_version == 4

                # served with the new shard; local ids beyond its range, or an unknown version, are refused
                local = len(new.experts[1])
                ok = make_request(spec, local, tokens=3, seed=2)
                too_far = make_request(spec, local, tokens=3, seed=3)
                assert too_far.expert_ids is not None
                too_far.expert_ids[0, 0] = local
                stale = make_request(spec, local, tokens=3, seed=4)
                ok.placement_version = too_far.placement_version = 4
                stale.placement_version = 3
                replies = await raw_exchange_on(
                    channel,
                    [pack(*encode_request(r, seq, "attn-0")) for seq, r in ((8, ok), (9, too_far), (10, stale))],
                )
                assert server.limits is not None
                unpacked = [unpack(grpc_data.open_envelope(r), server.limits) for r in replies]
                decoded = {header.seq: (header, tensors) for header, tensors in unpacked}
                assert decoded[8][0].kind is FrameKind.FFN_RESPONSE and decoded[9][0].kind is FrameKind.ERROR
                assert decoded[10][0].kind is FrameKind.ERROR and "version 3" in (decoded[10][0].error or "")
                expected = FfnShard.load(directory, new, "ffn-1").compute(ok)
                torch.testing.assert_close(decoded[8][1][0], expected, atol=1e-5, rtol=1e-5)

        asyncio.run(scenario())


async def raw_exchange_on(channel: grpc.aio.Channel, frames_: Sequence[bytes]) -> list[bytes]:
    call = grpc_data.exchange_call(channel)()
    for frame in frames_:
        await call.write(grpc_data.envelope_bytes(frame))
    await call.done_writing()
    replies: list[bytes] = []
    while (reply := await asyncio.wait_for(call.read(), REPLY_TIMEOUT_S)) is not grpc.aio.EOF:
        replies.append(reply)
    return replies


def test_open_channel_serves_frames_through_an_acceptor(qwen3):
    directory, spec, placement = qwen3
    attention_end, server_end = memory_pair("attn-0", "ffn-1")
    seen: list[ChannelRequest] = []

    def accept(request: ChannelRequest) -> ChannelOffer:
        seen.append(request)
        return ChannelOffer(b"reply:" + request.rendezvous, lambda: server_end)

    config = FfnServerConfig(directory, "ffn-1", placement, channel_acceptors={"fake": accept}, channel_poll_s=0.2)
    local = len(placement.experts[1])
    with ffn_server_in_thread(config) as server, grpc.insecure_channel(server.address) as channel:
        control = pb_grpc.FfnNodeStub(channel)
        with pytest.raises(grpc.RpcError) as unknown:
            control.OpenChannel(pb.OpenChannelRequest(attention_node_id="attn-0", transport="carrier-pigeon"))
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED and "fake" in unknown.value.details()
        reply = control.OpenChannel(
            pb.OpenChannelRequest(attention_node_id="attn-0", transport="fake", rendezvous=b"abc"), timeout=10
        )
        assert reply.rendezvous == b"reply:abc" and seen == [ChannelRequest("attn-0", b"abc", "ffn-1", device="cpu")]

        request = make_request(spec, local, tokens=4, seed=3)
        attention_end.send(*encode_request(request, 11, "attn-0"))
        bad = make_request(spec, local, tokens=2, seed=4)
        assert bad.expert_ids is not None
        bad.expert_ids[0, 0] = local + 5
        attention_end.send(*encode_request(bad, 12, "attn-0"))
        limits = FrameLimits.for_model(spec)
        replies = {}
        for _ in range(2):
            header_bytes, tensors = attention_end.recv(lambda h: frames.decode_header(h, limits).tensor_specs(), 30)
            header = frames.decode_header(header_bytes, limits)
            replies[header.seq] = (header, tensors)
        assert replies[11][0].kind is FrameKind.FFN_RESPONSE
        torch.testing.assert_close(replies[11][1][0], server.shard.compute(request), atol=1e-5, rtol=1e-5)  # type: ignore[union-attr]
        assert replies[12][0].kind is FrameKind.ERROR and "expert ids" in (replies[12][0].error or "")

        control.CloseChannel(pb.CloseChannelRequest(attention_node_id="attn-0"), timeout=10)
        assert "attn-0" not in server._channels


def test_hidden_states_in_another_dtype_than_the_shard_are_computed_in_the_shards(qwen3):
    """A float32 frame reaching a bf16 node (a float32 attention node in front of a bf16 pool) is computed as
    its bf16 rounding, exactly as a bf16 frame of the same values (before, the node refused it, and the attention
    node took the refusal for a failed node)."""
    directory, spec, placement = qwen3
    config = FfnServerConfig(directory, "ffn-1", placement, dtype="bfloat16")
    local = len(placement.experts[1])
    request = make_request(spec, local, tokens=2, seed=5)  # float32 hidden states
    with ffn_server_in_thread(config) as server:

        async def send() -> list[bytes]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                bf16 = FfnRequest(0, request.hidden.bfloat16(), request.expert_ids, request.expert_weights)
                frames_ = [pack(*encode_request(request, 1, "attn-0")), pack(*encode_request(bf16, 2, "attn-0"))]
                return await raw_exchange_on(channel, frames_)

        decoded = {
            h.seq: (h, tensors)
            for h, tensors in (
                unpack(grpc_data.open_envelope(r), FrameLimits.for_model(spec)) for r in asyncio.run(send())
            )
        }
        assert decoded[1][0].kind is FrameKind.FFN_RESPONSE and decoded[2][0].kind is FrameKind.FFN_RESPONSE
        assert decoded[1][1][0].dtype == torch.bfloat16
        assert torch.equal(decoded[1][1][0], decoded[2][1][0])


def test_reload_keeps_the_previous_placement_for_requests_in_flight(qwen3):
    directory, spec, placement = qwen3  # version 0: ffn-1 holds the larger share
    config = FfnServerConfig(directory, "ffn-1", placement)
    smaller = ExpertPlacement.balanced(spec.num_experts, ["ffn-0", "ffn-1"], [3.0, 1.0], version=5)
    with ffn_server_in_thread(config) as server:
        assert server._loop is not None

        def load(new: ExpertPlacement) -> None:
            asyncio.run_coroutine_threadsafe(server.load_experts(new), server._loop).result(REPLY_TIMEOUT_S)  # type: ignore[arg-type]

        load(smaller)
        assert sorted(server.held_shards()) == [0, 5]
        assert server.limits is not None and server.limits.max_local_experts == len(placement.experts[1])
        old_request = make_request(spec, len(placement.experts[1]), tokens=3, seed=8)  # placement_version 0
        old_shard = FfnShard.load(directory, placement, "ffn-1")
        result = asyncio.run_coroutine_threadsafe(_submit(server, old_request), server._loop).result(REPLY_TIMEOUT_S)
        torch.testing.assert_close(result, old_shard.compute(old_request), atol=1e-5, rtol=1e-5)
        load(ExpertPlacement.balanced(spec.num_experts, ["ffn-0", "ffn-1"], version=6))
        assert sorted(server.held_shards()) == [5, 6], "only one previous placement is kept"


async def _submit(server, request: FfnRequest) -> torch.Tensor:
    return await server.submit(request)
