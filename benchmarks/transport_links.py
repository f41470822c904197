"""The moving parts of `afd bench transport`: one link type per transport, and the worker processes.

A link carries payloads (`[count] bfloat16` tensors) one way and small acknowledgements (or echoes) back.
Receivers *offer* links (a listening socket, a gloo store, shared-memory rings, a gRPC server) and print
the offers as one JSON line; the controller starts the senders with those offers, senders join and run
the plan: for every size, `warmup` then `iters` payloads to every receiver, each phase closed by one ack
per receiver, timed on the sender. Then sender 0 and receiver 0 ping-pong a fixed size for latency.
Workers print JSON lines on stdout; nothing is pickled between processes.

Run as `python -m benchmarks.transport_links --role sender|receiver ...` (the controller does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import queue
import socket
import struct
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass

import grpc
import grpc.aio
import msgpack
import numpy as np
import torch

from afd.devices import synchronize
from afd.errors import PeerError
from afd.transport.channel import Channel, TensorSpec
from afd.transport.gloo_channel import GlooStoreServer, connect_gloo
from afd.transport.shm_channel import ShmListener, connect_shm
from afd.transport.staging import stage_once, to_device
from afd.wire import grpc_data
from afd.wire.event_loop import EventLoopThread

PAYLOAD_DTYPE = torch.bfloat16
"""What hidden states travel as; `count` in the table is elements of this type."""
LINK_TIMEOUT_S = 60.0
"""Longest wait for any single payload or ack; a benchmark never hangs on a dead peer."""
MAX_PAYLOAD_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class Plan:
    """What every worker of one run does, in lockstep."""

    sizes: list[int]
    """Payload bytes per frame, in order."""
    iters: list[int]
    """Timed frames per link for each size."""
    warmup: list[int]
    """Untimed frames per link before each size's timed ones."""
    latency_bytes: int
    """Payload of the ping-pong latency probe (sender 0 <-> receiver 0); 0 skips it."""
    latency_iters: int
    """Timed round trips of the probe (after a tenth as many untimed)."""
    streams: int = 1
    """gRPC only: Exchange streams (each on its own connection) per link, frames round-robin over them."""
    device: str = "cpu"
    """Where payloads live on both ends ("cuda:0"...): host transports stage them through pinned memory
    (afd.transport.staging) and the receiver moves them onto the device; NCCL moves them device to device."""


def payload(nbytes: int, device: str = "cpu") -> torch.Tensor:
    return torch.ones(nbytes // PAYLOAD_DTYPE.itemsize, dtype=PAYLOAD_DTYPE, device=device)


ACK = payload(2)


class BenchLink(ABC):
    """One end of one sender->receiver link."""

    @abstractmethod
    def send(self, data: torch.Tensor) -> None:
        """Send a flat tensor; returns once the transport has taken it (not necessarily delivered)."""

    @abstractmethod
    def recv(self) -> torch.Tensor:
        """The next flat tensor from the peer (within LINK_TIMEOUT_S)."""

    def close(self) -> None:  # noqa: B027 - most links have something to close, inproc has not
        """Release the link."""


# ---------------------------------------------------------------------------------------------------
# Baseline: plain blocking TCP sockets, sendall / recv_into a preallocated buffer
# ---------------------------------------------------------------------------------------------------

_LENGTH = struct.Struct("<Q")


class TcpLink(BenchLink):
    def __init__(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(LINK_TIMEOUT_S)
        self.sock = sock
        self.buffer = np.empty(0, dtype=np.uint8)
        self.length = bytearray(_LENGTH.size)

    def send(self, data: torch.Tensor) -> None:
        raw = data.view(torch.uint8).numpy()
        self.sock.sendall(_LENGTH.pack(raw.nbytes))
        self.sock.sendall(raw.data)

    def _recv_exactly(self, view: memoryview) -> None:
        while len(view):
            got = self.sock.recv_into(view)
            if got == 0:
                raise PeerError("tcp-peer", "closed the connection")
            view = view[got:]

    def recv(self) -> torch.Tensor:
        self._recv_exactly(memoryview(self.length))
        (nbytes,) = _LENGTH.unpack(self.length)
        if nbytes > MAX_PAYLOAD_BYTES:
            raise PeerError("tcp-peer", f"announced {nbytes} bytes")
        if len(self.buffer) < nbytes:
            self.buffer = np.empty(nbytes, dtype=np.uint8)
        self._recv_exactly(self.buffer.data[:nbytes])
        return torch.from_numpy(self.buffer[:nbytes]).view(PAYLOAD_DTYPE)

    def close(self) -> None:
        self.sock.close()


class TcpOffer:
    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.offer = f"127.0.0.1:{self.server.getsockname()[1]}".encode()

    def accept(self) -> BenchLink:
        self.server.settimeout(LINK_TIMEOUT_S)
        conn, _ = self.server.accept()
        self.server.close()
        return TcpLink(conn)


def join_tcp(offer: bytes) -> BenchLink:
    host, port = offer.decode().rsplit(":", 1)
    return TcpLink(socket.create_connection((host, int(port)), timeout=LINK_TIMEOUT_S))


# ---------------------------------------------------------------------------------------------------
# Channels: gloo and shared memory (and NCCL through the same interface)
# ---------------------------------------------------------------------------------------------------


def _specs(header: bytes) -> list[TensorSpec]:
    (count,) = msgpack.unpackb(header)
    if type(count) is not int or not 0 <= count <= MAX_PAYLOAD_BYTES:
        raise ValueError(f"bad benchmark header {header!r}")
    return [TensorSpec((count,), PAYLOAD_DTYPE)]


class ChannelLink(BenchLink):
    def __init__(self, channel: Channel, device: str = "cpu") -> None:
        self.channel = channel
        self.device = torch.device(device)

    def send(self, data: torch.Tensor) -> None:
        self.channel.send(msgpack.packb([data.numel()]), [data])

    def recv(self) -> torch.Tensor:
        # No timeout: the fast path (ChannelTransport receives this way); a dead peer still fails it at once,
        # and the controller bounds the whole run.
        _, (data,) = self.channel.recv(_specs, math.inf)
        if self.device.type != "cpu" and data.device != self.device:
            # A host channel's frame, moved onto the device as a node would; waited for, so that the time
            # measured up to the ack includes the upload.
            data = to_device(data, self.device)
            synchronize(self.device)
        return data

    def close(self) -> None:
        self.channel.close()


class GlooOffers:
    """All gloo links of one receiver meet at one store."""

    def __init__(self) -> None:
        self.store = GlooStoreServer("127.0.0.1")

    def offer(self, peer: str, device: str = "cpu") -> tuple[bytes, Callable[[], BenchLink]]:
        listener = self.store.listener(peer)
        return listener.rendezvous, lambda: ChannelLink(listener.accept(LINK_TIMEOUT_S), device)


def shm_offer(peer: str, device: str = "cpu") -> tuple[bytes, Callable[[], BenchLink]]:
    listener = ShmListener(peer)
    return listener.rendezvous, lambda: ChannelLink(listener.accept(LINK_TIMEOUT_S), device)


def nccl_offer(peer: str, device: str) -> tuple[bytes, Callable[[], BenchLink]]:
    """The receiver is rank 0 of the pair: it makes the pair id (the offer) and joins with it."""
    from afd.transport.nccl.channel import NcclListener, NcclOptions

    listener = NcclListener(peer, torch.device(device), NcclOptions(connect_timeout=LINK_TIMEOUT_S))
    return listener.rendezvous, lambda: ChannelLink(listener.accept(LINK_TIMEOUT_S), device)


# ---------------------------------------------------------------------------------------------------
# gRPC: the raw FfnData.Exchange stream of DataFrames (afd.wire.grpc_data), grpc.aio on a loop thread
# ---------------------------------------------------------------------------------------------------

_MAX_GRPC_MESSAGE = MAX_PAYLOAD_BYTES + (1 << 20)
_GRPC_WINDOW = 8
"""Frames a sender may have queued for its writer task before `send` waits."""


def _to_message(data: torch.Tensor) -> bytes:
    (host,) = stage_once([data])  # a device payload through pinned staging, as GrpcTransport frames it
    raw = host.view(torch.uint8).numpy()
    return grpc_data.envelope([raw.data], raw.nbytes)


def _from_message(message: bytes) -> torch.Tensor:
    frame = grpc_data.open_envelope(message)
    return torch.frombuffer(frame, dtype=PAYLOAD_DTYPE) if len(frame) else torch.empty(0, dtype=PAYLOAD_DTYPE)


class GrpcServerLink(BenchLink):
    """Receiver end: frames from the sender's streams land in a queue; replies go out on its first stream."""

    def __init__(self, loop: EventLoopThread) -> None:
        self.loop = loop
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.outbox: asyncio.Queue[bytes] | None = None
        self.connected = threading.Event()
        self.finished = threading.Event()
        """Set when the sender has finished writing on the link's first stream."""

    def send(self, data: torch.Tensor) -> None:
        assert self.outbox is not None and self.loop.loop is not None
        self.loop.call_soon(self.outbox.put_nowait, _to_message(data))

    def recv(self) -> torch.Tensor:
        return _from_message(self.inbox.get(timeout=LINK_TIMEOUT_S))

    def close(self) -> None:
        """Wait until the replies are written and the sender has finished its calls (so none is cut off)."""
        if self.outbox is not None:
            with contextlib.suppress(Exception):
                self.loop.run(self.outbox.join(), LINK_TIMEOUT_S)
        self.finished.wait(LINK_TIMEOUT_S)


class GrpcOffers:
    """One gRPC server per receiver process; a stream's first message names the link it belongs to."""

    def __init__(self) -> None:
        self.loop = EventLoopThread("bench-grpc-server")
        self.loop.start()
        self.links: dict[str, GrpcServerLink] = {}
        self.port = self.loop.run(self._start(), LINK_TIMEOUT_S)

    async def _start(self) -> int:
        self.server = grpc.aio.server(options=grpc_data.message_size_options(_MAX_GRPC_MESSAGE))
        self.server.add_generic_rpc_handlers([grpc_data.exchange_handler(self._exchange)])
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    async def _exchange(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        hello = await requests.__anext__()
        link = self.links[bytes(grpc_data.open_envelope(hello)).decode()]
        replier = None
        if link.outbox is None:  # the link's first stream also carries its replies
            link.outbox = asyncio.Queue()
            link.connected.set()
            replier = asyncio.ensure_future(self._reply(link.outbox, context))
        try:
            async for message in requests:
                link.inbox.put(message)
        finally:  # the sender is done writing (or gone): end the call
            if replier is not None:
                replier.cancel()
                link.finished.set()

    @staticmethod
    async def _reply(outbox: asyncio.Queue[bytes], context: grpc.aio.ServicerContext) -> None:
        while True:
            message = await outbox.get()
            try:
                await context.write(message)
            finally:  # written, or the call is gone: either way nothing more to wait for
                outbox.task_done()

    def offer(self, peer: str) -> tuple[bytes, Callable[[], BenchLink]]:
        link = GrpcServerLink(self.loop)
        self.links[peer] = link

        def accept() -> BenchLink:
            if not link.connected.wait(LINK_TIMEOUT_S):
                raise PeerError(peer, "did not open its gRPC stream")
            return link

        return json.dumps({"address": f"127.0.0.1:{self.port}", "link": peer}).encode(), accept


class GrpcClientLink(BenchLink):
    """Sender end: `streams` Exchange calls, each on its own channel; frames round-robin, acks on the first."""

    def __init__(self, offer: bytes, streams: int) -> None:
        fields = json.loads(offer)
        self.loop = EventLoopThread("bench-grpc-client")
        self.loop.start()
        self.slots = threading.Semaphore(_GRPC_WINDOW)
        self.replies: queue.Queue[bytes | PeerError] = queue.Queue()
        self.next_stream = 0
        self.outboxes: list[asyncio.Queue[bytes | None]] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.loop.run(self._open(fields["address"], fields["link"], streams), LINK_TIMEOUT_S)

    async def _open(self, address: str, link: str, streams: int) -> None:
        options = [*grpc_data.message_size_options(_MAX_GRPC_MESSAGE), ("grpc.use_local_subchannel_pool", 1)]
        self.channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(streams)]
        self.calls = []
        for index, channel in enumerate(self.channels):
            call = grpc_data.exchange_call(channel)()
            await call.write(grpc_data.envelope_bytes(link.encode()))
            outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
            self.outboxes.append(outbox)
            self.calls.append(call)
            self.tasks.append(asyncio.ensure_future(self._write(call, outbox)))
            if index == 0:
                self.tasks.append(asyncio.ensure_future(self._read(call)))

    async def _write(self, call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue[bytes | None]) -> None:
        while (message := await outbox.get()) is not None:
            await call.write(message)
            self.slots.release()
        await call.done_writing()

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                self.replies.put(message)
        except grpc.aio.AioRpcError as exc:
            self.replies.put(PeerError("grpc-peer", f"stream failed: {exc.code().name}: {exc.details()}"))

    def send(self, data: torch.Tensor) -> None:
        message = _to_message(data)
        if not self.slots.acquire(timeout=LINK_TIMEOUT_S):
            raise PeerError("grpc-peer", "takes no frames")
        outbox = self.outboxes[self.next_stream]
        self.next_stream = (self.next_stream + 1) % len(self.outboxes)
        self.loop.call_soon(outbox.put_nowait, message)

    def recv(self) -> torch.Tensor:
        reply = self.replies.get(timeout=LINK_TIMEOUT_S)
        if isinstance(reply, PeerError):
            raise reply
        return _from_message(reply)

    def close(self) -> None:
        """Finish writing on every stream, let the calls end, then close the channels."""
        for outbox in self.outboxes:
            self.loop.call_soon(outbox.put_nowait, None)
        with contextlib.suppress(Exception):
            self.loop.run(self._close(), 10.0)
        self.loop.stop()

    async def _close(self) -> None:
        await asyncio.wait(self.tasks, timeout=5.0)
        for channel in self.channels:
            await channel.close(grace=1.0)


# ---------------------------------------------------------------------------------------------------
# In-process: two threads hand tensors over a queue (no copy; the floor of any transport)
# ---------------------------------------------------------------------------------------------------


class InprocLink(BenchLink):
    def __init__(self, outbox: queue.Queue[torch.Tensor], inbox: queue.Queue[torch.Tensor]) -> None:
        self.outbox = outbox
        self.inbox = inbox

    def send(self, data: torch.Tensor) -> None:
        self.outbox.put(data)

    def recv(self) -> torch.Tensor:
        return self.inbox.get(timeout=LINK_TIMEOUT_S)


def inproc_pair() -> tuple[BenchLink, BenchLink]:
    """(sender end, receiver end)."""
    forward: queue.Queue[torch.Tensor] = queue.Queue()
    backward: queue.Queue[torch.Tensor] = queue.Queue()
    return InprocLink(forward, backward), InprocLink(backward, forward)


# ---------------------------------------------------------------------------------------------------
# The plan, on each side
# ---------------------------------------------------------------------------------------------------


def run_sender(links: list[BenchLink], plan: Plan, probe_latency: bool, emit: Callable[[dict], None]) -> None:
    """Send every size's frames to every link, timing each phase up to the receivers' acks."""
    for size, iters, warmup in zip(plan.sizes, plan.iters, plan.warmup, strict=True):
        data = payload(size, plan.device)
        seconds = 0.0
        for count in (warmup, iters):
            start = time.perf_counter()
            for _ in range(count):
                for link in links:
                    link.send(data)
            for link in links:
                link.recv()
            seconds = time.perf_counter() - start
        emit({"size": size, "iters": iters, "seconds": seconds})
    if probe_latency and plan.latency_bytes:
        data = payload(plan.latency_bytes, plan.device)
        link = links[0]
        round_trips = []
        for index in range(plan.latency_iters + max(plan.latency_iters // 10, 1)):
            start = time.perf_counter()
            link.send(data)
            link.recv()
            if index >= max(plan.latency_iters // 10, 1):
                round_trips.append(time.perf_counter() - start)
        emit({"latency_size": plan.latency_bytes, "one_way_us": [rtt / 2 * 1e6 for rtt in round_trips]})


def run_receiver_link(link: BenchLink, plan: Plan, echo_latency: bool) -> None:
    for iters, warmup in zip(plan.iters, plan.warmup, strict=True):
        for count in (warmup, iters):
            for _ in range(count):
                link.recv()
            link.send(ACK)
    if echo_latency and plan.latency_bytes:
        for _ in range(plan.latency_iters + max(plan.latency_iters // 10, 1)):
            link.send(link.recv())


def run_receiver(links: list[BenchLink], plan: Plan, receiver_index: int) -> None:
    """Serve every sender's link on its own thread; re-raises the first failure."""
    errors: list[BaseException] = []

    def serve(sender: int, link: BenchLink) -> None:
        try:
            run_receiver_link(link, plan, echo_latency=receiver_index == 0 and sender == 0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(i, link), daemon=True) for i, link in enumerate(links)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + LINK_TIMEOUT_S * (len(plan.sizes) + 2)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------------------------------
# Worker process
# ---------------------------------------------------------------------------------------------------


def _offers(transport: str, senders: int, receiver: int, device: str) -> list[tuple[bytes, Callable[[], BenchLink]]]:
    peers = [f"s{i}-r{receiver}" for i in range(senders)]
    if transport == "tcp":
        tcp = [TcpOffer() for _ in peers]
        return [(offer.offer, offer.accept) for offer in tcp]
    if transport == "gloo":
        gloo = GlooOffers()
        return [gloo.offer(peer, device) for peer in peers]
    if transport == "shm":
        return [shm_offer(peer, device) for peer in peers]
    if transport == "nccl":
        return [nccl_offer(peer, device) for peer in peers]
    if transport == "grpc":
        server = GrpcOffers()
        return [server.offer(peer) for peer in peers]
    raise SystemExit(f"transport {transport!r} has no worker links")


def _join(transport: str, offer: bytes, plan: Plan, peer: str) -> BenchLink:
    if transport == "tcp":
        return join_tcp(offer)
    if transport == "gloo":
        return ChannelLink(connect_gloo(offer, peer), plan.device)
    if transport == "shm":
        return ChannelLink(connect_shm(offer, peer), plan.device)
    if transport == "nccl":
        from afd.transport.nccl.channel import NcclOptions, connect_nccl

        options = NcclOptions(connect_timeout=LINK_TIMEOUT_S)
        return ChannelLink(connect_nccl(offer, peer, torch.device(plan.device), options), plan.device)
    if transport == "grpc":
        return GrpcClientLink(offer, plan.streams)
    raise SystemExit(f"transport {transport!r} has no worker links")


def _emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def worker_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A worker process of `afd bench transport` (started by it).")
    parser.add_argument("--role", choices=["sender", "receiver"], required=True)
    parser.add_argument("--transport", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--plan", required=True, help="Plan as JSON")
    parser.add_argument("--offers", default="", help="sender: comma-separated hex offers, one per receiver")
    args = parser.parse_args(argv)
    plan = Plan(**json.loads(args.plan))
    torch.set_num_threads(1)
    if args.role == "receiver":
        offers = _offers(args.transport, args.senders, args.index, plan.device)
        _emit({"offers": [offer.hex() for offer, _ in offers]})
        accepted: dict[int, BenchLink] = {}
        errors: list[BaseException] = []

        def accept(i: int, finish: Callable[[], BenchLink]) -> None:
            try:
                accepted[i] = finish()
            except BaseException as exc:
                errors.append(exc)

        # Accept concurrently: a gloo pair forms only when both ends are there, in whatever order.
        threads = [threading.Thread(target=accept, args=(i, f), daemon=True) for i, (_, f) in enumerate(offers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(LINK_TIMEOUT_S)
        if errors or len(accepted) != len(offers):
            raise SystemExit(f"receiver {args.index}: links not accepted: {errors}")
        links = [accepted[i] for i in range(len(offers))]
        run_receiver(links, plan, args.index)
    else:
        offers_hex = [h for h in args.offers.split(",") if h]
        links = [_join(args.transport, bytes.fromhex(h), plan, f"r{j}-s{args.index}") for j, h in enumerate(offers_hex)]
        run_sender(links, plan, probe_latency=args.index == 0, emit=_emit)
    for link in links:
        link.close()
    _emit({"done": True})
    return 0


def plan_json(plan: Plan) -> str:
    return json.dumps(asdict(plan))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


if __name__ == "__main__":
    raise SystemExit(worker_main())
