"""ChannelTransport over in-memory channels to in-process FFN shards: same partials and tokens, typed failures."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
import torch

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.sampling_params import SamplingParams
from afd.transport.channel import Channel
from afd.transport.channel_transport import ChannelTransport, ChannelTransportConfig
from afd.wire.frames import FrameLimits, decode_header, encode_error, encode_response, request_from_frame
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from ffn_nodes.local_pool import local_ffn_pool
from ffn_nodes.shard import FfnShard
from tests.engines import inprocess_engine, uneven_weights
from tests.memory_channel import memory_pair


def serve(channel: Channel, shard: FfnShard, limits: FrameLimits) -> None:
    """A minimal FFN side: answer each request frame with its partial sum, or an ERROR frame."""
    while True:
        try:
            raw, tensors = channel.recv(lambda h: decode_header(h, limits).tensor_specs(), math.inf)
        except PeerError:
            return
        header = decode_header(raw, limits)
        try:
            partial = shard.compute(request_from_frame(header, tensors))
            reply = encode_response(partial, header.layer, header.microbatch, header.seq, shard.node_id)
        except Exception as exc:
            reply = encode_error(f"{type(exc).__name__}: {exc}", header.layer, header.microbatch, header.seq, "x")
        channel.send(*reply)


class Cluster:
    """N in-process FFN shards, each served on its own thread behind a memory channel."""

    def __init__(self, directory, num_shards: int, timeout_s: float = 30.0, dtype: str = "float32") -> None:
        self.spec = ModelSpec.from_pretrained(directory)
        self.placement, pool = local_ffn_pool(directory, num_shards, dtype, uneven_weights(num_shards))
        self.shards: dict[str, FfnShard] = dict(pool.shards)  # type: ignore[arg-type]
        channels = {}
        self.ffn_ends = {}
        for node, shard in self.shards.items():
            attention_end, ffn_end = memory_pair("attn-0", node)
            channels[node] = attention_end
            self.ffn_ends[node] = ffn_end
            local = len(self.placement.experts[self.placement.index(node)])
            limits = FrameLimits.for_model(self.spec, max_local_experts=local)
            threading.Thread(target=serve, args=(ffn_end, shard, limits), daemon=True).start()
        self.transport = ChannelTransport(
            channels, FrameLimits.for_model(self.spec), ChannelTransportConfig(timeout_s=timeout_s)
        )


@pytest.fixture
def cluster(tiny_checkpoint) -> Iterator[Cluster]:
    made = Cluster(tiny_checkpoint("qwen3_moe"), 2)
    yield made
    made.transport.close()


def layer0_requests(spec: ModelSpec, nodes: Sequence[str], microbatch: int, tokens: int = 3) -> dict[str, FfnRequest]:
    top_k = spec.layers[0].moe.top_k
    generator = torch.Generator().manual_seed(microbatch)
    requests = {}
    for node in nodes:
        ids = torch.full((tokens, top_k), -1, dtype=torch.int32)
        ids[:, 0] = 0
        weights = torch.zeros(tokens, top_k)
        weights[:, 0] = 0.75
        hidden = torch.randn(tokens, spec.hidden_size, generator=generator)
        requests[node] = FfnRequest(0, hidden, ids, weights, microbatch=microbatch)
    return requests


@pytest.mark.parametrize("microbatches", [1, 2])
def test_engine_over_channels_matches_inprocess_engine(tiny_checkpoint, microbatches):
    directory = tiny_checkpoint("qwen3_moe")
    config = EngineConfig(block_size=4, num_kv_blocks=64, dtype="float32", microbatches=microbatches)
    prompts = [[7], [3, 14, 15, 92, 65], [11, 12, 13, 14, 15, 16, 17, 18]]
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = inprocess_engine(directory, 2, config).generate(prompts, greedy)
    cluster = Cluster(directory, 2)
    try:
        engine = AttentionEngine.load(directory, cluster.transport, cluster.placement, config)
        assert engine.generate(prompts, greedy) == expected
    finally:
        cluster.transport.close()


def test_microbatches_in_flight_combine_in_any_order(cluster):
    nodes = list(cluster.shards)
    first = layer0_requests(cluster.spec, nodes, microbatch=0)
    second = layer0_requests(cluster.spec, nodes, microbatch=1)
    pending_first = cluster.transport.dispatch(first)
    pending_second = cluster.transport.dispatch(second)  # both in flight before either is combined
    for requests, pending in ((second, pending_second), (first, pending_first)):
        partials = cluster.transport.combine(pending)
        for node, request in requests.items():
            assert torch.equal(partials[node], cluster.shards[node].compute(request))


def test_error_frame_fails_combine_naming_the_node_and_the_link_survives(cluster):
    nodes = list(cluster.shards)
    requests = layer0_requests(cluster.spec, nodes, microbatch=0)
    requests["ffn-1"].expert_ids[0, 0] = 10_000  # out of range on ffn-1: answered with an ERROR frame
    with pytest.raises(PeerError, match="OutOfRange") as error:
        cluster.transport.combine(cluster.transport.dispatch(requests))
    assert error.value.peer == "ffn-1"
    partials = cluster.transport.combine(cluster.transport.dispatch(layer0_requests(cluster.spec, nodes, 1)))
    assert set(partials) == set(nodes)


def test_silent_peer_times_out_naming_it(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    attention_end, _ffn_end = memory_pair("attn-0", "ffn-0")  # nobody serves the FFN end
    transport = ChannelTransport(
        {"ffn-0": attention_end}, FrameLimits.for_model(spec), ChannelTransportConfig(timeout_s=0.5)
    )
    try:
        started = time.monotonic()
        with pytest.raises(PeerError, match="no partial sum for layer 0") as error:
            transport.combine(transport.dispatch(layer0_requests(spec, ["ffn-0"], 0)))
        assert error.value.peer == "ffn-0"
        assert time.monotonic() - started < 5.0
    finally:
        transport.close()


def test_closed_peer_fails_pending_combine_at_once_and_later_dispatches(cluster):
    nodes = list(cluster.shards)
    cluster.transport.config = ChannelTransportConfig(timeout_s=30.0)
    cluster.ffn_ends["ffn-0"].close()  # the FFN node goes away
    started = time.monotonic()
    with pytest.raises(PeerError) as error:
        cluster.transport.combine(cluster.transport.dispatch(layer0_requests(cluster.spec, nodes, 0)))
    assert error.value.peer == "ffn-0"
    assert time.monotonic() - started < 5.0, "a dead peer is not waited for until the timeout"
    with pytest.raises(PeerError, match="ffn-0"):
        cluster.transport.dispatch(layer0_requests(cluster.spec, nodes, 1))


def test_dispatch_to_a_node_without_channel_is_a_peer_error(cluster):
    requests = layer0_requests(cluster.spec, ["ffn-9"], 0)
    with pytest.raises(PeerError, match="no channel to this node") as error:
        cluster.transport.dispatch(requests)
    assert error.value.peer == "ffn-9"


def test_fail_peer_ends_a_combine_waiting_on_a_silent_peer_at_once(tiny_checkpoint):
    """A frozen node the control plane declared dead is not waited for until the reply timeout."""
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    attention_end, _ffn_end = memory_pair("attn-0", "ffn-0")  # nobody serves the FFN end: a frozen node
    transport = ChannelTransport(
        {"ffn-0": attention_end}, FrameLimits.for_model(spec), ChannelTransportConfig(timeout_s=60.0)
    )
    try:
        pending = transport.dispatch(layer0_requests(spec, ["ffn-0"], 0))
        assert transport.fail_peer("ffn-9", "not a peer") == 0
        timer = threading.Timer(0.3, transport.fail_peer, ("ffn-0", "declared dead by the router"))
        started = time.monotonic()
        timer.start()
        with pytest.raises(PeerError, match="declared dead by the router") as error:
            transport.combine(pending)
        assert error.value.peer == "ffn-0"
        assert time.monotonic() - started < 5.0
        assert transport.fail_peer("ffn-0", "again") == 0, "settled replies are no longer tracked"
    finally:
        timer.cancel()
        transport.close()
