"""In-process transport: FFN shards live in the attention node's process (tests, `afd generate`, benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from afd.transport.base import FfnComputer, FfnTransport, PendingCombine
from afd.transport.staging import request_to_device, to_device


class _Computed(PendingCombine):
    def __init__(self, partials: dict[str, torch.Tensor]) -> None:
        super().__init__(tuple(partials))
        self.partials = partials


class InProcessTransport(FfnTransport):
    """Calls the shards directly; the work happens at dispatch, so combine only hands results back.

    Nothing is serialised. Tensors stay where they are when the attention side and a shard share a device;
    otherwise a request is moved to the shard's device (its `device` attribute, if it has one) and the
    partial sum back to `device` (afd.transport.staging.to_device: non-blocking copies).
    """

    rows_cross_a_wire = False

    def __init__(self, shards: Mapping[str, FfnComputer], device: torch.device | str | None = None) -> None:
        """device: the attention side's compute device, where combine returns the partial sums (None: where
        the shards computed them)."""
        self.shards = dict(shards)
        self.device = None if device is None else torch.device(device)

    def set_peers(self, peers: Mapping[str, str]) -> None:
        """The shards are fixed at construction; a placement may only name them (addresses are ignored)."""
        unknown = sorted(set(peers) - set(self.shards))
        if unknown:
            raise PeerError(unknown[0], f"no such FFN shard in this process (have {sorted(self.shards)})")

    def dispatch(self, requests: Mapping[str, FfnRequest]) -> PendingCombine:
        partials = {}
        for node, request in requests.items():
            shard = self.shards.get(node)
            if shard is None:
                raise PeerError(node, "no such FFN shard in this process")
            shard_device = getattr(shard, "device", None)  # a computer without one takes requests as they are
            request = request_to_device(request, shard_device)
            partials[node] = to_device(shard.compute(_in_shard_dtype(request, shard)), self.device)
        return _Computed(partials)

    def combine(self, pending: PendingCombine) -> dict[str, torch.Tensor]:
        assert isinstance(pending, _Computed)
        return pending.partials


def _in_shard_dtype(request: FfnRequest, shard: FfnComputer) -> FfnRequest:
    """What an FFN node does with a frame from a narrower wire (fp8, bf16): compute in its own dtype."""
    dtype = getattr(shard, "dtype", None)  # FfnShard has one; a computer without it takes requests as they are
    return request if dtype is None else request.in_dtype(dtype)
