"""Frame codec: round trips for every frame kind and dtype, and a typed error for every kind of bad frame."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch

from afd.ffn_messages import FfnRequest
from afd.transport.channel import TensorSpec
from afd.wire import frames
from afd.wire.frames import (
    FRAME_VERSION,
    BadDtype,
    FrameError,
    FrameKind,
    FrameLimits,
    FrameTooLarge,
    MalformedFrame,
    MalformedHeader,
    OutOfRange,
    PayloadMismatch,
    ShapeMismatch,
    UnknownField,
    UnsupportedVersion,
    decode_header,
    encode_error,
    encode_request,
    encode_response,
    pack,
    partial_from_frame,
    request_from_frame,
    unpack,
)

HIDDEN = 24
LIMITS = FrameLimits(hidden_size=HIDDEN, num_layers=4, top_k=2, max_local_experts=3, max_tokens=64)


def make_request(
    tokens: int = 5, dtype: torch.dtype = torch.bfloat16, experts: bool = True, shared: bool = True
) -> FfnRequest:
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(-1, 3, (tokens, 2), generator=gen, dtype=torch.int32) if experts else None
    return FfnRequest(
        layer=3,
        hidden=torch.randn(tokens, HIDDEN, generator=gen).to(dtype),
        expert_ids=ids,
        expert_weights=torch.rand(tokens, 2, generator=gen) if experts else None,
        shared_scale=torch.rand(tokens, generator=gen) if shared else None,
        microbatch=1,
        placement_version=6,
    )


def raw_header(header: bytes) -> dict:
    return msgpack.unpackb(header, raw=False)


def repack(fields: dict) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("experts", "shared"), [(True, True), (True, False), (False, True), (False, False)])
def test_request_round_trip_is_bit_exact(dtype: torch.dtype, experts: bool, shared: bool) -> None:
    request = make_request(dtype=dtype, experts=experts, shared=shared)
    header, tensors = encode_request(request, seq=42, sender="attn-0")
    decoded, views = unpack(pack(header, tensors), LIMITS)
    assert (decoded.kind, decoded.layer, decoded.microbatch, decoded.seq, decoded.sender) == (
        FrameKind.FFN_REQUEST,
        3,
        1,
        42,
        "attn-0",
    )
    back = request_from_frame(decoded, views)
    # bit-exact, including bfloat16, which travels as raw bytes
    assert back.hidden.dtype == dtype
    assert torch.equal(back.hidden.view(torch.uint8), request.hidden.view(torch.uint8))
    for name in ("expert_ids", "expert_weights", "shared_scale"):
        sent, got = getattr(request, name), getattr(back, name)
        assert (sent is None) == (got is None)
        if sent is not None:
            assert torch.equal(sent, got)
    assert (back.layer, back.microbatch, back.placement_version) == (3, 1, 6)


def test_response_and_error_round_trip() -> None:
    partial = torch.randn(7, HIDDEN).bfloat16()
    header, views = unpack(pack(*encode_response(partial, 2, 0, 9, "ffn-1")), LIMITS)
    assert header.kind is FrameKind.FFN_RESPONSE and header.seq == 9
    assert torch.equal(partial_from_frame(header, views), partial)
    error_header, tensors = unpack(pack(*encode_error("boom", -1, -1, -1, "ffn-1")), LIMITS)
    assert error_header.kind is FrameKind.ERROR and error_header.error == "boom" and tensors == []
    assert error_header.seq == -1


def test_tensor_specs_drive_tensor_backends() -> None:
    header, _ = encode_request(make_request(tokens=3), seq=1, sender="a")
    specs = decode_header(header, LIMITS).tensor_specs()
    assert specs == [
        TensorSpec((3, HIDDEN), torch.bfloat16),
        TensorSpec((3, 2), torch.int32),
        TensorSpec((3, 2), torch.float32),
        TensorSpec((3,), torch.float32),
    ]


def test_zero_tokens_and_non_contiguous_inputs() -> None:
    empty = FfnRequest(0, torch.empty(0, HIDDEN), torch.empty(0, 2, dtype=torch.int32), torch.empty(0, 2))
    header, views = unpack(pack(*encode_request(empty, 1, "a")), LIMITS)
    assert request_from_frame(header, views).hidden.shape == (0, HIDDEN)
    wide = torch.randn(HIDDEN, 6)
    partial = wide.t()  # non-contiguous view
    _, views = unpack(pack(*encode_response(partial, 0, 0, 1, "f")), LIMITS)
    assert torch.equal(views[0], partial)


def test_tensors_are_aligned_views_of_the_buffer() -> None:
    header, tensors = encode_request(make_request(tokens=3), 1, "x")
    buffer = bytearray(pack(header, tensors))
    _, views = unpack(buffer, LIMITS)
    base = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    for view in views:
        assert (view.data_ptr() - base) % frames.ALIGNMENT == 0
    buffer[-1] ^= 0xFF  # the last tensor (shared_scale) aliases the buffer: no copy was made
    assert not torch.equal(views[-1], tensors[-1])


# --------------------------------------------------------------------------------------------------
# Each validation rule, with the error it raises
# --------------------------------------------------------------------------------------------------


def mutated(change: dict, drop: tuple[str, ...] = ()) -> bytes:
    header, _ = encode_request(make_request(tokens=2), seq=5, sender="attn-0")
    fields = raw_header(header)
    fields.update(change)
    for key in drop:
        del fields[key]
    return repack(fields)


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (b"\xc1", MalformedHeader),  # never-used msgpack byte
        (b"", MalformedHeader),
        (msgpack.packb([1, 2, 3]), MalformedHeader),  # not a map
        (mutated({}) + b"\x00", MalformedHeader),  # trailing data
        (mutated({"v": FRAME_VERSION + 1}), UnsupportedVersion),
        (mutated({"v": "1"}), MalformedHeader),
        (mutated({"kind": 99}), MalformedHeader),
        (mutated({"extra": 1}), UnknownField),
        (mutated({"error": "only ERROR frames have this"}), UnknownField),
        (mutated({}, drop=("seq",)), MalformedHeader),
        (mutated({"layer": 4}), OutOfRange),  # num_layers = 4
        (mutated({"layer": -1}), OutOfRange),
        (mutated({"layer": True}), MalformedHeader),  # bool is not an int here
        (mutated({"layer": 1.0}), MalformedHeader),
        (mutated({"mb": -3}), OutOfRange),
        (mutated({"pv": -1}), OutOfRange),
        (mutated({}, drop=("pv",)), MalformedHeader),  # requests must say which placement their ids mean
        (mutated({"seq": -1}), OutOfRange),  # only ERROR frames may carry an unknown seq
        (mutated({"sender": ""}), MalformedHeader),
        (mutated({"sender": "x" * 1000}), FrameTooLarge),
        (mutated({"sender": 7}), MalformedHeader),
        (mutated({"tensors": "hidden"}), MalformedHeader),
        (mutated({"tensors": [["hidden", "bfloat16"]]}), MalformedHeader),
        (mutated({"tensors": [["hidden", "float64", [2, HIDDEN]]]}), BadDtype),  # not on the allow-list
        (mutated({"tensors": [["hidden", "int32", [2, HIDDEN]]]}), BadDtype),  # known, but not for hidden
        (mutated({"tensors": [["hidden", "bfloat16", [2, HIDDEN + 1]]]}), ShapeMismatch),
        (mutated({"tensors": [["hidden", "bfloat16", [2, -HIDDEN]]]}), ShapeMismatch),
        (mutated({"tensors": [["hidden", "bfloat16", [2]]]}), ShapeMismatch),
        (mutated({"tensors": [["hidden", "bfloat16", [65, HIDDEN]]]}), FrameTooLarge),  # max_tokens = 64
        (
            mutated({"tensors": [["hidden", "bfloat16", [2, HIDDEN]], ["partial", "bfloat16", [2, HIDDEN]]]}),
            MalformedHeader,
        ),
        (mutated({"tensors": []}), MalformedHeader),
        (
            mutated({"tensors": [["hidden", "bfloat16", [2, HIDDEN]], ["expert_ids", "int32", [2, 2]]]}),
            MalformedHeader,  # ids without weights
        ),
        (
            mutated(
                {
                    "tensors": [
                        ["hidden", "bfloat16", [2, HIDDEN]],
                        ["expert_ids", "int32", [2, 3]],  # top_k = 2
                        ["expert_weights", "float32", [2, 3]],
                    ]
                }
            ),
            ShapeMismatch,
        ),
        (
            mutated(
                {
                    "tensors": [
                        ["hidden", "bfloat16", [2, HIDDEN]],
                        ["expert_ids", "int64", [2, 2]],
                        ["expert_weights", "float32", [2, 2]],
                    ]
                }
            ),
            BadDtype,
        ),
        (mutated({"tensors": [["hidden", "float16", [2, HIDDEN]], ["shared_scale", "float32", [3]]]}), ShapeMismatch),
        (b"\x81" + b"\x91" * 5000, MalformedHeader),  # deeply nested arrays
        (b"\x00" * (frames.MAX_HEADER_BYTES + 1), FrameTooLarge),
    ],
)
def test_bad_header_raises_typed_error(header: bytes, error: type[FrameError]) -> None:
    with pytest.raises(error):
        decode_header(header, LIMITS)


def test_dtype_allow_list_is_configurable() -> None:
    header, _ = encode_request(make_request(dtype=torch.float32), 1, "a")
    only_bf16 = FrameLimits(HIDDEN, 4, 2, 3, allowed_dtypes=frozenset({"bfloat16"}))
    with pytest.raises(BadDtype, match="float32"):
        decode_header(header, only_bf16)


def test_frame_byte_limit() -> None:
    header, _ = encode_request(make_request(tokens=8, dtype=torch.float32), 1, "a")
    small = FrameLimits(HIDDEN, 4, 2, 3, max_frame_bytes=8 * HIDDEN * 4)  # hidden alone fills it
    with pytest.raises(FrameTooLarge):
        decode_header(header, small)


def test_placement_version_only_on_requests() -> None:
    header, _ = encode_response(torch.zeros(1, HIDDEN), 0, 0, 1, "f")
    with pytest.raises(UnknownField, match="pv"):
        decode_header(repack({**raw_header(header), "pv": 3}), LIMITS)


def test_error_frame_rules() -> None:
    header, _ = encode_error("x" * (frames.MAX_ERROR_CHARS + 10), 0, 0, 1, "f")
    assert len(decode_header(header, LIMITS).error or "") == frames.MAX_ERROR_CHARS  # truncated by the encoder
    fields = raw_header(header)
    with pytest.raises(MalformedHeader, match="lacks"):
        decode_header(repack({k: v for k, v in fields.items() if k != "error"}), LIMITS)
    with pytest.raises(PayloadMismatch):
        decode_header(repack({**fields, "tensors": [["partial", "float32", [1, HIDDEN]]]}), LIMITS)


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda b: b[:5], MalformedFrame),  # shorter than the prefix
        (lambda b: b"XXXX" + b[4:], MalformedFrame),  # bad magic
        (lambda b: b[:4] + struct.pack("<I", 10**6) + b[8:], MalformedFrame),  # header length beyond the buffer
        (lambda b: b[:-1], PayloadMismatch),  # truncated payload
        (lambda b: b + b"\x00", PayloadMismatch),  # trailing byte
        (lambda b: b + b"\x00" * 8, PayloadMismatch),  # trailing padding-sized block
    ],
)
def test_bad_buffer_raises_typed_error(mangle, error: type[FrameError]) -> None:
    buffer = pack(*encode_request(make_request(), 1, "a"))
    with pytest.raises(error):
        unpack(mangle(buffer), LIMITS)


def test_nonzero_padding_is_refused() -> None:
    # a sender name whose header length leaves padding before the tensor
    partial = torch.ones(1, HIDDEN)
    sender = next(s for s in ("f", "ff", "fff") if len(encode_response(partial, 0, 0, 1, s)[0]) % frames.ALIGNMENT)
    header, tensors = encode_response(partial, 0, 0, 1, sender)
    buffer = bytearray(pack(header, tensors))
    start = frames.PREFIX.size + len(header)
    assert start % frames.ALIGNMENT
    buffer[start] = 1
    with pytest.raises(MalformedFrame, match="padding"):
        unpack(buffer, LIMITS)


def test_expert_ids_out_of_range() -> None:
    request = make_request(tokens=3)
    assert request.expert_ids is not None
    request.expert_ids[1, 0] = 3  # max_local_experts = 3
    header, views = unpack(pack(*encode_request(request, 1, "a")), LIMITS)
    with pytest.raises(OutOfRange, match="expert ids"):
        request_from_frame(header, views)
    request.expert_ids[1, 0] = -2
    header, views = unpack(pack(*encode_request(request, 1, "a")), LIMITS)
    with pytest.raises(OutOfRange):
        request_from_frame(header, views)


def test_tensors_must_match_header() -> None:
    header_bytes, tensors = encode_request(make_request(tokens=3), 1, "a")
    header = decode_header(header_bytes, LIMITS)
    with pytest.raises(PayloadMismatch):
        request_from_frame(header, tensors[:2])
    with pytest.raises(PayloadMismatch):
        request_from_frame(header, [tensors[0].float(), *tensors[1:]])
    with pytest.raises(MalformedHeader):
        partial_from_frame(header, tensors)


def test_encoder_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(BadDtype):
        encode_response(torch.zeros(1, HIDDEN, dtype=torch.float64), 0, 0, 1, "f")
    request = make_request()
    request.expert_weights = None
    with pytest.raises(ValueError, match="both"):
        encode_request(request, 1, "a")


def test_best_effort_seq() -> None:
    assert frames.best_effort_seq(mutated({"layer": 99})) == 5
    assert frames.best_effort_seq(b"\xc1garbage") == frames.UNKNOWN
    assert frames.best_effort_seq(mutated({"seq": "5"})) == frames.UNKNOWN


def test_limits_validate_themselves() -> None:
    with pytest.raises(ValueError, match="hidden_size"):
        FrameLimits(hidden_size=0, num_layers=1, top_k=1, max_local_experts=1)
    with pytest.raises(ValueError, match="allowed_dtypes"):
        FrameLimits(hidden_size=1, num_layers=1, top_k=1, max_local_experts=1, allowed_dtypes=frozenset({"int8"}))
