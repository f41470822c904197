"""In-process transport: FFN shards live in the attention node's process (tests, `afd generate`, benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from afd.errors import PeerError
from afd.ffn_messages import FfnRequest
from afd.transport.base import FfnComputer, FfnTransport, PendingCombine


class _Computed(PendingCombine):
    def __init__(self, partials: dict[str, torch.Tensor]) -> None:
        super().__init__(tuple(partials))
        self.partials = partials


class InProcessTransport(FfnTransport):
    """Calls the shards directly; the work happens at dispatch, so combine only hands results back."""

    def __init__(self, shards: Mapping[str, FfnComputer]) -> None:
        self.shards = dict(shards)

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
            partials[node] = shard.compute(_in_shard_dtype(request, shard))
        return _Computed(partials)

    def combine(self, pending: PendingCombine) -> dict[str, torch.Tensor]:
        assert isinstance(pending, _Computed)
        return pending.partials


def _in_shard_dtype(request: FfnRequest, shard: FfnComputer) -> FfnRequest:
    """What an FFN node does with a frame from a narrower wire (fp8, bf16): compute in its own dtype."""
    dtype = getattr(shard, "dtype", None)  # FfnShard has one; a computer without it takes requests as they are
    return request if dtype is None else request.in_dtype(dtype)
