"""Staging of device tensors for the host transports (afd/transport/staging.py), without a GPU.

A GPU node must never serialise from device memory: before a frame's bytes are read, its device tensors
are copied with non-blocking copies into a pinned host buffer and waited for once. Here the "device" is
`OnAccelerator`, a CPU tensor that says it lives on cuda:0 and records every way its data is read
(`copy_` and whether it was non-blocking, `.to`/`.cpu` to the host, `.numpy()`); the pinned allocator
and the one wait are replaced by recorders. CPU tensors must come through untouched (same storage), meta
tensors are refused with a clear error, and received tensors are moved to the consumer's device.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from afd.ffn_messages import FfnRequest
from afd.transport import staging
from afd.transport.channel_transport import ChannelTransport, ChannelTransportConfig
from afd.transport.inprocess import InProcessTransport
from afd.transport.rendezvous import establish
from afd.transport.shm_channel import ShmChannel, ShmListener, ShmOptions, connect_shm
from afd.transport.staging import HostStaging, StagingError, stage_once, to_device
from afd.wire import frames
from afd.wire.frames import FrameLimits, encode_request, encode_response, request_from_frame
from tests.memory_channel import memory_pair

FAKE_DEVICE = torch.device("cuda", 0)


class OnAccelerator(torch.Tensor):
    """A CPU tensor that reports device cuda:0 and logs how its data is read (see the module docstring)."""

    log: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        getter_of = getattr(func, "__self__", None)  # property getters arrive as `descriptor.__get__`
        if getter_of is torch.Tensor.device:
            return FAKE_DEVICE
        if getter_of is torch.Tensor.is_cuda:
            return True
        if func is torch.Tensor.numpy:
            cls.log.append("numpy")
            raise TypeError("can't convert cuda:0 device type tensor to numpy (OnAccelerator)")
        if func in (torch.Tensor.to, torch.Tensor.cpu):
            # What a real device tensor does: a blocking read into new pageable host memory.
            cls.log.append(f"{func.__name__} (blocking read to the host)")
            with torch._C.DisableTorchFunctionSubclass():
                return args[0].clone()
        if func is torch.Tensor.copy_ and isinstance(args[1], OnAccelerator):
            cls.log.append(f"copy_ non_blocking={kwargs.get('non_blocking', args[2] if len(args) > 2 else False)}")
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        # Tensors made from a device tensor (detach, views, contiguous) live on the device too.
        if args and isinstance(args[0], OnAccelerator) and isinstance(result, torch.Tensor):
            return result.as_subclass(cls)
        return result


def on_accelerator(tensor: torch.Tensor) -> OnAccelerator:
    return tensor.clone().as_subclass(OnAccelerator)


class FakePinned:
    """Replaces the pinned allocator and the one wait per frame with recorders."""

    def __init__(self) -> None:
        self.allocated: list[int] = []
        self.waits: list[torch.device] = []

    def allocate(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        self.allocated.append(nbytes)
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8), True  # garbage-filled, as fresh memory is

    def wait(self, device: torch.device) -> None:
        self.waits.append(device)


@pytest.fixture
def pinned(monkeypatch) -> Iterator[FakePinned]:
    fake = FakePinned()
    monkeypatch.setattr(staging, "_allocate_host", fake.allocate)
    monkeypatch.setattr(staging, "_wait_for_copies", fake.wait)
    OnAccelerator.log = []
    yield fake
    OnAccelerator.log = []


def sample_tensors() -> list[torch.Tensor]:
    """The channel tests' tensors (odd dtypes, empty, unaligned, NaN/inf) and a strided one, which the staging
    copy must gather."""
    from tests.integration.test_channels import sample_tensors as channel_tensors

    return [*channel_tensors(), torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).t()]


def raw(tensor: torch.Tensor) -> bytes:
    with torch._C.DisableTorchFunctionSubclass():
        return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_only_non_blocking_reads() -> None:
    """Every read of device data was a non-blocking copy into (pinned) staging memory."""
    assert OnAccelerator.log, "no device tensor was read at all"
    assert set(OnAccelerator.log) == {"copy_ non_blocking=True"}, OnAccelerator.log


# ---------------------------------------------------------------------------------------------------
# CPU tensors: nothing changes
# ---------------------------------------------------------------------------------------------------


def test_cpu_tensors_pass_through_staging_untouched(monkeypatch):
    def no_allocation(nbytes: int) -> tuple[torch.Tensor, bool]:
        raise AssertionError("a CPU frame must not allocate staging memory")

    monkeypatch.setattr(staging, "_allocate_host", no_allocation)
    tensors = sample_tensors()
    box = HostStaging()
    with box.host_tensors(tensors) as host:
        assert all(a is b for a, b in zip(host, tensors, strict=True))
        assert [t.data_ptr() for t in host] == [t.data_ptr() for t in tensors]
    assert all(a is b for a, b in zip(stage_once(tensors), tensors, strict=True))
    assert box.capacity == 0 and box.allocations == 0


def test_a_packed_cpu_frame_views_the_tensors_themselves():
    """pack_parts on contiguous CPU tensors hands out views of their own memory (no staging copy)."""
    tensors = [torch.randn(4, 8), torch.arange(6, dtype=torch.int32)]
    parts, _ = frames.pack_parts(b"\x80", tensors)
    addresses = {np.frombuffer(p, dtype=np.uint8).ctypes.data for p in parts if isinstance(p, memoryview)}
    assert {t.data_ptr() for t in tensors} <= addresses


# ---------------------------------------------------------------------------------------------------
# meta tensors: refused clearly
# ---------------------------------------------------------------------------------------------------


def test_meta_tensors_are_refused_with_a_clear_error():
    meta = torch.empty(3, 8, device="meta")
    with pytest.raises(StagingError, match=r"meta tensor \[3, 8\] torch.float32 has no data.*in-process transport"):
        frames.pack(b"\x80", [torch.zeros(2), meta])
    with pytest.raises(StagingError, match="meta tensor"), HostStaging().host_tensors([meta]):
        pass
    assert isinstance(StagingError("x"), ValueError)


# ---------------------------------------------------------------------------------------------------
# Device tensors: pinned staging, non-blocking copies, one wait per frame
# ---------------------------------------------------------------------------------------------------


def test_a_device_frame_is_staged_with_non_blocking_copies_and_one_wait(pinned):
    cpu = sample_tensors()
    device = [on_accelerator(t) for t in cpu]
    header = b"\x81\xa1k\x01"
    packed = frames.pack(header, device)
    assert packed == frames.pack(header, cpu)  # identical bytes, padding included
    assert_only_non_blocking_reads()
    assert pinned.waits == [FAKE_DEVICE]  # one wait for the whole frame, after every copy was queued
    assert len(pinned.allocated) == 1


def test_an_encoded_request_on_the_device_never_reaches_numpy_on_the_device(pinned):
    request = FfnRequest(
        layer=1,
        hidden=on_accelerator(torch.randn(5, 8).to(torch.bfloat16)),
        expert_ids=on_accelerator(torch.tensor([[0, -1]] * 5, dtype=torch.int32)),
        expert_weights=on_accelerator(torch.tensor([[0.5, 0.0]] * 5)),
        microbatch=1,
    )
    header, tensors = encode_request(request, seq=3, sender="attn-0")
    limits = FrameLimits(hidden_size=8, num_layers=2, top_k=2, max_local_experts=2)
    decoded_header, decoded = frames.unpack(frames.pack(header, tensors), limits)
    assert "numpy" not in OnAccelerator.log
    assert_only_non_blocking_reads()
    back = request_from_frame(decoded_header, decoded)
    assert raw(back.hidden) == raw(request.hidden) and raw(back.expert_weights) == raw(request.expert_weights)


def test_the_staging_buffer_is_reused_and_grown_only_when_too_small(pinned):
    box = HostStaging()
    small = [on_accelerator(torch.randn(16)), on_accelerator(torch.arange(3, dtype=torch.int32))]
    pointers = []
    for _ in range(3):
        with box.host_tensors(small) as host:
            pointers.append(host[0].data_ptr())
            assert [raw(h) for h in host] == [raw(t) for t in small]
            assert all(h.device.type == "cpu" and type(h) is torch.Tensor for h in host)
    assert box.allocations == 1 and len(set(pointers)) == 1  # the same pinned memory, frame after frame
    big = [on_accelerator(torch.randn(box.capacity // 4 + 1))]
    with box.host_tensors(big) as host:
        assert raw(host[0]) == raw(big[0])
    assert box.allocations == 2 and box.capacity >= big[0].numel() * 4
    assert pinned.waits == [FAKE_DEVICE] * 4
    assert_only_non_blocking_reads()


def test_senders_of_one_direction_take_turns_on_the_staging_buffer(pinned):
    box = HostStaging()
    inside = threading.Event()
    release = threading.Event()
    second_in = threading.Event()
    tensors = [on_accelerator(torch.randn(4))]

    def first() -> None:
        with box.host_tensors(tensors):
            inside.set()
            release.wait(10)

    def second() -> None:
        with box.host_tensors(tensors):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert inside.wait(10)
    threads[1].start()
    assert not second_in.wait(0.2)  # the buffer is in use: the second sender waits for it
    release.set()
    for thread in threads:
        thread.join(10)
    assert second_in.is_set()


# ---------------------------------------------------------------------------------------------------
# Host channels: identical bytes for CPU and device tensors
# ---------------------------------------------------------------------------------------------------


def spec_header(tensors: list[torch.Tensor]) -> bytes:
    import msgpack

    return msgpack.packb([[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors])


def specs(header: bytes) -> list[frames.TensorSpec]:
    import msgpack

    return [frames.TensorSpec(tuple(shape), getattr(torch, name)) for name, shape in msgpack.unpackb(header)]


@pytest.fixture
def shm_pair() -> Iterator[tuple[ShmChannel, ShmChannel]]:
    joined: dict[str, ShmChannel] = {}
    listener = ShmListener("test-ffn", ShmOptions(ring_bytes=1 << 20, chunk_bytes=256 << 10, io_timeout=20.0))
    attention = establish(listener, lambda r: joined.update(ffn=connect_shm(r, "test-attn")), timeout=30)
    yield attention, joined["ffn"]
    attention.close()
    joined["ffn"].close()


def send_and_check(
    attention: Any, ffn: Any, cpu: list[torch.Tensor], header: bytes, pinned: Any, on_device: bool, read_specs: Any
) -> None:
    """Send `cpu` (as "device" tensors when `on_device`) from `attention` while `ffn` receives (a frame larger
    than a ring needs the reader draining meanwhile); the bytes arrive unchanged, device tensors are read only
    through non-blocking copies with one wait per frame, and CPU tensors take no staging at all."""
    sent = [on_accelerator(t) for t in cpu] if on_device else cpu
    failures: list[BaseException] = []

    def send() -> None:
        try:
            attention.send(header, sent)
        except BaseException as exc:
            failures.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    _, received = ffn.recv(read_specs, 30.0)
    sender.join(30)
    assert not sender.is_alive() and not failures
    assert [raw(t) for t in received] == [raw(t) for t in cpu]
    assert [(t.dtype, t.shape) for t in received] == [(t.dtype, t.shape) for t in cpu]
    if on_device:
        assert_only_non_blocking_reads()
        assert pinned.waits == [FAKE_DEVICE]
    else:
        assert OnAccelerator.log == [] and pinned.allocated == []


@pytest.mark.parametrize("on_device", [False, True], ids=["cpu", "device"])
def test_shm_frames_keep_their_bytes(shm_pair, pinned, on_device):
    attention, ffn = shm_pair
    cpu = [*sample_tensors(), torch.randn(300_000)]  # 1.2 MB: streams through the 1 MiB ring
    send_and_check(attention, ffn, cpu, spec_header(cpu), pinned, on_device, specs)


# ---------------------------------------------------------------------------------------------------
# Receiving: partial sums on the consumer's device
# ---------------------------------------------------------------------------------------------------


def test_decoded_tensors_move_to_the_requested_device():
    partial = torch.randn(4, 8).to(torch.bfloat16)
    limits = FrameLimits(hidden_size=8, num_layers=2, top_k=0, max_local_experts=0)
    _, (decoded,) = frames.unpack(frames.pack(*encode_response(partial, 0, 0, 1, "ffn-0")), limits)
    assert to_device(decoded, "cpu") is decoded and to_device(decoded, None) is decoded
    moved = to_device(decoded, "meta")
    assert moved.device.type == "meta" and moved.shape == partial.shape and moved.dtype == partial.dtype
    meta = torch.empty(2, 3, device="meta")
    assert to_device(meta, torch.device("meta")) is meta


class _DoublingShard:
    """An FFN shard whose partial sum is hidden * 2 (served by tests.unit.test_channel_transport.serve)."""

    node_id = "ffn-0"

    @staticmethod
    def compute(request: FfnRequest) -> torch.Tensor:
        return request.hidden * 2


def _echo_ffn(channel, limits: FrameLimits) -> None:
    from tests.unit.test_channel_transport import serve

    serve(channel, _DoublingShard(), limits)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", [None, "cpu", "meta"])
def test_channel_transport_returns_partial_sums_on_its_device(device):
    limits = FrameLimits(hidden_size=8, num_layers=2, top_k=0, max_local_experts=0)
    attention_end, ffn_end = memory_pair("attn-0", "ffn-0")
    threading.Thread(target=_echo_ffn, args=(ffn_end, limits), daemon=True).start()
    config = ChannelTransportConfig(timeout_s=10.0, device=None if device is None else torch.device(device))
    transport = ChannelTransport({"ffn-0": attention_end}, limits, config)
    try:
        hidden = torch.randn(3, 8)
        (partial,) = transport.combine(transport.dispatch({"ffn-0": FfnRequest(layer=1, hidden=hidden)})).values()
    finally:
        transport.close()
        ffn_end.close()
    assert partial.shape == (3, 8) and partial.dtype == torch.float32
    assert partial.device.type == (device or "cpu")
    if device != "meta":
        assert torch.equal(partial, hidden * 2)


class _Shard:
    """An FFN computer on a given device that records where its requests arrived."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.seen: list[torch.device] = []
        self.outputs: list[torch.Tensor] = []

    def compute(self, request: FfnRequest) -> torch.Tensor:
        self.seen.append(request.hidden.device)
        self.outputs.append(request.hidden * 3)
        return self.outputs[-1]


def test_in_process_transport_leaves_tensors_on_a_shared_device():
    shard = _Shard("cpu")
    transport = InProcessTransport({"ffn-0": shard}, device="cpu")
    hidden = torch.randn(2, 8)
    request = FfnRequest(layer=0, hidden=hidden)
    (partial,) = transport.combine(transport.dispatch({"ffn-0": request})).values()
    assert partial is shard.outputs[0] and shard.seen == [torch.device("cpu")]


def test_in_process_transport_moves_across_devices():
    shard = _Shard("meta")  # the shard's device differs from the attention side's
    transport = InProcessTransport({"ffn-0": shard}, device="cpu")
    hidden = torch.randn(2, 8)
    with pytest.raises(NotImplementedError):  # meta -> cpu has no data: proves the partial was moved back
        transport.dispatch({"ffn-0": FfnRequest(layer=0, hidden=hidden, expert_ids=None)})
    assert shard.seen == [torch.device("meta")]  # the request reached the shard on its device

    back = InProcessTransport({"ffn-0": _Shard("cpu")}, device="meta")
    (partial,) = back.combine(back.dispatch({"ffn-0": FfnRequest(layer=0, hidden=hidden)})).values()
    assert partial.device.type == "meta" and partial.shape == (2, 8)


# ---------------------------------------------------------------------------------------------------
# `afd bench transport --transport nccl` where it cannot run: one clear line, exit 1
# ---------------------------------------------------------------------------------------------------


def _bench(*args: str):
    import typer
    from typer.testing import CliRunner

    from benchmarks import transport as bench_transport

    app = typer.Typer()
    app.command()(bench_transport.command)
    return CliRunner().invoke(app, list(args))


def test_bench_transport_nccl_without_cuda_says_so_in_one_line():
    from benchmarks.transport import nccl_unavailable

    if nccl_unavailable("cuda") is None:
        pytest.skip("CUDA and libnccl are here: the benchmark would run")
    done = _bench("--transport", "nccl", "--max-bytes", "4096")
    lines = [line for line in done.output.splitlines() if line.strip()]
    assert done.exit_code == 1, done.output
    assert len(lines) == 1, lines
    assert lines[0].startswith("afd bench transport: the nccl transport is not available: ")
    assert "CUDA" in lines[0] or "GPU" in lines[0] or "libnccl" in lines[0]


def test_bench_transport_nccl_refuses_a_host_device_clearly():
    done = _bench("--transport", "nccl", "--device", "cpu:0", "--max-bytes", "4096")
    assert done.exit_code == 1
    assert "nccl moves device memory: pass --device cuda (or cuda:N), not --device cpu:0" in done.output


def test_grpc_transport_frames_device_requests_from_its_staging_buffer(pinned, monkeypatch):
    """GrpcTransport._send frames through its own HostStaging: the same bytes as a CPU request, one buffer."""
    from afd.transport import grpc_transport

    messages: list[bytes] = []
    sent = threading.Semaphore(0)

    def capture(link, seq: int, message: bytes, awaited) -> None:  # instead of opening a stream
        messages.append(message)
        sent.release()

    monkeypatch.setattr(grpc_transport._PeerLink, "send", capture)
    limits = FrameLimits(hidden_size=8, num_layers=2, top_k=2, max_local_experts=2)
    config = grpc_transport.GrpcTransportConfig(sender="attn-0", timeout_s=5.0)
    transport = grpc_transport.GrpcTransport({"ffn-0": "127.0.0.1:9"}, limits, config)

    def request(device: bool) -> FfnRequest:
        generator = torch.Generator().manual_seed(1)
        tensors = [
            torch.randn(5, 8, generator=generator).to(torch.bfloat16),
            torch.tensor([[0, -1]] * 5, dtype=torch.int32),
            torch.tensor([[0.5, 0.0]] * 5),
        ]
        if device:
            tensors = [on_accelerator(t) for t in tensors]
        return FfnRequest(layer=1, hidden=tensors[0], expert_ids=tensors[1], expert_weights=tensors[2])

    try:
        transport._seq = iter([7, 7, 7])  # the same seq, so the three frames can be compared byte for byte
        for on_device in (False, True, True):
            transport._send("ffn-0", request(on_device))
            assert sent.acquire(timeout=10)
    finally:
        transport.close()
    assert messages[0] == messages[1] == messages[2]
    assert_only_non_blocking_reads()
    assert transport._staging.allocations == 1 and pinned.waits == [FAKE_DEVICE, FAKE_DEVICE]


def test_a_decoded_request_moves_to_the_ffn_device_whole():
    from afd.transport.staging import request_to_device

    request = FfnRequest(
        layer=0,
        hidden=torch.randn(2, 8).to(torch.bfloat16),
        expert_ids=torch.tensor([[0, -1]] * 2, dtype=torch.int32),
        expert_weights=torch.tensor([[1.0, 0.0]] * 2),
        shared_scale=torch.ones(2),
        microbatch=3,
        placement_version=5,
    )
    assert request_to_device(request, "cpu") is request and request_to_device(request, None) is request
    moved = request_to_device(request, "meta")
    tensors = [moved.hidden, moved.expert_ids, moved.expert_weights, moved.shared_scale]
    assert all(t.device.type == "meta" for t in tensors) and moved.hidden_scale is None
    assert [(t.shape, t.dtype) for t in tensors] == [
        (t.shape, t.dtype) for t in (request.hidden, request.expert_ids, request.expert_weights, request.shared_scale)
    ]
    assert (moved.layer, moved.microbatch, moved.placement_version) == (0, 3, 5)
