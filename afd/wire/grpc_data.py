"""The gRPC data plane `afd.v1.FfnData/Exchange`, with the DataFrame envelope written by hand.

The declared schema is `message DataFrame { bytes frame = 1; }`. Going through the generated class
costs two extra copies of every payload (into the message on send, out of it on receive), which
matters at megabyte frames. A DataFrame holding one bytes field serialises to a fixed 1-byte tag, a
varint length and the bytes, so we write exactly that around the packed frame (pieces joined once) and
read the frame back as a zero-copy memoryview. The bytes on the wire are a valid DataFrame: any
protobuf client of the declared service interoperates.

The envelope decoder is strict (one field 1, length-delimited, nothing else) and raises
`MalformedFrame`, a FrameError, so servers answer a bad envelope like any other bad frame.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from afd.wire import frames
from afd.wire.frames import MalformedFrame

SERVICE = "afd.v1.FfnData"
METHOD = f"/{SERVICE}/Exchange"
_TAG = b"\x0a"  # field 1, wire type 2 (length-delimited)
ENVELOPE_OVERHEAD = 1 + 10
"""Bytes a DataFrame adds around its frame: the tag and a length varint (at most 10 bytes)."""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def envelope(parts: list[bytes | memoryview], length: int) -> bytes:
    """Serialised DataFrame{frame = concatenation of `parts`} (`length` = their total size), one copy."""
    return b"".join([_TAG + _varint(length), *parts])


def envelope_bytes(frame: bytes) -> bytes:
    """Serialised DataFrame{frame}."""
    return envelope([frame], len(frame))


def open_envelope(message: bytes) -> memoryview:
    """The `frame` field of a serialised DataFrame, without copying; raises MalformedFrame otherwise."""
    view = memoryview(message)
    if len(view) < 2 or view[0] != _TAG[0]:
        raise MalformedFrame("data-plane message is not a DataFrame with a frame field")
    length = 0
    shift = 0
    position = 1
    while True:
        if position >= len(view) or position > 10:
            raise MalformedFrame("bad DataFrame length varint")
        byte = view[position]
        position += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if position + length != len(view):
        raise MalformedFrame(f"DataFrame announces {length} frame bytes, message has {len(view) - position}")
    return view[position:]


def _identity(data: bytes) -> bytes:
    return data


def exchange_handler(
    behaviour: Callable[[Any, grpc.aio.ServicerContext], Any],
) -> grpc.GenericRpcHandler:
    """A generic handler serving FfnData.Exchange with `behaviour(request_iterator, context)`.

    Messages reach `behaviour` as raw serialised DataFrames (use `open_envelope`); it writes serialised
    DataFrames (use `envelope`) with `context.write`. Deserialisation never fails, so a bad message
    reaches the handler, which can answer it with an ERROR frame instead of losing the stream.
    """
    handler = grpc.stream_stream_rpc_method_handler(
        behaviour, request_deserializer=_identity, response_serializer=_identity
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"Exchange": handler})


def exchange_call(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    """The client side of FfnData.Exchange on `channel`, carrying raw serialised DataFrames."""
    return channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)


def max_exchange_message_bytes(max_frame_bytes: int) -> int:
    """The largest serialised DataFrame whose frame carries at most `max_frame_bytes` of tensors.

    The frame may add its prefix and a header (the slack `frames.unpack` allows), the envelope its tag
    and length. A server's receive limit set to this refuses anything larger before it is handed over,
    rather than the 257 MiB "frame limit plus a generous MiB" a blanket limit would allow.
    """
    return max_frame_bytes + frames.MAX_HEADER_BYTES + frames.PREFIX.size + 64 + ENVELOPE_OVERHEAD


def message_size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel / server options lifting gRPC's 4 MiB default message limit to `max_message_bytes`."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
