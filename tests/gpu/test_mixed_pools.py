"""Pools on different devices give the CPU engine's tokens: CUDA attention + CPU FFN (experts in host memory),
CPU attention + CUDA FFN, both on CUDA, in one process; and two FFN node processes sharing one GPU behind the
gRPC transport. fp32 throughout, so the tokens must be identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from afd.model_spec import ModelSpec
from afd.sampling_params import SamplingParams
from afd.transport.grpc_transport import GrpcTransport, GrpcTransportConfig
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from tests.cluster_helpers import start_ffn_servers, stop_all
from tests.engines import uneven_placement
from tests.gpu.gpu_helpers import NEW_TOKENS, PROMPTS, engine_on, requires_cuda

pytestmark = requires_cuda

GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
MIXED_ARCHS = ("qwen3_moe", "qwen2_moe", "deepseek_v3", "llama")
"""Routed experts, a gated shared expert, MLA with dense first layers and grouped top-k, a dense model."""


@pytest.fixture(scope="module")
def cpu_tokens():
    cache: dict[Path, list[list[int]]] = {}

    def get(directory: Path) -> list[list[int]]:
        if directory not in cache:
            cache[directory] = engine_on(directory, "cpu", "cpu", "float32").generate(PROMPTS, GREEDY)
        return cache[directory]

    return get


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize(("attn_device", "ffn_device"), [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")])
@pytest.mark.parametrize("arch", MIXED_ARCHS)
def test_pools_on_different_devices_give_the_cpu_engines_tokens(
    arch, attn_device, ffn_device, tiny_checkpoint, cpu_tokens
):
    directory = tiny_checkpoint(arch)
    engine = engine_on(directory, attn_device, ffn_device, "float32")
    assert engine.generate(PROMPTS, GREEDY) == cpu_tokens(directory)


@pytest.mark.parametrize("attn_device", ["cuda", "cpu"])
def test_two_ffn_processes_share_one_gpu(attn_device, tiny_checkpoint, cpu_tokens, tmp_path: Path):
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    placement = uneven_placement(spec, 2)
    servers = start_ffn_servers(
        directory, placement, tmp_path, timeout=120, extra_args=["--dtype", "float32", "--device", "cuda"]
    )
    try:
        peers = {server.node_id: server.address for server in servers}
        with GrpcTransport.for_model(spec, peers, GrpcTransportConfig(timeout_s=60)) as transport:
            transport.wait_ready()
            config = EngineConfig(block_size=4, num_kv_blocks=64, dtype="float32", device=attn_device)
            engine = AttentionEngine.load(directory, transport, placement, config)
            assert engine.generate(PROMPTS, GREEDY) == cpu_tokens(directory)
    finally:
        stop_all(servers)
