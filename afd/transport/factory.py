"""An attention node's transport to the FFN pool, made from the name `--transport` takes.

gRPC streams need no set-up beyond the FFN nodes' addresses; the channel backends (afd/transport/backends.py)
open one pairwise channel per FFN node when a placement names it (`set_peers`), over the FFN node's
control service. A backend this machine cannot run (NCCL without a GPU) is refused here, when the node
starts, rather than at its first placement.
"""

from __future__ import annotations

import torch

from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.transport.backends import CHANNEL_BACKENDS, ChannelListeners
from afd.transport.base import FfnTransport
from afd.wire.auth import ClusterAuth

TRANSPORTS = ("grpc", *CHANNEL_BACKENDS)
"""Every data plane an attention node can use."""


def make_transport(
    kind: str,
    spec: ModelSpec,
    sender: str,
    auth: ClusterAuth,
    timeout_s: float,
    listen_host: str = "127.0.0.1",
    device: torch.device | None = None,
) -> FfnTransport:
    """The transport `kind` for attention node `sender`, with no peers yet (the first placement brings them).

    timeout_s: longest wait for a partial sum (and for an FFN node to join a channel); listen_host: the
    address FFN nodes reach this node at, for backends where they connect back to it (gloo); device: the
    node's compute device, where `combine` returns the partial sums (None: where they arrive).
    """
    if kind == "grpc":
        from afd.transport.grpc_transport import GrpcTransport, GrpcTransportConfig

        grpc_config = GrpcTransportConfig(sender=sender, timeout_s=timeout_s, auth=auth, device=device)
        return GrpcTransport.for_model(spec, {}, grpc_config)
    backend = CHANNEL_BACKENDS.get(kind)
    if backend is None:
        raise ConfigError(f"transport {kind!r} does not exist; choose one of {', '.join(TRANSPORTS)}")
    backend.check_available()
    from afd.transport.channel_transport import ChannelOpener, ChannelTransport, ChannelTransportConfig
    from afd.wire.frames import FrameLimits

    # NCCL buffers live on the node's GPU; without a CUDA device here the current one is used.
    nccl_device = device.index if device is not None and device.type == "cuda" else None
    listeners = ChannelListeners(gloo_host=listen_host, nccl_device=nccl_device)
    opener = ChannelOpener(kind, sender, listeners, auth, timeout_s)
    config = ChannelTransportConfig(sender=sender, timeout_s=timeout_s, device=device)
    return ChannelTransport({}, FrameLimits.for_model(spec), config, opener)
