"""The FFN side of the gloo, shared-memory and NCCL channels, registered with the FFN node server on import.

FfnNode.OpenChannel hands the attention node's rendezvous bytes to the acceptor of the named transport.
The acceptor checks them at once (bad bytes fail the RPC with a clear error instead of a background
thread) and returns how to join; joining may block (a gloo pair forms only once both ends are there),
so the server runs it on a thread of its own while the RPC returns.
"""

from __future__ import annotations

from afd.transport.gloo_channel import GlooOptions, check_gloo_rendezvous, connect_gloo
from afd.transport.nccl.channel import NcclOptions, check_nccl_rendezvous, connect_nccl
from afd.transport.shm_channel import ShmOptions, check_shm_rendezvous, connect_shm
from ffn_nodes.server import ChannelOffer, ChannelRequest, register_channel_acceptor


def accept_gloo(request: ChannelRequest, options: GlooOptions | None = None) -> ChannelOffer:
    check_gloo_rendezvous(request.rendezvous)
    return ChannelOffer(b"", lambda: connect_gloo(request.rendezvous, request.attention_node_id, options))


def accept_shm(request: ChannelRequest, options: ShmOptions | None = None) -> ChannelOffer:
    check_shm_rendezvous(request.rendezvous)
    return ChannelOffer(b"", lambda: connect_shm(request.rendezvous, request.attention_node_id, options))


def accept_nccl(request: ChannelRequest, options: NcclOptions | None = None) -> ChannelOffer:
    check_nccl_rendezvous(request.rendezvous)
    return ChannelOffer(b"", lambda: connect_nccl(request.rendezvous, request.attention_node_id, None, options))


ACCEPTORS = {"gloo": accept_gloo, "shm": accept_shm, "nccl": accept_nccl}
"""This module's acceptors by transport name (for a registry other than ffn_nodes.server's own)."""

for _name, _acceptor in ACCEPTORS.items():
    register_channel_acceptor(_name, _acceptor)
