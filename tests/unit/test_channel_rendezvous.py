"""Rendezvous bytes arrive over the network: every malformed or foreign one is refused with RendezvousError."""

from __future__ import annotations

import msgpack
import pytest

from afd.errors import ConfigError
from afd.transport.gloo_channel import GlooOptions, check_gloo_rendezvous
from afd.transport.rendezvous import RendezvousError, pack_rendezvous
from afd.transport.shm_channel import ShmOptions, check_shm_rendezvous, connect_shm

GOOD_GLOO = {"host": "127.0.0.1", "port": 29500, "prefix": "afd-gloo/" + "0" * 32 + "/", "secret": "ab" * 32}
TOKEN = "1" * 32
GOOD_SHM = {"socket": f"afd-{TOKEN}-sock", "a2f": f"afd-{TOKEN}-a2f", "f2a": f"afd-{TOKEN}-f2a", "ring_bytes": 1 << 20}


def test_well_formed_rendezvous_are_accepted():
    assert check_gloo_rendezvous(pack_rendezvous("gloo", GOOD_GLOO))["port"] == 29500
    assert check_shm_rendezvous(pack_rendezvous("shm", GOOD_SHM))["ring_bytes"] == 1 << 20


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1garbage",
        msgpack.packb([1, 2, 3]),
        b"\x00" * 5000,  # longer than any rendezvous
        msgpack.packb({"backend": "gloo", "host": "h", "port": 1}),  # a field missing
        msgpack.packb({**GOOD_GLOO, "backend": "gloo", "extra": 1}),  # an unknown field
        msgpack.packb({**GOOD_GLOO, "backend": "gloo", "port": "29500"}),  # wrong type
        pack_rendezvous("gloo", {**GOOD_GLOO, "port": 70000}),
        pack_rendezvous("gloo", {**GOOD_GLOO, "prefix": "../../etc/"}),
        pack_rendezvous("gloo", {**GOOD_GLOO, "secret": "ab" * 31}),  # a short secret
        pack_rendezvous("gloo", {**GOOD_GLOO, "secret": "AB" * 32}),  # not lower-case hex
        pack_rendezvous("shm", GOOD_SHM),  # another backend's rendezvous
    ],
)
def test_malformed_gloo_rendezvous_is_refused(data):
    with pytest.raises(RendezvousError, match="gloo"):
        check_gloo_rendezvous(data)


@pytest.mark.parametrize(
    "fields",
    [
        {**GOOD_SHM, "a2f": "../../dev/sda"},
        {**GOOD_SHM, "a2f": GOOD_SHM["f2a"]},  # a name of the wrong role
        {**GOOD_SHM, "socket": "afd-" + "z" * 32 + "-sock"},
        {**GOOD_SHM, "ring_bytes": 16},
        {**GOOD_SHM, "ring_bytes": 1 << 40},
    ],
)
def test_malformed_shm_rendezvous_is_refused(fields):
    with pytest.raises(RendezvousError, match="shm"):
        check_shm_rendezvous(pack_rendezvous("shm", fields))


def test_shm_rendezvous_from_another_host_says_so():
    # Well formed, but no such segment exists here: the attention node is on another machine.
    with pytest.raises(RendezvousError, match="not on this host"):
        connect_shm(pack_rendezvous("shm", GOOD_SHM), "attn-elsewhere")


def test_invalid_channel_options_are_config_errors():
    with pytest.raises(ConfigError, match="chunk_bytes"):
        ShmOptions(ring_bytes=1 << 20, chunk_bytes=1 << 20)
    with pytest.raises(ConfigError, match="timeouts"):
        GlooOptions(io_timeout=0)


def test_nccl_acceptor_refuses_malformed_rendezvous_before_joining():
    from afd.transport.backends import CHANNEL_BACKENDS, ChannelRequest
    from afd.transport.nccl import PAIR_ID_BYTES, nccl_rendezvous

    for data in (b"", pack_rendezvous("gloo", GOOD_GLOO), nccl_rendezvous(b"\x01" * (PAIR_ID_BYTES - 1))):
        with pytest.raises(RendezvousError, match="nccl"):
            CHANNEL_BACKENDS["nccl"].accept(ChannelRequest("attn-0", data, "ffn-0"))


def test_nccl_listener_without_gpu_or_libnccl_says_why():
    from afd.transport.backends import ChannelListeners
    from afd.transport.nccl import NcclUnavailableError, unavailable_reason

    if unavailable_reason() is None:
        pytest.skip("NCCL is usable here; tests/gpu covers the channel")
    with pytest.raises(NcclUnavailableError, match=r"libnccl|CUDA|GPU"):
        ChannelListeners().listener("nccl", "ffn-0")
    with pytest.raises(ConfigError, match=r"no channel backend 'rdma'; choose one of gloo, nccl, shm"):
        ChannelListeners().listener("rdma", "ffn-0")
