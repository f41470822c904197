"""M2N batching on the FFN node: concatenated compute equals one compute per request."""

from __future__ import annotations

import asyncio

import pytest
import torch

from afd.errors import ConfigError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.wire.frames import OutOfRange
from ffn_nodes.batching import StalePlacementError, compute_batch
from ffn_nodes.server import FfnNodeServer, FfnServerConfig
from ffn_nodes.shard import FfnShard


def moe_request(spec: ModelSpec, layer: int, local: int, tokens: int, seed: int, scaled: bool) -> FfnRequest:
    gen = torch.Generator().manual_seed(seed)
    moe = spec.moe(layer)
    assert moe is not None
    ids = torch.randint(-1, local, (tokens, moe.top_k), generator=gen, dtype=torch.int32)
    weights = torch.where(ids >= 0, torch.rand(tokens, moe.top_k, generator=gen), 0.0)
    scale = torch.rand(tokens, generator=gen) if scaled else None
    return FfnRequest(layer, torch.randn(tokens, spec.hidden_size, generator=gen), ids, weights, scale, seed % 2)


def test_batched_compute_equals_per_request_compute(tiny_checkpoint) -> None:
    directory = tiny_checkpoint("qwen2_moe")  # shared expert with a per-token scale
    spec = ModelSpec.from_pretrained(directory)
    placement = ExpertPlacement.balanced(spec.num_experts, ["ffn-0", "ffn-1"])
    shard = FfnShard.load(directory, placement, "ffn-1")
    local = len(placement.experts[1])
    moe_layers = [i for i, layer in enumerate(spec.layers) if layer.moe is not None]
    layer = moe_layers[0]
    requests = [
        moe_request(spec, layer, local, tokens=3, seed=1, scaled=True),
        moe_request(spec, layer, local, tokens=5, seed=2, scaled=False),  # no scale = scale 1
        moe_request(spec, layer, local, tokens=1, seed=3, scaled=True),
        moe_request(spec, moe_layers[-1], local, tokens=4, seed=4, scaled=True),
        FfnRequest(99, torch.randn(2, spec.hidden_size)),  # a bad layer fails alone
    ]
    results = compute_batch({0: shard}, requests)
    for request, result in zip(requests[:4], results[:4], strict=True):
        assert isinstance(result, torch.Tensor)
        torch.testing.assert_close(result, shard.compute(request), atol=1e-5, rtol=1e-5)
    assert isinstance(results[4], ValueError) and "out of range" in str(results[4])


def test_each_request_is_computed_by_the_shard_of_its_placement_version(tiny_checkpoint) -> None:
    directory = tiny_checkpoint("qwen3_moe")
    spec = ModelSpec.from_pretrained(directory)
    old = ExpertPlacement.balanced(spec.num_experts, ["ffn-0", "ffn-1"], [1.0, 1.0], version=1)
    new = ExpertPlacement.balanced(spec.num_experts, ["ffn-0", "ffn-1"], [1.0, 3.0], version=2)
    shards = {1: FfnShard.load(directory, old, "ffn-1"), 2: FfnShard.load(directory, new, "ffn-1")}
    local_old, local_new = len(old.experts[1]), len(new.experts[1])
    assert local_new > local_old
    under_old = moe_request(spec, 0, local_old, tokens=3, seed=1, scaled=False)
    under_new = moe_request(spec, 0, local_new, tokens=3, seed=1, scaled=False)
    under_old.placement_version, under_new.placement_version = 1, 2
    too_far = moe_request(spec, 0, local_new, tokens=6, seed=2, scaled=False)
    too_far.placement_version = 1  # ids valid under version 2 only
    unknown = moe_request(spec, 0, local_old, tokens=2, seed=3, scaled=False)
    unknown.placement_version = 9
    results = compute_batch(shards, [under_old, under_new, too_far, unknown])
    torch.testing.assert_close(results[0], shards[1].compute(under_old), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1], shards[2].compute(under_new), atol=1e-5, rtol=1e-5)
    assert isinstance(results[2], OutOfRange) and "version 1" in str(results[2])
    assert isinstance(results[3], StalePlacementError) and "9" in str(results[3])


def test_server_config_validation(tmp_path) -> None:
    placement = ExpertPlacement.balanced(4, ["ffn-0"])
    with pytest.raises(ConfigError, match="ffn-9"):
        FfnServerConfig(tmp_path, "ffn-9", placement)
    with pytest.raises(ConfigError, match="port"):
        FfnServerConfig(tmp_path, "ffn-0", placement, port=70000)
    with pytest.raises(ConfigError, match="max_batch_tokens"):
        FfnServerConfig(tmp_path, "ffn-0", placement, max_batch_tokens=0)


def test_shutdown_is_safe_after_a_failed_start(tmp_path) -> None:
    placement = ExpertPlacement.balanced(4, ["ffn-0"])
    server = FfnNodeServer(FfnServerConfig(tmp_path / "no-such-model", "ffn-0", placement))

    async def scenario() -> None:
        with pytest.raises(ConfigError):  # no config.json: the shard cannot load
            await server.start()
        await server.shutdown()
        await server.shutdown()  # idempotent

    asyncio.run(scenario())
    assert server.port is None
