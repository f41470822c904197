"""The engine over gloo and shared-memory channels, FFN halves in separate FfnNodeServer processes."""

from __future__ import annotations

import time

import grpc
import pytest

from afd.errors import PeerError
from afd.model_spec import ModelSpec
from afd.sampling_params import SamplingParams
from afd.transport.channel_transport import ChannelOpener, ChannelTransport, ChannelTransportConfig
from afd.wire.auth import ClusterAuth
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.generated import afd_cluster_pb2_grpc as pb_grpc
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from tests.cluster_helpers import start_ffn_servers, stop_all
from tests.engines import inprocess_engine, uneven_placement

PROMPTS = [[7], [3, 14, 15, 92, 65], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def assert_bad_channel_requests_are_refused(address: str) -> None:
    """Bad rendezvous bytes fail the OpenChannel RPC at once (not a background join); so does a backend
    the node does not serve."""
    with ClusterAuth().channel(address) as control:
        stub = pb_grpc.FfnNodeStub(control)
        for backend in ("gloo", "shm"):
            request = pb.OpenChannelRequest(attention_node_id="attn-x", transport=backend, rendezvous=b"\xc1junk")
            with pytest.raises(grpc.RpcError) as error:
                stub.OpenChannel(request, timeout=10)
            assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "rendezvous" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            stub.OpenChannel(pb.OpenChannelRequest(attention_node_id="attn-x", transport="carrier-pigeon"), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(("backend", "dtype"), [("gloo", "float32"), ("shm", "bfloat16")])
def test_tokens_match_inprocess_engine_and_a_dead_node_is_named(backend, dtype, tiny_checkpoint, tmp_path):
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    placement = uneven_placement(spec, 2)
    config = EngineConfig(block_size=4, num_kv_blocks=64, dtype=dtype, microbatches=2)  # type: ignore[arg-type]
    expected = inprocess_engine(directory, 2, config).generate(PROMPTS, GREEDY)

    servers = start_ffn_servers(directory, placement, tmp_path, extra_args=["--dtype", dtype])
    transport = None
    try:
        peers = {s.node_id: s.address for s in servers}
        opener = ChannelOpener(backend, "attn-0", timeout_s=60.0)
        transport = ChannelTransport.for_model(
            spec, peers, opener, ChannelTransportConfig(sender="attn-0", timeout_s=30.0)
        )
        engine = AttentionEngine.load(directory, transport, placement, config)
        assert engine.generate(PROMPTS, GREEDY) == expected

        # membership changes at run time: drop a node's channel, then open a fresh one to it
        transport.set_peers({"ffn-0": peers["ffn-0"]})
        assert transport.nodes == ("ffn-0",)
        transport.set_peers(peers)
        assert sorted(transport.nodes) == ["ffn-0", "ffn-1"]
        assert engine.generate(PROMPTS, GREEDY) == expected
        assert_bad_channel_requests_are_refused(servers[0].address)

        servers[1].kill()  # a crash: the channel drops, and the next step fails naming the node, fast
        started = time.monotonic()
        with pytest.raises(PeerError) as error:
            engine.generate(PROMPTS[:1], GREEDY)
        assert error.value.peer == servers[1].node_id
        assert time.monotonic() - started < 15.0
    finally:
        if transport is not None:
            transport.close()
        stop_all(servers)
