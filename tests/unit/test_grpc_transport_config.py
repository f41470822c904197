"""GrpcTransport configuration: bad values are ConfigErrors; construction needs no network."""

from __future__ import annotations

import sys

import pytest

from afd.errors import ConfigError
from afd.transport.grpc_transport import GrpcTransport, GrpcTransportConfig
from afd.wire.frames import FrameLimits


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sender", ""),
        ("timeout_s", 0),
        ("connect_timeout_s", -1),
        ("streams_per_peer", 0),
        ("max_in_flight", 0),
        ("max_frame_bytes", 0),
        ("gil_switch_interval_s", 0.0),
        ("gil_switch_interval_s", 1.0),
    ],
)
def test_bad_config_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        GrpcTransportConfig(**{field: value})  # type: ignore[arg-type]


def test_construction_is_lazy_and_close_is_idempotent() -> None:
    before = sys.getswitchinterval()
    limits = FrameLimits(hidden_size=8, num_layers=2, top_k=2, max_local_experts=4)
    try:
        config = GrpcTransportConfig(streams_per_peer=3, gil_switch_interval_s=0.0005)
        transport = GrpcTransport({"ffn-0": "127.0.0.1:1", "ffn-1": "127.0.0.1:2"}, limits, config)
        assert transport.peers == {"ffn-0": "127.0.0.1:1", "ffn-1": "127.0.0.1:2"}
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        transport.close()
        transport.close()
    finally:
        sys.setswitchinterval(before)
