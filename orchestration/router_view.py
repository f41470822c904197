"""What a launcher (local processes or Ray actors) asks the router it started: the cluster view and readiness.

Both launchers wait the same way for nodes they added: every one ready on the router's current placement
version and the API answering /health, polled until a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from afd.errors import AfdError

POLL_S = 0.2


def cluster_view(base_url: str, api_key: str | None = None) -> dict[str, Any]:
    """The router's /afd/v1/cluster: nodes (role, state, experts, placement version...) and the placement.

    It lists node addresses, so a router with an API key wants the key here too.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    response = httpx.get(f"{base_url}/afd/v1/cluster", headers=headers, timeout=5)
    response.raise_for_status()
    return response.json()


def nodes_ready(base_url: str, node_ids: Iterable[str], api_key: str | None = None) -> bool:
    """Every node of `node_ids` ready on the current placement, and the API healthy; False if unreachable."""
    try:
        view = cluster_view(base_url, api_key)
        healthy = httpx.get(f"{base_url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
    nodes = {node["node_id"]: node for node in view["nodes"]}
    placement = view.get("placement_version")
    return healthy and all(
        node_id in nodes and nodes[node_id]["state"] == "ready" and nodes[node_id]["placement_version"] == placement
        for node_id in node_ids
    )


def wait_until_ready(
    base_url: str,
    node_ids: set[str],
    timeout_s: float,
    check: Callable[[], None] = lambda: None,
    api_key: str | None = None,
) -> None:
    """Poll until `nodes_ready`; `check` runs each round and raises to give up early (e.g. a node exited).

    Raises AfdError naming the nodes after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        check()
        if nodes_ready(base_url, node_ids, api_key):
            return
        if time.monotonic() > deadline:
            raise AfdError(f"nodes {sorted(node_ids)} not ready within {timeout_s:.0f} s")
        time.sleep(POLL_S)
