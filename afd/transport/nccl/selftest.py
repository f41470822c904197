"""`python -m afd.transport.nccl.selftest`: what an NCCL channel moves on this machine, nccl-tests style.

Two modes:
- pair: this process is the attention end (rank 0) on `--device`; a child process it starts is the FFN
  end (rank 1) on `--peer-device`. Frames of bfloat16 payloads stream one way and one ack per size comes
  back, so the figure is one-way bandwidth of the whole frame path (envelope, header, payload). Needs two
  GPUs, or NCCL 2.30+ for both ranks on one GPU (older NCCL refuses two ranks on one device).
- loopback: one GPU, the channel paired with itself through NCCL's self send/recv: a device-local
  copy, useful to see the per-frame overhead, not a link's speed.
`auto` (the default) picks pair where it can.

The child role (`peer`) sinks, echoes or acknowledges frames by the op in their header; the GPU tests
use it as the far end of a real pair. Headers are msgpack maps {"op", "tensors": [[dtype, shape]...]},
checked like any frame from the network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from afd.errors import PeerError
from afd.transport.channel import TensorSpec
from afd.transport.envelope import MAX_TENSORS
from afd.transport.nccl.channel import NcclChannel, NcclListener, NcclOptions, connect_nccl
from afd.transport.nccl.library import load_library, unavailable_reason
from afd.wire.frames import WIRE_DTYPES, dtype_name

OPS = ("sink", "echo", "ack", "bye")
"""sink: drop the frame; echo: send it back; ack: answer with an empty "ack" frame; bye: peer exits."""
DEFAULT_SIZES = (4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20)
LATENCY_BYTES = 64 << 10
MULTI_RANK_PER_GPU = (2, 30, 0)
"""First NCCL that lets two ranks of one communicator share a GPU."""
_MAX_ELEMENTS = 1 << 31


def make_header(op: str, tensors: Sequence[torch.Tensor]) -> bytes:
    return msgpack.packb({"op": op, "tensors": [[dtype_name(t.dtype), list(t.shape)] for t in tensors]})


def read_header(header: bytes) -> tuple[str, list[TensorSpec]]:
    """The op and tensor specs of a self-test header; ValueError for anything else."""
    raw = msgpack.unpackb(header, raw=False, max_array_len=64, max_map_len=4, max_str_len=64, max_bin_len=0)
    if not isinstance(raw, dict) or set(raw) != {"op", "tensors"} or raw["op"] not in OPS:
        raise ValueError(f"not a self-test header: {raw!r:.200}")
    tensors = raw["tensors"]
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise ValueError("self-test header: bad tensor list")
    specs = []
    for entry in tensors:
        dtype, shape = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
        if dtype not in WIRE_DTYPES or not isinstance(shape, list) or len(shape) > 4:
            raise ValueError(f"self-test header: bad tensor {entry!r:.100}")
        if not all(type(d) is int and d >= 0 for d in shape) or math.prod(shape) > _MAX_ELEMENTS:
            raise ValueError(f"self-test header: bad shape {shape!r:.100}")
        specs.append(TensorSpec(tuple(shape), WIRE_DTYPES[dtype]))
    return raw["op"], specs


def header_specs(header: bytes) -> list[TensorSpec]:
    return read_header(header)[1]


# ---------------------------------------------------------------------------------------------------
# The far end
# ---------------------------------------------------------------------------------------------------


def serve_peer(rendezvous: bytes, device: int, timeout: float) -> int:
    """Join the pair as rank 1 and serve ops until "bye", the peer closing, or `timeout` s of silence."""
    options = NcclOptions(connect_timeout=timeout, io_timeout=timeout)
    channel = connect_nccl(rendezvous, "selftest-attention", device, options)
    try:
        while True:
            header, tensors = channel.recv(header_specs, timeout)
            op = read_header(header)[0]
            if op == "echo":
                channel.send(header, tensors)
            elif op == "ack":
                channel.send(make_header("ack", []), [])
            elif op == "bye":
                channel.flush()
                return 0
    except PeerError as exc:
        print(f"selftest peer: {exc}", file=sys.stderr, flush=True)
        return 0 if "closed the channel" in str(exc) else 1
    finally:
        channel.close()


def start_peer(rendezvous: bytes, device: int, timeout: float) -> subprocess.Popen[bytes]:
    """The rank-1 process of a pair; the caller owns the handle (and must wait on or kill it)."""
    command = [sys.executable, "-m", "afd.transport.nccl.selftest", "peer"]
    command += ["--rendezvous", rendezvous.hex(), "--device", str(device), "--timeout", str(timeout)]
    return subprocess.Popen(command)


def open_pair(
    device: int, peer_device: int, options: NcclOptions | None = None
) -> tuple[NcclChannel, subprocess.Popen[bytes]]:
    """A channel to a freshly started peer process (rank 1 on `peer_device`), and that process."""
    options = options or NcclOptions(connect_timeout=60.0)
    listener = NcclListener("selftest-peer", device, options)
    process = start_peer(listener.rendezvous, peer_device, options.connect_timeout)
    try:
        return listener.accept(options.connect_timeout), process
    except BaseException:
        process.kill()
        process.wait(30)
        raise


def pair_supported() -> str | None:
    """Why a two-process pair cannot run here, or None if it can."""
    if torch.cuda.device_count() >= 2:
        return None
    version = load_library().version
    if version >= MULTI_RANK_PER_GPU:
        return None
    found = ".".join(map(str, version))
    return f"one GPU and NCCL {found}: NCCL before 2.30 refuses two ranks of a communicator on one GPU"


# ---------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------


def _round_trip(channel: NcclChannel, loopback: bool) -> None:
    """Pair: ask for an ack and wait for it (all earlier frames are then received); loopback: receive one."""
    if loopback:
        channel.recv(header_specs, 60.0)
        return
    channel.send(make_header("ack", []), [])
    channel.recv(header_specs, 60.0)


def measure_bandwidth(
    channel: NcclChannel, sizes: Sequence[int], iters: int, warmup: int, loopback: bool
) -> list[dict[str, Any]]:
    """One row per size: frames of `size` bytes of bfloat16 sent `iters` times, timed until received."""
    rows = []
    for size in sizes:
        payload = torch.randn(max(size // 2, 1), dtype=torch.bfloat16, device=channel.device)
        header = make_header("sink", [payload])
        for phase_iters in (warmup, iters):  # the last pass (iters) is the one timed
            torch.cuda.synchronize(channel.device)
            started = time.perf_counter()
            for _ in range(phase_iters):
                channel.send(header, [payload])
                if loopback:
                    _round_trip(channel, loopback)
            if not loopback:
                _round_trip(channel, loopback)
            elapsed = time.perf_counter() - started
        seconds = elapsed / max(iters, 1)
        rows.append(
            {
                "size_bytes": payload.numel() * 2,
                "count": payload.numel(),
                "type": "bfloat16",
                "time_us": seconds * 1e6,
                "algbw_gbps": payload.numel() * 2 / seconds / 1e9,
                "busbw_gbps": payload.numel() * 2 / seconds / 1e9,  # point to point: bus = algorithm bandwidth
            }
        )
    return rows


def measure_latency(channel: NcclChannel, iters: int, loopback: bool) -> dict[str, float]:
    """One-way latency of LATENCY_BYTES frames: half an echo round trip (pair) or send + receive (loopback)."""
    payload = torch.randn(LATENCY_BYTES // 2, dtype=torch.bfloat16, device=channel.device)
    header = make_header("sink" if loopback else "echo", [payload])
    samples = []
    for _ in range(iters):
        started = time.perf_counter()
        channel.send(header, [payload])
        channel.recv(header_specs, 60.0)
        elapsed = time.perf_counter() - started
        samples.append(elapsed if loopback else elapsed / 2)
    samples.sort()
    return {
        "latency_bytes": LATENCY_BYTES,
        "p50_us": statistics.median(samples) * 1e6,
        "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
    }


def say_goodbye(channel: NcclChannel, timeout: float = 30.0) -> None:
    """Send "bye" and wait for the peer's CLOSE, so that neither end waits out the other's close grace."""
    channel.send(make_header("bye", []), [])
    channel.flush()
    with contextlib.suppress(PeerError):  # "closed the channel" is the answer expected
        channel.recv(header_specs, timeout)


def _print_table(mode: str, rows: list[dict[str, Any]], latency: dict[str, float]) -> None:
    print(f"# afd NCCL channel self test, mode {mode}, NCCL {'.'.join(map(str, load_library().version))}")
    print(f"# {'size(B)':>12} {'count':>12} {'type':>9} {'time(us)':>10} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12}")
    for row in rows:
        print(
            f"  {row['size_bytes']:>12} {row['count']:>12} {row['type']:>9} {row['time_us']:>10.1f} "
            f"{row['algbw_gbps']:>12.2f} {row['busbw_gbps']:>12.2f}"
        )
    print(f"# latency at {latency['latency_bytes']} B: p50 {latency['p50_us']:.1f} us, p99 {latency['p99_us']:.1f} us")


def run(
    mode: str, device: int, peer_device: int | None, sizes: Sequence[int], iters: int, warmup: int, as_json: bool
) -> int:
    reason = unavailable_reason()
    if reason is not None:
        print(f"NCCL self test cannot run: {reason}", file=sys.stderr)
        return 2
    if mode == "auto":
        mode = "pair" if pair_supported() is None else "loopback"
    process = None
    if mode == "pair":
        why_not = pair_supported()
        if why_not is not None:
            print(f"pair mode cannot run: {why_not}; try --mode loopback", file=sys.stderr)
            return 2
        if peer_device is None:
            peer_device = 1 if torch.cuda.device_count() >= 2 and device == 0 else 0
        channel, process = open_pair(device, peer_device)
    else:
        channel = NcclChannel.loopback(device=device)
    loopback = mode == "loopback"
    try:
        rows = measure_bandwidth(channel, sizes, iters, warmup, loopback)
        latency = measure_latency(channel, max(iters, 20), loopback)
        if process is not None:
            say_goodbye(channel)
    finally:
        channel.close()
        if process is not None:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)
    if as_json:
        for row in rows:
            print(json.dumps({"transport": "nccl", "mode": mode, **row}))
        print(json.dumps({"transport": "nccl", "mode": mode, **latency}))
    else:
        _print_table(mode, rows, latency)
    return 0


def _sizes(text: str) -> list[int]:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    sizes = []
    for part in text.split(","):
        part = part.strip().lower().removesuffix("ib").removesuffix("b")
        scale = units.get(part[-1:], 1)
        sizes.append(int(part[:-1] if scale > 1 else part) * scale)
    if any(size < 2 for size in sizes):
        raise argparse.ArgumentTypeError("sizes must be at least 2 bytes (one bfloat16)")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["peer"]:
        peer = argparse.ArgumentParser(prog="afd.transport.nccl.selftest peer", description="rank 1 of a self test")
        peer.add_argument("--rendezvous", required=True, help="hex of the attention end's rendezvous bytes")
        peer.add_argument("--device", type=int, default=0)
        peer.add_argument("--timeout", type=float, default=60.0, help="give up after this many idle seconds")
        options = peer.parse_args(args[1:])
        return serve_peer(bytes.fromhex(options.rendezvous), options.device, options.timeout)
    parser = argparse.ArgumentParser(prog="python -m afd.transport.nccl.selftest", description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("auto", "pair", "loopback"), default="auto")
    parser.add_argument("--device", type=int, default=0, help="CUDA device of this (rank 0) end")
    parser.add_argument("--peer-device", type=int, default=None, help="CUDA device of the peer process (pair mode)")
    parser.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES), help="e.g. 4K,64K,1M,16M,64M")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    options = parser.parse_args(args)
    return run(
        options.mode, options.device, options.peer_device, options.sizes, options.iters, options.warmup, options.json
    )


if __name__ == "__main__":
    sys.exit(main())
