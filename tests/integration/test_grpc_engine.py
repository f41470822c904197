"""The engine over gRPC with FFN shards in separate processes: same tokens as in-process; dead/hung peers fail fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.sampling_params import SamplingParams
from afd.transport.grpc_transport import GrpcTransport, GrpcTransportConfig
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from tests.cluster_helpers import engine_over_grpc_ffn_processes, start_ffn_servers, stop_all
from tests.engines import inprocess_engine, uneven_placement

PROMPTS = [[7], [3, 14, 15, 92, 65], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(
    ("arch", "dtype", "microbatches"),
    [
        ("qwen3_moe", "float32", 1),
        ("qwen3_moe", "bfloat16", 2),  # bf16 on the wire, two microbatches in flight per step
        ("qwen2_moe", "float32", 2),  # shared expert with its own gate: shared_scale travels
        ("deepseek_v3", "float32", 1),  # dense first layers, shared experts, grouped top-k
        ("llama", "float32", 1),  # dense: every layer is an MLP slice
    ],
)
def test_tokens_match_inprocess_engine(arch: str, dtype: str, microbatches: int, tiny_checkpoint, tmp_path: Path):
    directory = tiny_checkpoint(arch)
    spec = ModelSpec.from_pretrained(directory)
    placement = uneven_placement(spec, 2)
    config = EngineConfig(block_size=4, num_kv_blocks=64, dtype=dtype, microbatches=microbatches)  # type: ignore[arg-type]
    expected = inprocess_engine(directory, 2, config).generate(PROMPTS, GREEDY)
    with engine_over_grpc_ffn_processes(directory, placement, config, tmp_path) as engine:
        assert engine.generate(PROMPTS, GREEDY) == expected


def layer0_requests(spec: ModelSpec, placement, tokens: int = 3) -> dict[str, FfnRequest]:
    """A valid layer-0 request for every node (every token on its node's first expert, weight 1)."""
    top_k = spec.layers[0].moe.top_k if spec.layers[0].moe else 0
    requests = {}
    for node in placement.nodes:
        ids = torch.full((tokens, top_k), -1, dtype=torch.int32)
        ids[:, 0] = 0
        weights = torch.zeros(tokens, top_k)
        weights[:, 0] = 1.0
        requests[node] = FfnRequest(0, torch.randn(tokens, spec.hidden_size), ids, weights)
    return requests


def test_dead_and_hung_peers_fail_combine_naming_them(tiny_checkpoint, tmp_path: Path):
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    placement = uneven_placement(spec, 2)
    servers = start_ffn_servers(directory, placement, tmp_path)
    timeout = 3.0
    try:
        peers = {server.node_id: server.address for server in servers}
        with GrpcTransport.for_model(spec, peers, GrpcTransportConfig(timeout_s=timeout)) as transport:
            transport.wait_ready()
            partials = transport.combine(transport.dispatch(layer0_requests(spec, placement)))
            assert set(partials) == {"ffn-0", "ffn-1"} and partials["ffn-0"].shape == (3, spec.hidden_size)

            # a hung peer (SIGSTOP: connection open, no replies) fails after the timeout, named
            hung, dead = servers
            hung.pause()
            started = time.monotonic()
            pending = transport.dispatch(layer0_requests(spec, placement))
            with pytest.raises(PeerError) as caught:
                transport.combine(pending)
            elapsed = time.monotonic() - started
            assert caught.value.peer == "ffn-0" and "within" in str(caught.value)
            assert timeout - 0.1 <= elapsed < timeout + 2.0
            hung.resume()

            # a killed peer fails at once (the stream breaks), long before the timeout
            dead.kill()
            started = time.monotonic()
            with pytest.raises(PeerError) as caught:
                transport.combine(transport.dispatch(layer0_requests(spec, placement)))
            assert caught.value.peer == "ffn-1" and "ffn-1" in str(caught.value)
            assert time.monotonic() - started < timeout

            # the live peer still serves, and the dead one keeps failing fast instead of hanging
            alive = {"ffn-0": layer0_requests(spec, placement)["ffn-0"]}
            assert transport.combine(transport.dispatch(alive))["ffn-0"].shape == (3, spec.hidden_size)
            with pytest.raises(PeerError, match="ffn-1"):
                transport.combine(transport.dispatch(layer0_requests(spec, placement)))
    finally:
        stop_all(servers)


def test_engine_step_raises_peer_error_when_an_ffn_node_dies(tiny_checkpoint, tmp_path: Path):
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    placement = uneven_placement(spec, 2)
    servers = start_ffn_servers(directory, placement, tmp_path)
    try:
        peers = {server.node_id: server.address for server in servers}
        with GrpcTransport.for_model(spec, peers, GrpcTransportConfig(timeout_s=5)) as transport:
            engine = AttentionEngine.load(directory, transport, placement, EngineConfig(block_size=4, num_kv_blocks=64))
            servers[1].kill()
            started = time.monotonic()
            with pytest.raises(PeerError) as caught:
                engine.generate(PROMPTS[:1], GREEDY)
            assert caught.value.peer == "ffn-1"
            assert time.monotonic() - started < 5.0
    finally:
        stop_all(servers)


def test_transport_refuses_unknown_peers_and_use_after_close(tiny_checkpoint):
    spec = ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe"))
    placement = uneven_placement(spec, 2)
    transport = GrpcTransport.for_model(spec, {"ffn-0": "127.0.0.1:1"}, GrpcTransportConfig(timeout_s=2))
    requests = layer0_requests(spec, placement)
    with pytest.raises(PeerError, match="not a peer") as caught:
        transport.dispatch(requests)  # ffn-1 is unknown
    assert caught.value.peer == "ffn-1"
    # nothing listens on port 1: fails fast with the peer's name
    with pytest.raises(PeerError) as caught:
        transport.combine(transport.dispatch({"ffn-0": requests["ffn-0"]}))
    assert caught.value.peer == "ffn-0"
    # membership changes at run time: ffn-0 leaves, ffn-1 joins
    transport.set_peers({"ffn-1": "127.0.0.1:2"})
    assert transport.peers == {"ffn-1": "127.0.0.1:2"}
    with pytest.raises(PeerError, match="not a peer"):
        transport.dispatch({"ffn-0": requests["ffn-0"]})
    transport.close()
    transport.close()  # idempotent
    with pytest.raises(PeerError, match="closed"):
        transport.dispatch({"ffn-0": requests["ffn-0"]})
