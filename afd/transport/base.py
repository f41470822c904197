"""The transport interface between the attention and FFN halves.

`dispatch` hands one FfnRequest per FFN node to the transport and returns at once; `combine` waits for
the partial sums. Splitting the two is what lets an attention node compute microbatch i+1 while
microbatch i is on the FFN nodes (ping-pong). Backends: in-process (here), gRPC, gloo, NCCL, shm.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Protocol

import torch

from afd.ffn_messages import FfnRequest


class FfnComputer(Protocol):
    """Anything that turns an FfnRequest into a partial sum: an FFN shard, or a proxy to one."""

    def compute(self, request: FfnRequest) -> torch.Tensor:
        """Partial sum `[request.num_tokens, hidden_size]` in the hidden dtype."""
        ...


class PendingCombine:
    """Handle for the partial sums of one dispatch; transports subclass it to carry their own state."""

    def __init__(self, nodes: tuple[str, ...]) -> None:
        self.nodes = nodes


class FfnTransport(ABC):
    """Moves requests to named FFN nodes and their partial sums back."""

    rows_cross_a_wire: bool = True
    """Requests are copied to the FFN nodes (a network, shared memory), so on the CPU each node is sent only
    the rows it computes; False where the shards read the attention side's tensors in place (in-process)."""

    @abstractmethod
    def dispatch(self, requests: Mapping[str, FfnRequest]) -> PendingCombine:
        """Start sending `requests` (FFN node id -> request); must not wait for the replies."""

    @abstractmethod
    def combine(self, pending: PendingCombine) -> dict[str, torch.Tensor]:
        """Wait for every partial sum of `pending`; raises PeerError naming a node that failed."""

    @abstractmethod
    def set_peers(self, peers: Mapping[str, str]) -> None:
        """Switch to the FFN nodes of a new placement (node id -> "host:port"); called between steps.

        Links to new nodes are made, links to nodes no longer listed (or at a new address) are closed.
        Raises PeerError naming a node that cannot be reached.
        """

    def fail_peer(self, node: str, reason: str) -> int:
        """Stop waiting on FFN node `node`: whatever is awaited from it fails now with PeerError(`reason`).

        Called from any thread when the control plane knows the node is gone (declared dead), so a step
        blocked in `combine` on a frozen node ends at once instead of at the reply timeout. Returns how many
        awaited replies it failed; transports that never wait (in-process) have nothing to fail.
        """
        return 0

    def withdraw_peer(self, node: str, reason: str) -> int:
        """Like `fail_peer`, for a node the router withdrew as a straggler (it is alive): what is awaited from
        it fails with afd.transport.deadlines.Withdrawn, which the engine re-runs without reporting."""
        return 0

    def close(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing to release
        """Release connections; idempotent."""
