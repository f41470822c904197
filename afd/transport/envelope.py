"""The envelope every channel backend (gloo, shm, NCCL) puts in front of a frame.

A frame is a msgpack header plus raw tensor bytes (afd.wire.frames). Channels move bytes, not messages, so
before the header each backend sends these fixed fields: a magic, the envelope kind (a frame, or a
channel's close handshake), the header length, flags of the backend's own (e.g. "tensors inline"), and the
byte size of every tensor. With the sizes known up front a receiver can check them against what the
header announces before it allocates anything, and drain a frame whose header it rejects, so a bad frame
costs that frame and not the channel.

What differs between backends - how the envelope, header and tensors are cut into messages or ring
writes - stays in each backend; the fields, their limits and their validation live here once.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from afd.wire.frames import MAX_HEADER_BYTES

__all__ = [
    "FIELDS",
    "MAX_HEADER_BYTES",
    "MAX_TENSORS",
    "Envelope",
    "EnvelopeKind",
    "MalformedEnvelope",
    "check_frame",
    "pack_envelope",
    "parse_envelope",
]

MAX_TENSORS = 8
"""Most tensors one frame may carry (their sizes live in the envelope)."""
MAGIC = b"AFDE"
FIELDS = struct.Struct(f"<4sqqqq{MAX_TENSORS}q")
"""Magic, kind, header length, tensor count, backend flags, byte size of each tensor (unused slots 0)."""


class EnvelopeKind:
    """What an envelope announces."""

    FRAME = 1
    """A frame: header_length bytes of header, then the tensors."""
    CLOSE = 2
    """The sender closes the channel (no header, no tensors)."""
    CLOSE_ACK = 3
    """The answer to CLOSE, ending the closer's own pending receive."""


_KINDS = frozenset({EnvelopeKind.FRAME, EnvelopeKind.CLOSE, EnvelopeKind.CLOSE_ACK})


class Envelope(NamedTuple):
    """A decoded, bound-checked envelope."""

    kind: int
    header_length: int
    sizes: list[int]
    """Byte size of each tensor of the frame."""
    flags: int


class MalformedEnvelope(ValueError):
    """An envelope that no AFD sender could have written: the channel is out of step."""


def check_frame(header: bytes, num_tensors: int, backend: str) -> None:
    """Refuse (ValueError) a frame the envelope cannot describe, on the sending side."""
    if num_tensors > MAX_TENSORS:
        raise ValueError(f"a {backend} frame carries at most {MAX_TENSORS} tensors, got {num_tensors}")
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")


def pack_envelope(kind: int, header_length: int, sizes: Sequence[int], flags: int = 0) -> bytes:
    """The FIELDS.size bytes of an envelope (the header and tensors follow as the backend sends them)."""
    if len(sizes) > MAX_TENSORS:
        raise ValueError(f"an envelope describes at most {MAX_TENSORS} tensors, got {len(sizes)}")
    return FIELDS.pack(MAGIC, kind, header_length, len(sizes), flags, *sizes, *[0] * (MAX_TENSORS - len(sizes)))


def parse_envelope(data: bytes | bytearray | memoryview, max_tensor_bytes: int) -> Envelope:
    """Decode and bound-check the first FIELDS.size bytes of `data`; raises MalformedEnvelope."""
    if len(data) < FIELDS.size:
        raise MalformedEnvelope(f"envelope of {len(data)} bytes is shorter than {FIELDS.size}")
    magic, kind, header_length, count, flags, *all_sizes = FIELDS.unpack_from(data)
    if magic != MAGIC or kind not in _KINDS:
        raise MalformedEnvelope(f"bad envelope (magic {magic!r}, kind {kind})")
    if not 0 <= header_length <= MAX_HEADER_BYTES or not 0 <= count <= MAX_TENSORS:
        raise MalformedEnvelope(f"envelope announces a {header_length}-byte header and {count} tensors")
    sizes = list(all_sizes[:count])
    if any(not 0 <= size <= max_tensor_bytes for size in sizes):
        raise MalformedEnvelope(f"envelope announces tensors of {sizes} bytes (limit {max_tensor_bytes})")
    if kind != EnvelopeKind.FRAME and (header_length or count):
        raise MalformedEnvelope(f"a close envelope announces a {header_length}-byte header and {count} tensors")
    return Envelope(kind, header_length, sizes, flags)
