"""The hand-written DataFrame envelope is byte-identical to protobuf's; placement <-> proto round trip."""

from __future__ import annotations

import pytest

from afd.errors import ConfigError
from afd.placement import ExpertPlacement
from afd.wire import grpc_data
from afd.wire.frames import MalformedFrame
from afd.wire.generated import afd_cluster_pb2 as pb
from afd.wire.placement_proto import placement_from_proto, placement_to_proto


@pytest.mark.parametrize("size", [1, 127, 128, 16383, 16384, 2**21 + 3])
def test_envelope_matches_protobuf(size: int) -> None:
    frame = bytes(range(256)) * (size // 256) + bytes(size % 256)
    ours = grpc_data.envelope([frame[: size // 2], memoryview(frame)[size // 2 :]], size)
    assert ours == pb.DataFrame(frame=frame).SerializeToString()
    assert pb.DataFrame.FromString(ours).frame == frame
    opened = grpc_data.open_envelope(pb.DataFrame(frame=frame).SerializeToString())
    assert isinstance(opened, memoryview) and opened == frame


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x12\x01x",  # field 2, not field 1
        b"\x0a\x05abc",  # shorter than announced
        b"\x0a\x01abc",  # longer than announced (trailing field)
        b"\x0a" + b"\xff" * 11,  # endless varint
        b"\x0a\x80",  # truncated varint
    ],
)
def test_bad_envelopes_raise_malformed_frame(message: bytes) -> None:
    with pytest.raises(MalformedFrame):
        grpc_data.open_envelope(message)


def test_placement_round_trip() -> None:
    placement = ExpertPlacement.balanced(10, ["ffn-0", "ffn-1", "ffn-2"], [1.0, 2.0, 1.5], version=7)
    message = placement_to_proto(placement, {"ffn-0": "10.0.0.1:5000", "ffn-2": "10.0.0.3:5000"})
    back, addresses = placement_from_proto(pb.Placement.FromString(message.SerializeToString()))
    assert back == placement
    assert addresses == {"ffn-0": "10.0.0.1:5000", "ffn-2": "10.0.0.3:5000"}


def test_inconsistent_placement_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        placement_from_proto(pb.Placement())
    broken = pb.Placement(num_experts=4, nodes=[pb.PlacementEntry(node_id="a", experts=[0, 1], mlp_share=1.0)])
    with pytest.raises(ConfigError, match="not placed"):
        placement_from_proto(broken)


def test_exchange_message_limit_fits_the_largest_frame_and_no_more() -> None:
    import torch

    from afd.ffn_messages import FfnRequest
    from afd.wire import frames

    hidden = torch.zeros(64, 16)  # 4 KiB of tensors
    header, tensors = frames.encode_request(FfnRequest(layer=0, hidden=hidden), seq=1, sender="attn-0")
    parts, length = frames.pack_parts(header, tensors)
    message = grpc_data.envelope(parts, length)
    limit = grpc_data.max_exchange_message_bytes(hidden.numel() * hidden.element_size())
    assert len(message) <= limit
    assert limit < hidden.numel() * hidden.element_size() + 2**17, "frame limit plus envelope, not a blanket MiB"
