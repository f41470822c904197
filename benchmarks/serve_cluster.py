"""What `afd bench serve` reads from an AFD router: GET /afd/v1/cluster, summarised for the result.

The router's node list (node_contract.md) gives the topology (nodes per role, transport and microbatch
plan when reported), per-node tokens/s (sampled during the run and summed per role) and each node's
device kind. Against a server without that endpoint (vLLM, SGLang) every summary is None, except the
client's own CPU model.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

CLUSTER_PATH = "/afd/v1/cluster"


class ClusterNode(BaseModel):
    """One node of GET /afd/v1/cluster (fields we do not use are ignored)."""

    model_config = ConfigDict(extra="ignore")
    node_id: str
    role: str
    state: str | None = None
    device_kind: str | None = None
    device_count: NonNegativeInt | None = None
    tokens_per_s: float | None = None
    busy_fraction: float | None = None
    """Share of wall time the node computed over its last heartbeat interval (FFN nodes)."""
    experts: list[int] = Field(default_factory=list)
    transport: str | None = None
    microbatches: Any = None


class ClusterSnapshot(BaseModel):
    """GET /afd/v1/cluster of the AFD router (node_contract.md); extra optional keys are read when present."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    nodes: list[ClusterNode]
    placement_version: int | None = None
    transport: str | None = None
    microbatches: Any = None
    vocab_size: PositiveInt | None = None

    def of_role(self, role: str) -> list[ClusterNode]:
        return [n for n in self.nodes if n.role == role]


def cluster_topology(snapshot: ClusterSnapshot) -> dict[str, Any]:
    """Node counts per role, transport and microbatch plan (when the router reports them), and the nodes."""
    attention = snapshot.of_role("attention")
    transports = sorted({n.transport for n in snapshot.nodes if n.transport})
    microbatches = snapshot.microbatches
    if microbatches is None:
        microbatches = {n.node_id: n.microbatches for n in attention if n.microbatches is not None} or None
    return {
        "attention_nodes": len(attention),
        "ffn_nodes": len(snapshot.of_role("ffn")),
        "transport": snapshot.transport or (transports[0] if len(transports) == 1 else transports or None),
        "microbatches": microbatches,
        "placement_version": snapshot.placement_version,
        "nodes": [
            {
                "node_id": n.node_id,
                "role": n.role,
                "state": n.state,
                "device_kind": n.device_kind,
                "device_count": n.device_count,
                "num_experts": len(n.experts),
            }
            for n in snapshot.nodes
        ],
    }


def per_role_tokens_per_s(samples: list[ClusterSnapshot]) -> dict[str, float] | None:
    """Mean over the samples of each role's summed node tokens/s; None when no node reports it."""
    sums: dict[str, list[float]] = {}
    for snapshot in samples:
        per_role: dict[str, float] = {}
        for node in snapshot.nodes:
            if node.tokens_per_s is not None:
                per_role[node.role] = per_role.get(node.role, 0.0) + node.tokens_per_s
        for role, rate in per_role.items():
            sums.setdefault(role, []).append(rate)
    return {role: sum(rates) / len(rates) for role, rates in sorted(sums.items())} or None


def ffn_busy(samples: list[ClusterSnapshot]) -> dict[str, Any] | None:
    """Mean busy fraction of each FFN node over the samples, and the largest over the mean of them (1.0: an even
    load; what hot-expert replication evens out); None when no FFN node reports one."""
    fractions: dict[str, list[float]] = {}
    for snapshot in samples:
        for node in snapshot.of_role("ffn"):
            if node.busy_fraction is not None:
                fractions.setdefault(node.node_id, []).append(node.busy_fraction)
    if not fractions:
        return None
    per_node = {node: sum(values) / len(values) for node, values in sorted(fractions.items())}
    mean = sum(per_node.values()) / len(per_node)
    return {"per_node": per_node, "max_over_mean": max(per_node.values()) / mean if mean > 0 else None}


def client_cpu_model() -> str:
    """CPU model of this (client) machine."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def hardware_summary(snapshot: ClusterSnapshot | None) -> dict[str, Any]:
    """Devices per role ({device_kind: device count}) from the router, and the client's CPU model."""
    roles: dict[str, dict[str, int] | None] = {"attention": None, "ffn": None}
    for node in snapshot.nodes if snapshot else []:
        kinds = roles.get(node.role) or {}
        kind = node.device_kind or "unknown"
        kinds[kind] = kinds.get(kind, 0) + (node.device_count or 1)
        roles[node.role] = kinds
    return {"client_cpu": client_cpu_model(), **roles}


async def get_json(client: httpx.AsyncClient, url: str, headers: Mapping[str, str]) -> tuple[Any, str]:
    """(JSON body, "") on 200, else (None, why)."""
    try:
        response = await client.get(url, headers=headers)
        if response.status_code != 200:
            return None, f"HTTP {response.status_code}: {response.text[:200]}"
        return response.json(), ""
    except (httpx.HTTPError, ValueError) as error:
        return None, f"{type(error).__name__}: {error}"


async def fetch_cluster(client: httpx.AsyncClient, root: str, headers: Mapping[str, str]) -> ClusterSnapshot | None:
    """The router's cluster view, or None when the server has none (not an AFD router) or it is malformed."""
    body, _ = await get_json(client, root + CLUSTER_PATH, headers)
    try:
        return ClusterSnapshot.model_validate(body) if body is not None else None
    except ValidationError:
        return None


# ---- the router's per-layer exchange counters (afd bench cluster, afd bench mix) ----
EXCHANGE_COUNTERS = {
    "afd:layer_round_trips": "round_trips",
    "afd:layer_round_trip_seconds": "seconds",
    "afd:layer_wait_seconds": "wait_seconds",
}
HEARTBEAT_SETTLE_S = 5.0
"""Longest wait for the attention node's last heartbeat to bring the run's exchanges to the router's counters."""


def exchange_totals(base_url: str) -> dict[str, float]:
    """The router's per-layer exchange counters, summed over layers: round_trips, seconds, wait_seconds."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base_url + "/metrics", timeout=10.0).text
    totals = dict.fromkeys(EXCHANGE_COUNTERS.values(), 0.0)
    for family in text_string_to_metric_families(text):
        key = EXCHANGE_COUNTERS.get(family.name)
        if key is not None:
            totals[key] += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return totals


def settled_exchange_totals(base_url: str, previous: Mapping[str, float] | None = None) -> dict[str, float]:
    """exchange_totals once two readings a heartbeat apart agree (bounded by HEARTBEAT_SETTLE_S)."""
    deadline = time.monotonic() + HEARTBEAT_SETTLE_S
    last = exchange_totals(base_url)
    while time.monotonic() < deadline:
        time.sleep(1.1)
        current = exchange_totals(base_url)
        if current == last and (previous is None or current != previous):
            return current
        last = current
    return last


def exchange_fields(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float | None]:
    """Per exchange between two exchange_totals readings: mean round trip (dispatch to the end of combine) and
    time blocked in combine, ms, and the share of the round trip the microbatch pipeline hid; None without any."""
    trips = after["round_trips"] - before["round_trips"]
    if trips <= 0:
        return {"round_trip_ms": None, "wait_ms": None, "hidden_share": None}
    seconds = after["seconds"] - before["seconds"]
    wait = after["wait_seconds"] - before["wait_seconds"]
    return {
        "round_trip_ms": round(seconds * 1e3 / trips, 3),
        "wait_ms": round(wait * 1e3 / trips, 3),
        "hidden_share": round(1 - wait / seconds, 3) if seconds > 0 else None,
    }
