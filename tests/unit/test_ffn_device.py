"""FFN nodes compute on any torch device: the sync-free expert path, the shard on a device, the node's device.

No GPU here, so the device path is proven two ways: a shard built on `meta` (storage-less tensors: any read
of a number raises, and so does every data-dependent op) computes a request of every architecture under a
guard that refuses every host read; and the same path forced on the CPU gives the host path's numbers.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from afd.checkpoint import CheckpointReader
from afd.devices import DeviceInfo, describe_present
from afd.errors import ConfigError
from afd.ffn_messages import FfnRequest
from afd.model_spec import ModelSpec
from afd.placement import ExpertPlacement
from ffn_nodes.experts import ClampedSwigluExperts, StackedExperts
from ffn_nodes.limited_swiglu import LimitedSwigluExperts
from ffn_nodes.node import ClusterAttachment, FfnClusterNode
from ffn_nodes.server import FfnServerConfig
from ffn_nodes.shard import FfnShard
from tests.checkpoints import ARCHITECTURES


class HostReadError(AssertionError):
    """A tensor's numbers were read back to the host where the code must not wait for the device."""


_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.__format__,
}


class HostReadGuard(TorchFunctionMode):
    """Raises HostReadError on any read of a tensor's values into Python (item, tolist, numpy, bool/int/float/
    index conversion) and on any copy of a non-CPU tensor to the CPU (`.cpu()`, `.to(cpu)`, `cpu.copy_(x)`).

    `strict`: host reads of CPU tensors too (for the sync-free path forced to run on the CPU)."""

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict = strict

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is not None:
            on_host = tensor.device.type == "cpu"
            if func in _READS and (self.strict or not on_host):
                raise HostReadError(f"host read: Tensor.{func.__name__} of a {tensor.device} tensor")
            if func is torch.Tensor.cpu and (self.strict or not on_host):
                raise HostReadError(f"host copy: Tensor.cpu of a {tensor.device} tensor")
            if func is torch.Tensor.to and (self.strict or not on_host):
                target = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
                if target is not None and target.type == "cpu":
                    raise HostReadError(f"host copy: Tensor.to(cpu) of a {tensor.device} tensor")
            source = args[1] if func is torch.Tensor.copy_ and len(args) > 1 else None
            if on_host and isinstance(source, torch.Tensor) and (source.device.type != "cpu" or self.strict):
                raise HostReadError(f"host copy: copy_ from a {source.device} tensor into host memory")
        return func(*args, **kwargs)


def test_the_guard_catches_host_reads():
    """The guard must be able to fail: each kind of read it is meant to catch raises."""
    meta = torch.zeros(3, dtype=torch.int64, device="meta")
    reads = [
        lambda: meta.tolist(),
        lambda: meta[0].item(),
        lambda: bool(meta[0]),
        lambda: int(meta[0]),
        lambda: float(meta[0]),
        lambda: [1, 2, 3][meta[0]],
        lambda: meta.cpu(),
        lambda: meta.to("cpu"),
        lambda: meta.to(torch.device("cpu"), torch.float32),
        lambda: torch.zeros(3, dtype=torch.int64).copy_(meta),
    ]
    for read in reads:
        with HostReadGuard(), pytest.raises(HostReadError):
            read()
    with HostReadGuard(strict=True), pytest.raises(HostReadError):
        torch.ones(2).tolist()
    with HostReadGuard():  # CPU reads are the CPU path's own business unless strict
        assert torch.ones(2).tolist() == [1.0, 1.0]


def _requests(spec: ModelSpec, placement: ExpertPlacement, node: str, tokens: int, seed: int) -> list[FfnRequest]:
    """One request per layer on the CPU (as the wire decodes them): -1 slots, and experts left without tokens."""
    generator = torch.Generator().manual_seed(seed)
    local = len(placement.experts[placement.index(node)])
    requests = []
    for layer, layer_spec in enumerate(spec.layers):
        hidden = torch.randn(tokens, spec.hidden_size, generator=generator)
        ids = weights = scale = None
        if layer_spec.moe is not None and local:
            top_k = layer_spec.moe.top_k
            # ids in [-1, local - 1): the last local expert gets no token
            ids = torch.randint(-1, max(local - 1, 1), (tokens, top_k), generator=generator, dtype=torch.int32)
            weights = torch.where(ids >= 0, torch.rand(tokens, top_k, generator=generator), 0.0)
            if layer_spec.moe.shared_gate:
                scale = torch.rand(tokens, generator=generator)
        requests.append(FfnRequest(layer, hidden, ids, weights, scale))
    return requests


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_meta_shard_computes_every_layer_without_host_reads(tiny_checkpoint, arch, dtype):
    """bf16 takes grouped_mm (meta checks its CUDA rules), fp32 the padded fallback; both without host reads."""
    directory = tiny_checkpoint(arch)
    spec = ModelSpec.from_pretrained(directory)
    placement = ExpertPlacement.balanced(spec.num_experts, ["ffn-0", "ffn-1"])
    shard = FfnShard.load(directory, placement, "ffn-1", spec=spec, reader=CheckpointReader(directory, dtype, "meta"))
    assert shard.device.type == "meta"
    for layer in shard.layers:
        for part in (layer.experts, layer.shared, layer.dense):
            if part is not None:
                assert part.gate_up.device.type == "meta" and getattr(part, "sync_free", True)
    tokens = 5
    for request in _requests(spec, placement, "ffn-1", tokens, seed=1):
        request.hidden = request.hidden.to(dtype)
        with HostReadGuard():
            partial = shard.compute(request)
        assert partial.device.type == "meta"
        assert partial.shape == (tokens, spec.hidden_size) and partial.dtype == dtype
    assert shard.expert_token_counts() == [0] * shard.num_local_experts  # meta holds no numbers: zeros, no raise


def _stacked(experts: int, hidden: int, inter: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = torch.randn(experts, 2 * inter, hidden, dtype=dtype) * 0.1
    return gate_up, torch.randn(experts, hidden, inter, dtype=dtype) * 0.1


def _routing(tokens: int, top_k: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random local ids with -1 slots; experts 1 and the last receive no token."""
    ids = torch.randint(-1, experts, (tokens, top_k), dtype=torch.int32)
    ids[(ids == 1) | (ids == experts - 1)] = -1
    return ids, torch.rand(tokens, top_k)


def _run(experts: Any, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, strict: bool) -> torch.Tensor:
    out = torch.zeros_like(hidden)
    if strict:
        with HostReadGuard(strict=True):
            experts.forward(hidden, ids, weights, out)
    else:
        experts.forward(hidden, ids, weights, out)
    return out


def _assert_same(device_path: torch.Tensor, host_path: torch.Tensor, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16:
        # the same products, rounding and order of additions: identical in bf16 (seen on this machine's torch)
        assert torch.equal(device_path, host_path)
    else:
        torch.testing.assert_close(device_path, host_path, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2, 7, 40])
@pytest.mark.parametrize("kernel", ["grouped", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sync_free_stacked_path_equals_the_host_path(dtype, kernel, tokens):
    """Forced onto the CPU (and run there under the strict guard), the device path gives the host path's sums."""
    torch.manual_seed(tokens)
    num, hidden_size, inter, top_k = 6, 32, 16, 3
    gate_up, down = _stacked(num, hidden_size, inter, dtype)
    hidden = torch.randn(tokens, hidden_size, dtype=dtype)
    ids, weights = _routing(tokens, top_k, num)
    for host_strategy in ("auto", "padded", "looped"):
        host = StackedExperts(gate_up, down, host_strategy)
        device = StackedExperts(gate_up, down, kernel, sync_free=True)
        assert not host.sync_free and device.sync_free
        expected = _run(host, hidden, ids, weights, strict=False)
        _assert_same(_run(device, hidden, ids, weights, strict=True), expected, dtype)
        assert device.expert_tokens == host.expert_tokens and device.experts_hit == host.experts_hit
    assert host.expert_tokens[1] == host.expert_tokens[-1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sync_free_looped_paths_equal_the_host_path(dtype):
    """gpt-oss's clamped and Step-3.5's bounded experts: every local expert over every slot, the same sums."""
    torch.manual_seed(3)
    num, hidden_size, inter, tokens, top_k = 5, 32, 16, 9, 2
    gate_up, down = _stacked(num, hidden_size, inter, dtype)
    gate_up_bias = torch.randn(num, 2 * inter, dtype=dtype) * 0.1
    down_bias = torch.randn(num, hidden_size, dtype=dtype) * 0.1
    hidden = torch.randn(tokens, hidden_size, dtype=dtype) * 4  # large enough for the clamps to bite
    ids, weights = _routing(tokens, top_k, num)
    makers = [
        lambda forced: ClampedSwigluExperts(gate_up, gate_up_bias, down, down_bias, 1.702, 7.0, sync_free=forced),
        lambda forced: LimitedSwigluExperts(gate_up, down, 0.5, sync_free=forced),
    ]
    for make in makers:
        host, device = make(None), make(True)
        assert not host.sync_free and device.sync_free
        expected = _run(host, hidden, ids, weights, strict=False)
        _assert_same(_run(device, hidden, ids, weights, strict=True), expected, dtype)
        assert device.expert_tokens == host.expert_tokens and device.experts_hit == host.experts_hit


def test_uncomputed_rows_never_reach_the_output():
    """NaN in an expert's output for rows it does not own (the padded rows, the elsewhere slots) is selected
    away, not multiplied by zero (NaN * 0 is NaN)."""
    torch.manual_seed(4)
    gate_up, down = _stacked(4, 16, 8, torch.float32)
    hidden = torch.randn(6, 16)
    hidden[5] = float("nan")  # token 5 only goes elsewhere
    ids = torch.tensor([[0, -1], [2, 0], [-1, 2], [0, 0], [2, -1], [-1, -1]], dtype=torch.int32)
    weights = torch.rand(6, 2)
    for kernel in ("grouped", "padded"):
        out = _run(StackedExperts(gate_up, down, kernel, sync_free=True), hidden, ids, weights, strict=True)
        assert torch.isfinite(out).all() and torch.count_nonzero(out[5]) == 0


def test_the_path_is_chosen_by_the_device():
    gate_up, down = _stacked(2, 16, 8, torch.bfloat16)
    assert not StackedExperts(gate_up, down).sync_free
    assert StackedExperts(gate_up.to("meta"), down.to("meta")).sync_free
    assert LimitedSwigluExperts(gate_up.to("meta"), down.to("meta"), 1.0).sync_free
    assert not LimitedSwigluExperts(gate_up, down, 1.0).sync_free


def test_a_cpu_shard_answers_on_the_cpu_as_before(tiny_checkpoint):
    """The device argument on the CPU changes nothing: same numbers as a shard loaded without one."""
    directory = tiny_checkpoint("qwen2_moe")
    spec = ModelSpec.from_pretrained(directory)
    placement = ExpertPlacement.balanced(spec.num_experts, ["ffn-0", "ffn-1"])
    plain = FfnShard.load(directory, placement, "ffn-0", spec=spec)
    on_cpu = FfnShard.load(directory, placement, "ffn-0", spec=spec, device="cpu")
    assert on_cpu.device == torch.device("cpu")
    for request in _requests(spec, placement, "ffn-0", 4, seed=2):
        assert torch.equal(plain.compute(request), on_cpu.compute(request))
    with pytest.raises(ConfigError, match="differs"):
        FfnShard.load(directory, placement, "ffn-0", spec=spec, reader=CheckpointReader(directory), device="meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_an_absent_device_is_refused_naming_what_was_found(tmp_path):
    with pytest.raises(ConfigError, match="cpu") as caught:
        FfnServerConfig(model_dir=tmp_path, node_id="ffn-0", device="cuda")
    assert describe_present() in str(caught.value)
    assert FfnServerConfig(model_dir=tmp_path, node_id="ffn-0").compute_device == torch.device("cpu")


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_capacity_profile_reports_the_nodes_device(tiny_checkpoint, device):
    """The heartbeat's device fields come from DeviceInfo.of(the node's device), and the FFN calibration runs
    there (on meta: with no host read, so it would not stall an accelerator's queue mid-measurement)."""
    directory = tiny_checkpoint("qwen3_moe")
    config = FfnServerConfig(model_dir=directory, node_id="ffn-0", device=device)
    node = FfnClusterNode(config, ClusterAttachment(router="127.0.0.1:1"))
    with HostReadGuard():
        profile = node._measure_capacity()
    info = DeviceInfo.of(torch.device(device))
    assert profile.device_kind == info.name and profile.device_memory_bytes == info.memory_bytes
    assert profile.ffn_us_per_token_expert > 0
