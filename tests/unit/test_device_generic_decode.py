"""The attention node's decode loop follows its device and never reads the device back to the host.

No GPU runs here, so the engine is built on torch's `meta` device: every weight, the KV cache and each step's
tensors are storage-less, any mix with a host tensor in one op fails, and any read of a value (`.item()`,
`.tolist()`, `bool()`, `.cpu()`, a data-dependent shape such as `nonzero`) raises. A TorchFunctionMode also
refuses those reads by name, so the error names the call. The one read a step needs (the sampled ids, through
`attn_nodes.sampler.read_token_ids`) is replaced by a counter that hands back fixed ids.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch.overrides import TorchFunctionMode

import attn_nodes.sampler as sampler_module
from afd.errors import ConfigError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from afd.sampling_params import SamplingParams
from afd.transport.base import FfnTransport, PendingCombine
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from tests.checkpoints import ARCHITECTURES

HOST_READS = frozenset({"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"})


class HostReadGuard(TorchFunctionMode):
    """Raises on any read of a non-CPU tensor's values into the host, naming the call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is not None and tensor.device.type != "cpu":
            target = kwargs.get("device")
            if name == "to" and target is None:
                target = next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)
            if name in HOST_READS or (name == "to" and target is not None and torch.device(target).type == "cpu"):
                raise AssertionError(f"host read of a {tensor.device} tensor: Tensor.{name}")
        return func(*args, **kwargs)


class _Partials(PendingCombine):
    def __init__(self, partials: dict[str, torch.Tensor]) -> None:
        super().__init__(tuple(partials))
        self.partials = partials


class ZeroFfnTransport(FfnTransport):
    """FFN nodes that answer every request with zeros like its hidden states, on its device; records requests."""

    def __init__(self) -> None:
        self.requests: list[FfnRequest] = []

    def set_peers(self, peers: Mapping[str, str]) -> None:
        del peers

    def dispatch(self, requests: Mapping[str, FfnRequest]) -> PendingCombine:
        self.requests.extend(requests.values())
        return _Partials({node: torch.zeros_like(r.hidden) for node, r in requests.items()})

    def combine(self, pending: PendingCombine) -> dict[str, torch.Tensor]:
        assert isinstance(pending, _Partials)
        return pending.partials


def _meta_engine(model_dir, microbatches: int = 1) -> tuple[AttentionEngine, ZeroFfnTransport]:
    spec = ModelSpec.from_pretrained(model_dir)
    placement = ExpertPlacement.balanced(spec.num_experts, ["ffn-0", "ffn-1"])
    transport = ZeroFfnTransport()
    config = EngineConfig(device="meta", num_kv_blocks=64, max_num_seqs=8, microbatches=microbatches)
    return AttentionEngine.load(model_dir, transport, placement, config), transport


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_decode_steps_on_the_meta_device_read_nothing_back_but_the_sampled_ids(tiny_checkpoint, name, monkeypatch):
    engine, transport = _meta_engine(tiny_checkpoint(name), microbatches=2)
    reads: list[int] = []

    def fixed_ids(tokens: torch.Tensor) -> list[int]:
        assert tokens.device.type == "meta", "the sampled ids must come from the model's device"
        reads.append(tokens.shape[0])
        return [3] * tokens.shape[0]

    monkeypatch.setattr(sampler_module, "read_token_ids", fixed_ids)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    with HostReadGuard():
        outputs = engine.generate(prompts, params)
    assert outputs == [[3] * 4] * 3
    # one read per microbatch that samples, per step: a prefill step then three decode steps, two microbatches
    assert len(reads) == 8 and sum(reads) == 12
    assert transport.requests, "no layer reached the FFN transport"
    for request in transport.requests:
        for tensor in (request.hidden, request.expert_ids, request.expert_weights, request.shared_scale):
            assert tensor is None or tensor.device.type == "meta"
    assert all(t.device.type == "meta" for t in engine.runner.cache)


def test_the_guard_catches_a_host_read_in_the_step(tiny_checkpoint, monkeypatch):
    """The guard is not vacuous: the same run with the sampler's ids read the plain way fails, naming tolist."""
    engine, _ = _meta_engine(tiny_checkpoint("qwen3_moe"))
    with HostReadGuard(), pytest.raises(AssertionError, match=r"Tensor\.tolist"):
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))


def test_an_absent_device_is_refused_naming_what_was_found(tiny_checkpoint):
    placement = ExpertPlacement.balanced(ModelSpec.from_pretrained(tiny_checkpoint("qwen3_moe")).num_experts, ["f"])
    with pytest.raises(ConfigError, match=r"no cuda device is present; found: cpu \(\d+ threads\)"):
        AttentionEngine.load(tiny_checkpoint("qwen3_moe"), ZeroFfnTransport(), placement, EngineConfig(device="cuda"))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_whole_step_with_its_ffn_shards_on_the_device_reads_nothing_back(tiny_checkpoint, name, monkeypatch):
    """Attention half and in-process FFN shards both on the device (what `afd generate --device cuda` runs):
    gate, dispatch, the experts' sync-free path and the accumulation of partial sums, under the same guard."""
    from ffn_nodes.local_pool import local_ffn_pool

    model_dir = tiny_checkpoint(name)
    placement, transport = local_ffn_pool(model_dir, 2, device="meta", attention_device="meta")
    config = EngineConfig(device="meta", num_kv_blocks=64, max_num_seqs=8)
    engine = AttentionEngine.load(model_dir, transport, placement, config)
    monkeypatch.setattr(sampler_module, "read_token_ids", lambda tokens: [3] * tokens.shape[0])
    with HostReadGuard():
        outputs = engine.generate([[1, 2, 3, 4, 5], [6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert outputs == [[3] * 3] * 2
    shards = transport.shards.values()
    assert all(p.device.type == "meta" for shard in shards for layer in shard.layers for p in _weights(layer))


def _weights(layer) -> list[torch.Tensor]:
    return [part.gate_up for part in (layer.experts, layer.shared, layer.dense) if part is not None]
