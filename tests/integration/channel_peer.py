"""The far end of a channel for tests: joins a gloo or shm channel in its own process, then echoes or hangs.

python -m tests.integration.channel_peer --backend shm --rendezvous HEX --mode echo|hang
Frames use a test header (msgpack list of [dtype name, shape]); `specs` parses it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

import msgpack
import torch

from afd.errors import PeerError
from afd.transport.channel import Channel, TensorSpec
from afd.transport.gloo_channel import connect_gloo
from afd.transport.shm_channel import connect_shm

DTYPES = {"bfloat16": torch.bfloat16, "int32": torch.int32, "float32": torch.float32, "uint8": torch.uint8}


def header_for(tensors: Sequence[torch.Tensor]) -> bytes:
    return msgpack.packb([[str(t.dtype).removeprefix("torch."), list(t.shape)] for t in tensors])


def specs(header: bytes) -> list[TensorSpec]:
    return [TensorSpec(tuple(shape), DTYPES[name]) for name, shape in msgpack.unpackb(header)]


def connect(backend: str, rendezvous: bytes, peer: str) -> Channel:
    return connect_gloo(rendezvous, peer) if backend == "gloo" else connect_shm(rendezvous, peer)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["gloo", "shm"], required=True)
    parser.add_argument("--rendezvous", required=True)
    parser.add_argument("--mode", choices=["echo", "hang"], required=True)
    args = parser.parse_args()
    channel = connect(args.backend, bytes.fromhex(args.rendezvous), "test-attn")
    print("joined", flush=True)
    if args.mode == "hang":
        time.sleep(120)  # connected, never answers; the test kills this process
        return 1
    while True:
        try:
            header, tensors = channel.recv(specs, math.inf)
        except PeerError:
            channel.close()
            return 0
        channel.send(header, tensors)


if __name__ == "__main__":
    sys.exit(main())
