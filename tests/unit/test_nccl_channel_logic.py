"""The NCCL channel's own logic, end to end on the CPU, against a simulated libnccl and simulated CUDA streams.

Without a GPU this is where the frame protocol, the send/receive threads, deadlines, CLOSE and peer
death are exercised. The simulation, small on purpose:
- a "fabric" matches each rank's posted sends with its peer's posted receives in FIFO order per
  (communicator, sender, receiver) and copies the bytes (memmove between CPU tensors); a send and a
  receive of different sizes is recorded as a mismatch, which every test asserts never happens;
- one ncclGroupStart/End is one operation on its stream; an event is done once every operation recorded
  before it on its stream is; a queued device-to-host copy runs when the operations before it are done;
- communicators are non-blocking: init stays in progress until both ranks joined, each group end
  reports in progress once;
- a killed rank's operations vanish and never complete, as when a process on the same host dies
  (optionally NCCL reports ncclRemoteError to the survivor, as it does across hosts).
What it cannot check (kernels, real NCCL semantics, CUDA memory) is for tests/gpu.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from afd.errors import PeerError
from afd.transport.channel import TensorSpec
from afd.transport.nccl import channel as nccl_channel
from afd.transport.nccl import channel_base as nccl_channel_base
from afd.transport.nccl import receiving as nccl_receiving
from afd.transport.nccl.channel import NcclChannel, NcclListener, NcclOptions, connect_nccl
from afd.transport.nccl.first_message import HEADER_ROOM
from afd.transport.nccl.library import NcclLibrary
from afd.transport.nccl.selftest import (
    header_specs,
    make_header,
    measure_bandwidth,
    measure_latency,
    read_header,
    say_goodbye,
    serve_peer,
)
from afd.wire.frames import PayloadMismatch

IN_PROGRESS = 7
REMOTE_ERROR = 6
ITEMSIZE = {0: 1, 1: 1, 2: 4, 3: 4, 4: 8, 5: 8, 6: 2, 7: 4, 8: 8, 9: 2}


@dataclass(eq=False)
class _Op:
    """One operation on a simulated stream: a group of NCCL transfers, or a deferred copy."""

    pending: int = 0
    run: Callable[[], None] | None = None
    done: bool = False


@dataclass(eq=False)
class _Message:
    ptr: int
    nbytes: int
    op: _Op
    comm: _Comm


@dataclass(eq=False)
class _Comm:
    handle: int
    world: bytes
    rank: int
    nranks: int
    launching: bool = False
    error: int = 0
    dead: bool = False
    aborted: bool = False
    ops: list[_Op] = field(default_factory=list)


class Fabric:
    """The simulated GPUs, NCCL and streams of one test (both ends of a pair live in this process)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.streams: dict[int, SimStream] = {}
        self.comms: dict[int, _Comm] = {}
        self.worlds: dict[bytes, dict[int, _Comm]] = collections.defaultdict(dict)
        self.sends: dict[tuple[bytes, int, int], collections.deque[_Message]] = collections.defaultdict(
            collections.deque
        )
        self.recvs: dict[tuple[bytes, int, int], collections.deque[_Message]] = collections.defaultdict(
            collections.deque
        )
        self.mismatches: list[str] = []
        self.aborted: list[int] = []
        self.handles = itertools.count(0x1000)
        self.group = threading.local()
        self.default_stream = SimStream(self)

    # -- the "hardware" ------------------------------------------------------------------------------

    def match(self) -> None:
        with self.lock:
            for key, sends in self.sends.items():
                recvs = self.recvs[key]
                while sends and recvs:
                    send, recv = sends.popleft(), recvs.popleft()
                    if send.nbytes != recv.nbytes:
                        self.mismatches.append(
                            f"{key[1]}->{key[2]}: sent {send.nbytes} B, receive posted {recv.nbytes} B"
                        )
                    ctypes.memmove(recv.ptr, send.ptr, min(send.nbytes, recv.nbytes))
                    for message in (send, recv):
                        message.op.pending -= 1
                        message.op.done = message.op.pending == 0

    def kill_rank(self, rank: int, remote_error: bool = False) -> None:
        """The process of `rank` dies: its transfers vanish; survivors see ncclRemoteError if `remote_error`."""
        with self.lock:
            for comm in self.comms.values():
                if comm.rank == rank:
                    comm.dead = True
                elif remote_error:
                    comm.error = REMOTE_ERROR
            for queues in (self.sends, self.recvs):
                for queue in queues.values():
                    for message in [m for m in queue if m.comm.dead]:
                        queue.remove(message)

    # -- the libnccl functions -----------------------------------------------------------------------

    def library(self) -> NcclLibrary:
        functions = {
            "ncclGetVersion": self._version,
            "ncclGetUniqueId": self._unique_id,
            "ncclCommInitRank": lambda *a: 5,  # the channel must only ever use non-blocking init
            "ncclCommInitRankConfig": self._init,
            "ncclCommDestroy": self._abort,
            "ncclCommAbort": self._abort,
            "ncclCommGetAsyncError": self._state,
            "ncclGroupStart": self._group_start,
            "ncclGroupEnd": self._group_end,
            "ncclSend": lambda *a: self._transfer("send", *a),
            "ncclRecv": lambda *a: self._transfer("recv", *a),
            "ncclGetErrorString": lambda code: {6: b"remote process exited"}.get(code, b"some NCCL error"),
            "ncclGetLastError": lambda comm: b"",
        }
        namespace = type("SimLibnccl", (), {})()
        for name, body in functions.items():
            setattr(namespace, name, _plain(body))
        return NcclLibrary(namespace, "simulated libnccl")

    def _version(self, version: Any) -> int:
        version.contents.value = 23203
        return 0

    def _unique_id(self, unique_id: Any) -> int:
        ctypes.memmove(ctypes.addressof(unique_id.contents), os.urandom(128), 128)
        return 0

    def _init(self, comm_out: Any, nranks: int, unique_id: Any, rank: int, config: Any) -> int:
        assert config.contents.blocking == 0
        with self.lock:
            comm = _Comm(next(self.handles), unique_id.to_bytes(), rank, nranks)
            self.comms[comm.handle] = comm
            self.worlds[comm.world][rank] = comm
        comm_out.contents.value = comm.handle
        return IN_PROGRESS

    def _state(self, handle: int, state: Any) -> int:
        with self.lock:
            comm = self.comms[handle]
            if comm.error:
                state.contents.value = comm.error
            elif len(self.worlds[comm.world]) < comm.nranks or comm.launching:
                comm.launching = False
                state.contents.value = IN_PROGRESS
            else:
                state.contents.value = 0
        return 0

    def _abort(self, handle: int) -> int:
        with self.lock:
            comm = self.comms.pop(handle)
            comm.aborted = True
            self.aborted.append(handle)
            for op in comm.ops:
                op.done = True  # aborted kernels exit
            for queues in (self.sends, self.recvs):
                for queue in queues.values():
                    for message in [m for m in queue if m.comm is comm]:
                        queue.remove(message)
        return 0

    def _group_start(self) -> int:
        self.group.transfers = []
        return 0

    def _transfer(self, kind: str, ptr: int, count: int, dtype: int, peer: int, handle: int, stream: int) -> int:
        self.group.transfers.append((kind, ptr, count * ITEMSIZE[dtype], peer, handle, stream))
        return 0

    def _group_end(self) -> int:
        transfers, self.group.transfers = self.group.transfers, []
        if not transfers:
            return 0
        with self.lock:
            op = _Op(pending=len(transfers))
            stream = self.streams[transfers[0][5]]
            stream.ops.append(op)
            for kind, ptr, nbytes, peer, handle, _ in transfers:
                comm = self.comms[handle]
                comm.ops.append(op)
                comm.launching = True
                if comm.dead:
                    continue
                key = (comm.world, comm.rank, peer) if kind == "send" else (comm.world, peer, comm.rank)
                (self.sends if kind == "send" else self.recvs)[key].append(_Message(ptr, nbytes, op, comm))
            self.match()
        return IN_PROGRESS


def _plain(body: Callable[..., int | bytes]) -> Callable[..., int | bytes]:
    def call(*args: Any) -> int | bytes:
        return body(*args)

    return call


class SimStream:
    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.ops: list[_Op] = []
        self.cuda_stream = id(self)
        fabric.streams[self.cuda_stream] = self

    def wait_stream(self, other: SimStream) -> None:
        """Ordering across streams is immaterial here: CPU data is ready when work is posted."""

    def wait_event(self, event: SimEvent) -> None:
        """As wait_stream."""

    def progress(self) -> None:
        with self.fabric.lock:
            before_done = True
            for op in self.ops:
                if not op.done and op.run is not None and before_done:
                    op.run()
                    op.done = True
                before_done = before_done and op.done


class SimEvent:
    def __init__(self, fabric: Fabric) -> None:
        self.fabric = fabric
        self.stream: SimStream | None = None
        self.index = 0

    def record(self, stream: SimStream | None = None) -> None:
        self.stream = stream or self.fabric.default_stream
        self.index = len(self.stream.ops)

    def query(self) -> bool:
        if self.stream is None:
            return True
        self.stream.progress()
        with self.fabric.lock:
            return all(op.done for op in self.stream.ops[: self.index])


@pytest.fixture
def fabric(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fabric]:
    fabric = Fabric()
    library = fabric.library()
    monkeypatch.setattr(nccl_channel, "resolve_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(nccl_channel, "load_library", lambda path=None: library)
    monkeypatch.setattr(nccl_channel_base, "_pinned", lambda size: torch.zeros(size, dtype=torch.uint8))

    def stage_to_host(host: torch.Tensor, source: torch.Tensor, stream: SimStream) -> None:
        stream.ops.append(_Op(run=lambda: host.copy_(source)))

    monkeypatch.setattr(nccl_receiving, "_stage_to_host", stage_to_host)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: SimStream(fabric))
    monkeypatch.setattr(torch.cuda, "Event", lambda *args, **kwargs: SimEvent(fabric))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fabric.default_stream)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    yield fabric
    assert fabric.mismatches == [], "sender and receiver posted different groups"


FAST = NcclOptions(connect_timeout=5.0, io_timeout=1.0, close_grace=0.2)


@contextlib.contextmanager
def pair(options: NcclOptions = FAST) -> Iterator[tuple[NcclChannel, NcclChannel]]:
    """An attention end (rank 0, this thread) and an FFN end (rank 1, joined from another thread)."""
    listener = NcclListener("ffn-0", options=options)
    joined: list[NcclChannel] = []
    joiner = threading.Thread(target=lambda: joined.append(connect_nccl(listener.rendezvous, "attn-0", None, options)))
    joiner.start()
    attention = listener.accept(options.connect_timeout)
    joiner.join(10)
    (ffn,) = joined
    try:
        yield attention, ffn
    finally:
        attention.close()
        ffn.close()


def _frame(*tensors: torch.Tensor, op: str = "sink") -> tuple[bytes, list[torch.Tensor]]:
    return make_header(op, tensors), list(tensors)


def _equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return len(got) == len(want) and all(
        a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want, strict=True)
    )


def test_frames_cross_a_pair_both_ways_bit_for_bit(fabric):
    with pair() as (attention, ffn):
        request = [torch.randn(5, 64, dtype=torch.bfloat16), torch.tensor([[1, -1]] * 5, dtype=torch.int32)]
        attention.send(*_frame(*request))
        header, received = ffn.recv(header_specs, 5.0)
        assert read_header(header)[0] == "sink" and _equal(received, request)
        reply = [torch.randn(5, 64, dtype=torch.bfloat16)]
        ffn.send(*_frame(*reply))
        assert _equal(attention.recv(header_specs, 5.0)[1], reply)
        empty = [torch.empty(0, 64, dtype=torch.bfloat16)]
        attention.send(*_frame(*empty))
        attention.send(*_frame())
        assert _equal(ffn.recv(header_specs, 5.0)[1], empty) and ffn.recv(header_specs, 5.0)[1] == []
        attention.flush()


def test_many_in_flight_frames_keep_their_order_under_concurrent_echo(fabric):
    options = NcclOptions(connect_timeout=5.0, io_timeout=5.0, max_pending_frames=3, close_grace=0.5)
    frames = [[torch.full((n + 1, 8), float(n), dtype=torch.bfloat16)] for n in range(40)]
    echoed: list[list[torch.Tensor]] = []
    with pair(options) as (attention, ffn):

        def echo() -> None:
            for _ in frames:
                header, tensors = ffn.recv(header_specs, 5.0)
                ffn.send(header, tensors)

        def collect() -> None:
            for _ in frames:
                echoed.append(attention.recv(header_specs, 5.0)[1])

        threads = [threading.Thread(target=echo), threading.Thread(target=collect)]
        for thread in threads:
            thread.start()
        for tensors in frames:  # the caller's thread sends while another thread receives on the same channel
            attention.send(*_frame(*tensors))
        for thread in threads:
            thread.join(20)
        assert not any(thread.is_alive() for thread in threads)
    assert len(echoed) == len(frames) and all(_equal(a, b) for a, b in zip(echoed, frames, strict=True))


def test_a_long_header_travels_after_the_envelope(fabric):
    tensor = torch.arange(6, dtype=torch.float32)
    header = make_header("sink", [tensor])
    padded = header + b" " * (HEADER_ROOM + 10)
    with pair() as (attention, ffn):
        attention.send(padded, [tensor])
        received_header, received = ffn.recv(lambda h: header_specs(h[: len(header)]), 5.0)
        assert received_header == padded and _equal(received, [tensor])


def test_a_refused_or_inconsistent_header_costs_that_frame_only(fabric):
    good = [torch.randn(3, 4, dtype=torch.bfloat16)]
    with pair() as (attention, ffn):
        attention.send(*_frame(torch.zeros(1000), op="echo"))
        attention.send(make_header("sink", [torch.zeros(2, 2)]), [torch.zeros(16)])  # header says 16 B, sends 64
        attention.send(*_frame(*good))

        def refuse_echo(header: bytes) -> list[TensorSpec]:
            if read_header(header)[0] == "echo":
                raise ValueError("echo refused")
            return header_specs(header)

        with pytest.raises(ValueError, match="echo refused"):
            ffn.recv(refuse_echo, 5.0)
        with pytest.raises(PayloadMismatch, match=r"header announces tensors of \[16\] bytes, envelope says \[64\]"):
            ffn.recv(refuse_echo, 5.0)
        assert _equal(ffn.recv(refuse_echo, 5.0)[1], good)


def test_a_receive_timeout_leaves_its_receive_posted_for_the_next_call(fabric):
    with pair() as (attention, ffn):
        started = time.monotonic()
        with pytest.raises(PeerError, match=r"peer attn-0: no frame within 0\.2s"):
            ffn.recv(header_specs, 0.2)
        assert time.monotonic() - started < 2.0
        tensor = [torch.ones(4)]
        attention.send(*_frame(*tensor))
        assert _equal(ffn.recv(header_specs, 5.0)[1], tensor)


def test_close_tells_a_peer_blocked_in_recv(fabric):
    with pair() as (attention, ffn):
        outcome: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _capture(outcome, lambda: ffn.recv(header_specs, math.inf)))
        waiter.start()
        time.sleep(0.1)
        attention.close()
        waiter.join(5)
        assert not waiter.is_alive()
        assert isinstance(outcome[0], PeerError) and str(outcome[0]) == "peer attn-0: closed the channel"
        with pytest.raises(PeerError, match="channel is broken: the peer closed the channel"):
            ffn.send(*_frame())
        attention.close()  # idempotent
    assert len(fabric.aborted) == 4  # both communicators of both ends


def test_close_ends_this_ends_own_blocked_recv(fabric):
    with pair() as (attention, _):
        outcome: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _capture(outcome, lambda: attention.recv(header_specs, math.inf)))
        waiter.start()
        time.sleep(0.1)
        started = time.monotonic()
        attention.close()
        waiter.join(5)
        assert not waiter.is_alive() and time.monotonic() - started < 3.0
        assert str(outcome[0]) == "peer ffn-0: channel is closed"


def test_a_silently_dead_peer_fails_sends_within_io_timeout(fabric):
    with pair() as (attention, ffn):
        attention.send(*_frame(torch.ones(8)))
        assert ffn.recv(header_specs, 5.0)
        fabric.kill_rank(1)
        started = time.monotonic()
        attention.send(*_frame(torch.ones(1 << 16)))
        with pytest.raises(PeerError, match=r"peer ffn-0: took no frame for 1\.0s") as caught:
            attention.flush(timeout=30.0)
        assert caught.value.peer == "ffn-0" and 0.9 < time.monotonic() - started < 3.0
        with pytest.raises(PeerError, match="channel is broken: took no frame"):
            attention.recv(header_specs, 5.0)
        with pytest.raises(PeerError, match="channel is broken"):
            attention.send(*_frame())
        started = time.monotonic()
        attention.close()
        assert time.monotonic() - started < 1.0


def test_a_dead_peer_reported_by_nccl_ends_a_receive_that_waits_forever(fabric):
    with pair() as (attention, _):
        outcome: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _capture(outcome, lambda: attention.recv(header_specs, math.inf)))
        waiter.start()
        time.sleep(0.1)
        fabric.kill_rank(1, remote_error=True)
        waiter.join(5)
        assert not waiter.is_alive()
        assert isinstance(outcome[0], PeerError) and "connection lost" in str(outcome[0])
        assert "remote process exited [ncclRemoteError]" in str(outcome[0])


def test_a_peer_that_never_joins_is_given_up_on_and_nothing_leaks(fabric):
    listener = NcclListener("ffn-ghost", options=NcclOptions(connect_timeout=0.3))
    started = time.monotonic()
    with pytest.raises(PeerError, match=r"peer ffn-ghost: did not join the NCCL pair within 0\.3s"):
        listener.accept(0.3)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert len(fabric.aborted) == 2 and not fabric.comms


def test_loopback_round_trips_and_times_out_cleanly(fabric):
    channel = NcclChannel.loopback("self", options=FAST)
    try:
        frames = [[torch.randn(4, 4, dtype=torch.bfloat16)], [torch.arange(3, dtype=torch.int32)], []]
        for tensors in frames:
            channel.send(*_frame(*tensors))
        for tensors in frames:
            assert _equal(channel.recv(header_specs, 5.0)[1], tensors)
        with pytest.raises(PeerError, match=r"no frame within 0\.1s"):
            channel.recv(header_specs, 0.1)
        channel.send(*_frame(torch.ones(2)))
        with pytest.raises(PeerError, match="loopback frames were not received in time"):
            channel.flush(timeout=0.1)  # its own recv is the only taker
        assert _equal(channel.recv(header_specs, 5.0)[1], [torch.ones(2)])
        channel.flush(timeout=0.1)
    finally:
        channel.close()


def test_loopback_close_ends_a_waiting_receive(fabric):
    channel = NcclChannel.loopback("self", options=FAST)
    outcome: list[BaseException] = []
    waiter = threading.Thread(target=lambda: _capture(outcome, lambda: channel.recv(header_specs, math.inf)))
    waiter.start()
    time.sleep(0.1)
    channel.close()
    waiter.join(5)
    assert not waiter.is_alive() and str(outcome[0]) == "peer self: channel is closed"


def test_the_self_test_protocol_against_its_peer(fabric, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    listener = NcclListener("selftest-peer", options=FAST)
    exit_codes: list[int] = []
    peer = threading.Thread(target=lambda: exit_codes.append(serve_peer(listener.rendezvous, 0, timeout=5.0)))
    peer.start()
    channel = listener.accept(5.0)
    try:
        rows = measure_bandwidth(channel, [4096, 1 << 16], iters=3, warmup=1, loopback=False)
        latency = measure_latency(channel, 5, loopback=False)  # echo frames: a reply per frame
        started = time.monotonic()
        say_goodbye(channel)
        peer.join(5)
        assert exit_codes == [0] and time.monotonic() - started < 1.0
    finally:
        channel.close()
    assert [(row["size_bytes"], row["count"], row["type"]) for row in rows] == [
        (4096, 2048, "bfloat16"),
        (1 << 16, 1 << 15, "bfloat16"),
    ]
    assert all(row["time_us"] > 0 and row["algbw_gbps"] == row["busbw_gbps"] > 0 for row in rows)
    assert 0 < latency["p50_us"] <= latency["p99_us"]


def test_the_self_test_loopback_measurement(fabric, monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    channel = NcclChannel.loopback("self", options=FAST)
    try:
        (row,) = measure_bandwidth(channel, [1 << 12], iters=4, warmup=2, loopback=True)
        assert row["size_bytes"] == 1 << 12 and row["time_us"] > 0
        assert measure_latency(channel, 3, loopback=True)["p50_us"] > 0
        channel.flush(timeout=0.1)  # every frame was received
    finally:
        channel.close()


def _capture(outcome: list[BaseException], call: Callable[[], object]) -> None:
    try:
        call()
    except BaseException as exc:
        outcome.append(exc)
