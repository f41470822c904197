"""Pairwise channels (gloo, shared memory): bit-exact frames, large frames, timeouts, bad frames, dead peers."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from afd.errors import PeerError
from afd.transport.channel import Channel, ChannelTimeout, TensorSpec
from afd.transport.gloo_channel import GlooStoreServer
from afd.transport.rendezvous import ChannelListener, establish
from afd.transport.shm_channel import SHM_DIR, ShmListener, ShmOptions
from afd.wire.frames import MalformedHeader
from tests.integration.channel_peer import connect, header_for, specs

BACKENDS = ["gloo", "shm"]
REPO_ROOT = Path(__file__).resolve().parents[2]
PEER_START_S = 60.0
"""Starting a peer process imports torch: generous on a loaded 2-core machine."""


def afd_segments() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith("afd-")}


@pytest.fixture
def listener_for() -> Iterator[Callable[[str], ChannelListener]]:
    """Factory of attention-side listeners (small shm rings, so large frames must stream through)."""
    stores: list[GlooStoreServer] = []

    def make(backend: str) -> ChannelListener:
        if backend == "gloo":
            stores.append(GlooStoreServer("127.0.0.1"))
            return stores[-1].listener("test-ffn")
        return ShmListener("test-ffn", ShmOptions(ring_bytes=1 << 20, chunk_bytes=256 << 10))

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def pair(listener_for) -> Iterator[Callable[[str], tuple[Channel, Channel]]]:
    """Factory of in-process channel pairs (attention end, FFN end); closed at teardown."""
    opened: list[Channel] = []

    def make(backend: str) -> tuple[Channel, Channel]:
        joined: dict[str, Channel] = {}
        attention = establish(
            listener_for(backend), lambda r: joined.update(ffn=connect(backend, r, "test-attn")), timeout=30
        )
        opened.extend([attention, joined["ffn"]])
        return attention, joined["ffn"]

    yield make
    for channel in opened:
        channel.close()


class PeerProcess:
    """A channel_peer process; stopped by the test through this handle."""

    def __init__(self, backend: str, listener: ChannelListener, mode: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "tests.integration.channel_peer", "--backend", backend]
        command += ["--rendezvous", listener.rendezvous.hex(), "--mode", mode]
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE)
        try:
            self.channel = listener.accept(PEER_START_S)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


def sample_tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 5, generator=generator).to(torch.bfloat16),
        torch.arange(-7, 6, dtype=torch.int32),
        torch.empty(0, 4),  # zero-sized tensors travel too
        torch.randn(7, generator=generator),  # 28 bytes: the next tensor starts unaligned unless padded
        torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.bfloat16),
    ]


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_exact(sent: list[torch.Tensor], received: list[torch.Tensor]) -> None:
    assert len(sent) == len(received)
    for a, b in zip(sent, received, strict=True):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert raw_bytes(a) == raw_bytes(b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_round_trip_bit_exactly_both_ways(backend, pair):
    attention, ffn = pair(backend)
    tensors = sample_tensors()
    attention.send(header_for(tensors), tensors)
    header, received = ffn.recv(specs, 10.0)
    assert header == header_for(tensors)
    assert_bit_exact(tensors, received)
    ffn.send(header, received)
    _, back = attention.recv(specs, 10.0)
    assert_bit_exact(tensors, back)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_header_costs_one_frame_not_the_channel(backend, pair):
    attention, ffn = pair(backend)
    tensors = sample_tensors()
    attention.send(header_for(tensors), tensors)
    attention.send(header_for(tensors[:2]), tensors[:2])

    def rejecting(header: bytes) -> list[TensorSpec]:
        raise MalformedHeader("test rejects this header")

    with pytest.raises(MalformedHeader, match="test rejects"):
        ffn.recv(rejecting, 10.0)
    _, received = ffn.recv(specs, 10.0)  # the next frame arrives intact
    assert_bit_exact(tensors[:2], received)


@pytest.mark.parametrize("backend", BACKENDS)
def test_recv_timeout_names_peer_and_leaves_channel_usable(backend, pair):
    attention, ffn = pair(backend)
    started = time.monotonic()
    with pytest.raises(ChannelTimeout, match="no frame within") as error:
        ffn.recv(specs, 0.3)
    assert error.value.peer == "test-attn"
    assert time.monotonic() - started < 5.0
    tensors = sample_tensors()
    attention.send(header_for(tensors), tensors)
    _, received = ffn.recv(specs, 10.0)
    assert_bit_exact(tensors, received)


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_ends_a_receive_blocked_on_the_other_side(backend, pair):
    attention, ffn = pair(backend)
    outcome: list[BaseException] = []

    def blocked() -> None:
        try:
            ffn.recv(specs, math.inf)
        except BaseException as exc:
            outcome.append(exc)

    receiver = threading.Thread(target=blocked, daemon=True)
    receiver.start()
    time.sleep(0.2)
    attention.close()
    receiver.join(10.0)
    assert not receiver.is_alive()
    assert isinstance(outcome[0], PeerError) and outcome[0].peer == "test-attn"
    assert not isinstance(outcome[0], ChannelTimeout), "a closed channel must not read as an idle one"
    with pytest.raises(PeerError):
        attention.send(b"", [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_frames_cross_processes_in_order(backend, listener_for):
    peer = PeerProcess(backend, listener_for(backend), "echo")
    try:
        frames = [
            [torch.randn(3 << 20).to(torch.bfloat16)],  # 6 MiB: six times the shm ring
            [torch.arange(1 << 20, dtype=torch.int32), torch.randn(5, 7).to(torch.bfloat16)],
            sample_tensors(),
        ] * 2
        echoes: list[tuple[bytes, list[torch.Tensor]]] = []
        # Replies are read on their own thread while frames go out (as ChannelTransport does): with
        # bounded rings, a side that only writes would stall a peer that cannot write its echo back.
        reader = threading.Thread(target=lambda: echoes.extend(peer.channel.recv(specs, 30.0) for _ in frames))
        reader.start()
        for tensors in frames:
            peer.channel.send(header_for(tensors), tensors)
        reader.join(60.0)
        assert len(echoes) == len(frames)
        for tensors, (header, echoed) in zip(frames, echoes, strict=True):
            assert header == header_for(tensors)
            assert_bit_exact(tensors, echoed)
        peer.channel.close()
        assert peer.process.wait(timeout=30) == 0, "the peer's receive ends when this side closes"
    finally:
        peer.kill()


@pytest.mark.parametrize("backend", BACKENDS)
def test_killed_peer_fails_a_blocked_receive_within_the_timeout(backend, listener_for):
    before = afd_segments()
    peer = PeerProcess(backend, listener_for(backend), "hang")
    try:
        assert afd_segments() <= before, "shm segments are unlinked as soon as both sides mapped them"
        killer = threading.Timer(0.5, peer.kill)
        killer.start()
        started = time.monotonic()
        with pytest.raises(PeerError) as error:
            peer.channel.recv(specs, 20.0)
        assert error.value.peer == "test-ffn"
        assert time.monotonic() - started < 10.0, "death is seen when the connection drops, not at the timeout"
        killer.join()
        with pytest.raises(PeerError, match="test-ffn"):
            tensors = sample_tensors()
            peer.channel.send(header_for(tensors), tensors)
    finally:
        peer.kill()
        peer.channel.close()
    assert afd_segments() <= before


@pytest.mark.parametrize("backend", BACKENDS)
def test_accept_without_a_peer_times_out_naming_it(backend, listener_for):
    before = afd_segments()
    listener = listener_for(backend)
    started = time.monotonic()
    with pytest.raises(PeerError, match="test-ffn"):
        listener.accept(0.5)
    assert time.monotonic() - started < 10.0
    listener.close()
    assert afd_segments() <= before, "an abandoned shm listener unlinks its segments"
