"""The envelope in front of every channel frame (gloo, shm, NCCL): packing, limits, malformed input."""

from __future__ import annotations

import pytest

from afd.transport.envelope import (
    FIELDS,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    EnvelopeKind,
    MalformedEnvelope,
    check_frame,
    pack_envelope,
    parse_envelope,
)


def test_envelope_round_trips():
    packed = pack_envelope(EnvelopeKind.FRAME, 12, [4096, 0, 12], flags=1)
    assert len(packed) == FIELDS.size
    assert parse_envelope(packed + b"trailing bytes are the backend's", 1 << 20) == (
        EnvelopeKind.FRAME,
        12,
        [4096, 0, 12],
        1,
    )
    assert parse_envelope(pack_envelope(EnvelopeKind.CLOSE, 0, []), 1).kind == EnvelopeKind.CLOSE


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ((b"XXXX", EnvelopeKind.FRAME, 0, 0, 0), "bad envelope"),
        ((MAGIC, 9, 0, 0, 0), "bad envelope"),
        ((MAGIC, EnvelopeKind.FRAME, -1, 0, 0), "-1-byte header"),
        ((MAGIC, EnvelopeKind.FRAME, MAX_HEADER_BYTES + 1, 0, 0), f"{MAX_HEADER_BYTES + 1}-byte header"),
        ((MAGIC, EnvelopeKind.FRAME, 0, MAX_TENSORS + 1, 0), "9 tensors"),
        ((MAGIC, EnvelopeKind.FRAME, 0, 1, 0, -5), r"tensors of \[-5\] bytes"),
        ((MAGIC, EnvelopeKind.FRAME, 0, 1, 0, (1 << 20) + 1), "limit 1048576"),
        ((MAGIC, EnvelopeKind.CLOSE, 5, 0, 0), "a close envelope announces"),
    ],
)
def test_malformed_envelopes_are_refused(fields, match):
    padded = (*fields, *[0] * (5 + MAX_TENSORS - len(fields)))
    with pytest.raises(MalformedEnvelope, match=match):
        parse_envelope(FIELDS.pack(*padded), max_tensor_bytes=1 << 20)


def test_short_input_is_refused():
    with pytest.raises(MalformedEnvelope, match="shorter"):
        parse_envelope(MAGIC, max_tensor_bytes=1)


def test_send_side_limits_name_the_backend():
    with pytest.raises(ValueError, match=f"a gloo frame carries at most {MAX_TENSORS} tensors"):
        check_frame(b"", MAX_TENSORS + 1, "gloo")
    with pytest.raises(ValueError, match="exceeds"):
        check_frame(b"h" * (MAX_HEADER_BYTES + 1), 1, "shm")
    with pytest.raises(ValueError, match=f"at most {MAX_TENSORS} tensors"):
        pack_envelope(EnvelopeKind.FRAME, 0, [1] * (MAX_TENSORS + 1))
