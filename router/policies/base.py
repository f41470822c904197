"""The seam between the controller and a request-placement policy (after sgl-router's LoadBalancingPolicy).

The controller owns health: it passes a policy only the attention nodes that can take a request now (ready,
on the current placement, not excluded by the caller), so no policy can pick a dead or draining node.
The policy only ranks them; hooks that a stateless policy does not need default to doing nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from router.membership import NodeRecord


class LoadBalancingPolicy(Protocol):
    """Chooses one of the healthy candidates for a request."""

    name: str
    """Shown in logs and the cluster view."""

    def select(self, candidates: Sequence[NodeRecord]) -> NodeRecord:
        """One of `candidates` (never empty: the controller answers 'no capacity' itself)."""
        ...

    def on_request_start(self, node: NodeRecord) -> None:
        """A request was placed on `node` (policies that keep their own counts update them here)."""

    def on_request_end(self, node: NodeRecord) -> None:
        """A request placed on `node` finished, failed or moved."""
