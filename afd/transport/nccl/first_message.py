"""The first message of every NCCL frame: the envelope fields, and the header itself when it fits.

Every NCCL frame starts with a fixed ENVELOPE_BYTES message: the envelope fields of
afd/transport/envelope.py, and the msgpack header itself when it fits in HEADER_ROOM (else the header
follows as a message of its own; the channel, channel.py, sends and receives the rest). The receiver
reads this message back to the host before it allocates anything. Everything travels as uint8: the
envelope's byte sizes decide the counts on both sides, so a header lying about dtypes cannot make the
two ends disagree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from afd.transport.envelope import FIELDS, Envelope, MalformedEnvelope, pack_envelope, parse_envelope

ENVELOPE_BYTES = 4096
"""Size of every frame's first message (the envelope fields, and the header when it fits)."""
HEADER_ROOM = ENVELOPE_BYTES - FIELDS.size
"""Headers up to this many bytes ride inside the envelope message; longer ones follow as their own."""


class FirstMessage(NamedTuple):
    """The envelope message of an NCCL frame, decoded."""

    envelope: Envelope
    header: bytes | None
    """The header, if it fitted in the envelope message; else it follows as a message of its own."""


def pack_first_message(kind: int, header: bytes, sizes: Sequence[int]) -> bytes:
    """The envelope fields, then the header when it fits in HEADER_ROOM (zero-padded to ENVELOPE_BYTES on send)."""
    fields = pack_envelope(kind, len(header), sizes)
    return fields + (header if len(header) <= HEADER_ROOM else b"")


def parse_first_message(data: bytes, max_message_bytes: int) -> FirstMessage:
    """Decode and bound-check an envelope message; raises MalformedEnvelope."""
    envelope = parse_envelope(data, max_message_bytes)
    if envelope.header_length > HEADER_ROOM:
        return FirstMessage(envelope, None)
    if len(data) < FIELDS.size + envelope.header_length:
        raise MalformedEnvelope("envelope is cut short inside its header")
    return FirstMessage(envelope, bytes(data[FIELDS.size : FIELDS.size + envelope.header_length]))
