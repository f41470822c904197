"""The NCCL channel on a real GPU: NCCL self send/recv, frames through a loopback channel, and (with two
GPUs, or NCCL 2.30+ on one) a two-process pair with a peer that dies.

Run on a CUDA machine with a CUDA build of torch and `pip install -e '.[gpu]'`:
    pytest -m gpu tests/gpu/test_nccl_channel.py
Everything here is skipped, with the reason, where torch sees no GPU or no libnccl can be loaded.
"""

from __future__ import annotations

import math
import subprocess
import threading
import time

import pytest
import torch

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from afd.transport.nccl.communicator import Communicator
from afd.transport.nccl.library import load_library, tensor_buffer, unavailable_reason
from afd.wire.frames import FrameLimits, decode_header, encode_request, request_from_frame

REASON = unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=f"NCCL unavailable: {REASON}")]

if REASON is None:  # importing these is harmless anywhere, but only meaningful with a GPU
    from afd.transport.nccl.channel import NcclChannel, NcclListener, NcclOptions
    from afd.transport.nccl.first_message import HEADER_ROOM
    from afd.transport.nccl.selftest import header_specs, make_header, open_pair, pair_supported, read_header

DEVICE = 0
TIMEOUT_S = 60.0


@pytest.fixture
def loopback():
    channel = NcclChannel.loopback("self", DEVICE, NcclOptions(io_timeout=10.0))
    yield channel
    channel.close()


def test_nccl_self_send_recv_in_one_group_moves_bfloat16_exactly():
    library = load_library()
    with torch.cuda.device(DEVICE):
        comm = Communicator.begin(library, library.get_unique_id(), rank=0, nranks=1)
        try:
            assert comm.wait_ready(time.monotonic() + TIMEOUT_S)
            source = torch.randn(1000, 33, dtype=torch.bfloat16, device=DEVICE)
            target = torch.empty_like(source)
            stream = torch.cuda.current_stream(DEVICE)
            comm.post([tensor_buffer(source)], [tensor_buffer(target)], peer=0, stream=stream.cuda_stream)
            assert comm.wait_ready(time.monotonic() + TIMEOUT_S)
            torch.cuda.synchronize(DEVICE)
            assert torch.equal(source, target)
        finally:
            comm.abort()


def test_frames_round_trip_through_a_loopback_channel(loopback):
    sent = [
        [torch.randn(7, 64, dtype=torch.bfloat16, device=DEVICE), torch.arange(14, dtype=torch.int32).view(7, 2)],
        [torch.randn(3, dtype=torch.float32, device=DEVICE)],
        [torch.empty(0, 64, dtype=torch.bfloat16, device=DEVICE)],  # a microbatch with no tokens
        [],
    ]
    for tensors in sent:  # several frames queued before any is received: order is kept
        loopback.send(make_header("sink", tensors), tensors)
    for tensors in sent:
        header, received = loopback.recv(header_specs, TIMEOUT_S)
        assert read_header(header)[0] == "sink"
        assert len(received) == len(tensors)
        for got, want in zip(received, tensors, strict=True):
            assert got.device == torch.device("cuda", DEVICE) and got.dtype == want.dtype
            assert torch.equal(got.cpu(), want.cpu())  # bfloat16 bit for bit; CPU tensors get copied over


def test_a_header_longer_than_the_envelope_travels_on_its_own(loopback):
    tensor = torch.randn(5, dtype=torch.bfloat16, device=DEVICE)
    header = make_header("sink", [tensor])
    padded = header + b"\x00" * (HEADER_ROOM + 100)  # longer than an envelope holds; specs sees every byte

    def specs(data: bytes):
        assert data == padded
        return header_specs(data[: len(header)])

    loopback.send(padded, [tensor])
    received_header, (received,) = loopback.recv(specs, TIMEOUT_S)
    assert received_header == padded and torch.equal(received, tensor)


def test_ffn_request_frames_from_afd_wire(loopback):
    request = FfnRequest(
        layer=3,
        hidden=torch.randn(6, 32, dtype=torch.bfloat16, device=DEVICE),
        expert_ids=torch.tensor([[0, -1]] * 6, dtype=torch.int32, device=DEVICE),
        expert_weights=torch.tensor([[0.7, 0.0]] * 6, dtype=torch.float32, device=DEVICE),
        microbatch=1,
    )
    limits = FrameLimits(hidden_size=32, num_layers=4, top_k=2, max_local_experts=4)
    loopback.send(*encode_request(request, seq=11, sender="attn-0"))
    header, tensors = loopback.recv(lambda h: decode_header(h, limits).tensor_specs(), TIMEOUT_S)
    decoded = request_from_frame(decode_header(header, limits), tensors)
    assert (decoded.layer, decoded.microbatch) == (3, 1)
    assert torch.equal(decoded.hidden, request.hidden) and torch.equal(decoded.expert_ids, request.expert_ids)


def test_a_rejected_header_costs_one_frame_not_the_channel(loopback):
    good = torch.randn(4, 8, dtype=torch.bfloat16, device=DEVICE)
    loopback.send(make_header("echo", [torch.zeros(1000, device=DEVICE)]), [torch.zeros(1000, device=DEVICE)])
    loopback.send(make_header("sink", [good]), [good])

    def refuse_echo(header: bytes):
        if read_header(header)[0] == "echo":
            raise ValueError("echo frames are not welcome here")
        return header_specs(header)

    with pytest.raises(ValueError, match="not welcome"):
        loopback.recv(refuse_echo, TIMEOUT_S)
    _, (received,) = loopback.recv(refuse_echo, TIMEOUT_S)
    assert torch.equal(received, good)


def test_no_frame_within_the_timeout_leaves_the_channel_usable(loopback):
    started = time.monotonic()
    with pytest.raises(PeerError, match=r"peer self: no frame within 0\.2s"):
        loopback.recv(header_specs, 0.2)
    assert time.monotonic() - started < 2.0
    tensor = torch.ones(3, dtype=torch.bfloat16, device=DEVICE)
    loopback.send(make_header("sink", [tensor]), [tensor])
    assert torch.equal(loopback.recv(header_specs, TIMEOUT_S)[1][0], tensor)


def test_close_ends_a_receive_that_waits_forever(loopback):
    outcome: list[BaseException] = []

    def receive() -> None:
        try:
            loopback.recv(header_specs, math.inf)
        except BaseException as exc:
            outcome.append(exc)

    receiver = threading.Thread(target=receive, daemon=True)
    receiver.start()
    time.sleep(0.2)
    started = time.monotonic()
    loopback.close()
    receiver.join(5.0)
    assert not receiver.is_alive() and time.monotonic() - started < 5.0
    assert isinstance(outcome[0], PeerError) and "channel is closed" in str(outcome[0])
    with pytest.raises(PeerError, match="channel is closed"):
        loopback.send(b"", [])


# ---------------------------------------------------------------------------------------------------
# Two processes: rank 0 here, rank 1 in `python -m afd.transport.nccl.selftest peer`
# ---------------------------------------------------------------------------------------------------


PAIR_REASON = pair_supported() if REASON is None else None
PEER_DEVICE = 1 if torch.cuda.device_count() >= 2 else 0
needs_pair = pytest.mark.skipif(PAIR_REASON is not None, reason=f"no two-process NCCL pair here: {PAIR_REASON}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(30)


@needs_pair
def test_a_pair_echoes_frames_and_the_peer_exits_cleanly():
    channel, process = open_pair(DEVICE, PEER_DEVICE, NcclOptions(connect_timeout=TIMEOUT_S, io_timeout=30.0))
    try:
        for tensors in (
            [torch.randn(64, 128, dtype=torch.bfloat16, device=DEVICE)],
            [torch.randn(1 << 20, dtype=torch.bfloat16, device=DEVICE), torch.arange(5, dtype=torch.int32)],
        ):
            channel.send(make_header("echo", tensors), tensors)
            _, echoed = channel.recv(header_specs, TIMEOUT_S)
            assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(echoed, tensors, strict=True))
        channel.send(make_header("bye", []), [])
        channel.flush()
        assert process.wait(30) == 0
    finally:
        channel.close()
        _stop(process)


@needs_pair
def test_a_dead_peer_fails_send_and_recv_within_the_timeout():
    io_timeout = 3.0
    channel, process = open_pair(DEVICE, PEER_DEVICE, NcclOptions(connect_timeout=TIMEOUT_S, io_timeout=io_timeout))
    try:
        alive = [torch.ones(16, dtype=torch.bfloat16, device=DEVICE)]
        channel.send(make_header("echo", alive), alive)
        assert torch.equal(channel.recv(header_specs, TIMEOUT_S)[1][0], alive[0])
        process.kill()
        process.wait(30)
        # 64 MiB: far more than NCCL's staging buffers, so nothing can complete without a live receiver.
        big = [torch.zeros(32 << 20, dtype=torch.bfloat16, device=DEVICE)]
        started = time.monotonic()
        with pytest.raises(PeerError) as caught:
            channel.send(make_header("sink", big), big)
            channel.flush()
        assert caught.value.peer == "selftest-peer"
        assert time.monotonic() - started < io_timeout + 10.0
        with pytest.raises(PeerError, match="selftest-peer"):
            channel.recv(header_specs, 1.0)
        started = time.monotonic()
        channel.close()
        assert time.monotonic() - started < channel.options.close_grace + 5.0
    finally:
        channel.close()
        _stop(process)


def test_a_peer_that_never_joins_is_given_up_on():
    listener = NcclListener("ghost", DEVICE, NcclOptions(connect_timeout=2.0))
    started = time.monotonic()
    with pytest.raises(PeerError, match=r"peer ghost: did not join the NCCL pair within 2\.0s"):
        listener.accept(2.0)
    assert time.monotonic() - started < 10.0


# ---------------------------------------------------------------------------------------------------
# Streams: the transfer runs on the channel's own streams, ordered by events, and never through the host
# ---------------------------------------------------------------------------------------------------


def _cycles_for(seconds: float) -> int:
    """GPU clock cycles `torch.cuda._sleep` spins for about `seconds` on this device (measured)."""
    probe = 20_000_000
    with torch.cuda.device(DEVICE):
        torch.cuda._sleep(probe)  # warm-up
        torch.cuda.synchronize(DEVICE)
        started = time.monotonic()
        torch.cuda._sleep(probe)
        torch.cuda.synchronize(DEVICE)
        elapsed = max(time.monotonic() - started, 1e-4)
    return int(probe * seconds / elapsed)


def test_send_waits_for_the_producer_on_the_device_not_on_the_host(loopback):
    busy = _cycles_for(1.0)
    with torch.cuda.device(DEVICE):
        torch.cuda._sleep(busy)  # the compute stream is busy for about a second...
        produced = torch.full((1 << 20,), 3.0, dtype=torch.bfloat16, device=DEVICE)  # ...and then writes this
        started = time.monotonic()
        loopback.send(make_header("sink", [produced]), [produced])
        assert time.monotonic() - started < 0.5  # send queued the transfer behind the producer, did not wait
        _, (received,) = loopback.recv(header_specs, TIMEOUT_S)
    assert torch.equal(received, produced)  # the send stream did wait (on the device) for the values


def test_the_compute_stream_does_not_wait_for_the_send_stream(loopback):
    busy = _cycles_for(1.0)
    with torch.cuda.device(DEVICE):
        compute = torch.cuda.current_stream(DEVICE)
        send_stream = loopback._send.stream  # the channel's dedicated stream (private: observed, not used)
        with torch.cuda.stream(send_stream):
            torch.cuda._sleep(busy)  # the transfer of the next frame cannot start for about a second
        tensor = torch.randn(1 << 20, dtype=torch.bfloat16, device=DEVICE)
        loopback.send(make_header("sink", [tensor]), [tensor])
        after = torch.cuda.Event()
        after.record(compute)  # compute work queued after the send
        deadline = time.monotonic() + 0.5
        while not after.query():
            assert time.monotonic() < deadline, "the compute stream waited for the channel's send stream"
            time.sleep(0.001)
        assert not send_stream.query()  # the frame's transfer was still pending while compute went on
        _, (received,) = loopback.recv(header_specs, TIMEOUT_S)
    assert torch.equal(received, tensor)


class _HostTensors(torch.overrides.TorchFunctionMode):
    """Records every torch call that makes or returns a host tensor of at least `nbytes` bytes."""

    def __init__(self, nbytes: int) -> None:
        super().__init__()
        self.nbytes = nbytes
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        for output in outputs:
            on_host = isinstance(output, torch.Tensor) and output.device.type == "cpu"
            if on_host and output.numel() * output.element_size() >= self.nbytes:
                self.seen.append(getattr(func, "__name__", str(func)))
        return result


def test_a_frame_moves_device_to_device_without_a_host_copy(loopback):
    payload = torch.randn(4 << 20, dtype=torch.bfloat16, device=DEVICE)  # 8 MiB
    nbytes = payload.numel() * payload.element_size()
    with _HostTensors(nbytes) as host:
        loopback.send(make_header("sink", [payload]), [payload])
        _, (received,) = loopback.recv(header_specs, TIMEOUT_S)
    assert host.seen == []  # only the 4 KiB envelope (and a long header) pass through host memory
    assert received.device == torch.device("cuda", DEVICE)
    assert torch.equal(received, payload)
