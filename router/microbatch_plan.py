"""How many microbatches an attention node should split its step into (MegaScale-Infer's ping-pong rule).

With m microbatches in flight, the attention node computes one while the others are on the wire or on the
FFN nodes. Transfers hide when per-microbatch attention time is about the FFN time and both exceed the
transfer time; MegaScale-Infer derives m >= 2 * (1 + T_comm / T_compute). Costs come from the nodes'
capacity profiles (measured at start-up), so a slow link or a slow FFN pool gets more microbatches and a
fast local pool gets fewer. CPU nodes that all run on one host get one microbatch: there is no other
hardware for the FFN half to run on (see cpu_nodes_share_one_host).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from afd.errors import ConfigError
from router.membership import NodeRecord

MAX_MICROBATCHES = 4
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def parse_microbatches(value: str) -> int | None:
    """ "auto" -> None (the router plans per node), else a count >= 1; ConfigError for anything else."""
    if value == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(f"microbatches must be auto or a positive integer, not {value!r}") from None
    if count < 1:
        raise ConfigError(f"microbatches must be auto or a positive integer, not {count}")
    return count


@dataclass(frozen=True, slots=True)
class StepCosts:
    """Per-layer costs of one decode step of `tokens` tokens, in microseconds."""

    attention_us: float
    ffn_us: float
    transfer_us: float


def step_costs(
    tokens: int,
    attention_us_per_token: float,
    ffn_us_per_token_expert: float,
    top_k: int,
    num_ffn_nodes: int,
    hidden_size: int,
    link_bytes_per_second: float,
    bytes_per_element: int = 2,
    link_latency_us: float = 0.0,
) -> StepCosts:
    """Attention, FFN (pool in parallel) and transfer (there and back) time of one layer for `tokens` tokens.

    link_bytes_per_second / link_latency_us: the link as the attention node's data plane measures it
    (afd/transport/deadlines.py: seconds = latency + bytes / bandwidth per exchange; 0 where unknown). The
    measurement includes the FFN node's compute, so the transfer term is an upper bound of the wire's.
    """
    fanout = min(top_k, num_ffn_nodes) if top_k else num_ffn_nodes
    attention = tokens * attention_us_per_token
    ffn = tokens * max(top_k, 1) * ffn_us_per_token_expert / max(num_ffn_nodes, 1)
    payload = 2 * tokens * fanout * hidden_size * bytes_per_element
    transfer = payload / link_bytes_per_second * 1e6 if link_bytes_per_second > 0 else 0.0
    transfer += max(0.0, link_latency_us)
    return StepCosts(attention, ffn, transfer)


def plan_microbatches(costs: StepCosts, max_microbatches: int = MAX_MICROBATCHES) -> int:
    """m = 2 * (1 + T_comm / T_compute), rounded up, within [1, max]; 1 when nothing can overlap."""
    compute = max(costs.attention_us, costs.ffn_us)
    if compute <= 0:
        return 1
    if costs.transfer_us <= 0 and min(costs.attention_us, costs.ffn_us) <= 0.05 * compute:
        return 1  # one side is negligible and the link is free: there is nothing to hide behind
    m = math.ceil(2 * (1 + costs.transfer_us / compute))
    return max(1, min(max_microbatches, m))


def _host(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return "127.0.0.1" if host in LOOPBACK_HOSTS else host


def cpu_nodes_share_one_host(attention: tuple[str, str], ffn: Sequence[tuple[str, str]]) -> bool:
    """True when the attention node and every FFN node are CPU processes on one host.

    `attention` and each `ffn` entry: (address "host:port", device kind). Ping-pong needs the FFN work to run
    on other hardware while attention computes; CPU decode is bound by memory bandwidth, which processes on
    one host share, so splitting the batch there only adds exchanges (measured with `afd bench cluster`: m=2
    and m=3 ran at 0.47-0.74x of m=1 on one 2-core host).
    """
    host = _host(attention[0])
    return (
        bool(ffn)
        and attention[1].startswith("cpu")
        and all(kind.startswith("cpu") and _host(address) == host for address, kind in ffn)
    )


def plan_for_node(node: NodeRecord, ffn_pool: Sequence[NodeRecord], top_k: int, hidden_size: int) -> int:
    """Microbatches for attention node `node` against the FFN nodes `ffn_pool`, from their capacity profiles.

    The step is sized at the node's current batch (or its batch limit when idle).
    """
    if not ffn_pool:
        return 1
    attention = (node.address, node.capacity.device_kind)
    if cpu_nodes_share_one_host(attention, [(n.address, n.capacity.device_kind) for n in ffn_pool]):
        return 1
    ffn_cost = sum(n.capacity.ffn_us_per_token_expert for n in ffn_pool) / len(ffn_pool)
    tokens = max(1, node.load.num_running or node.capacity.max_num_seqs or 1)
    costs = step_costs(
        tokens,
        node.capacity.attention_us_per_token,
        ffn_cost,
        top_k,
        len(ffn_pool),
        hidden_size,
        node.capacity.link_bytes_per_second,
        link_latency_us=node.capacity.link_latency_us,
    )
    return plan_microbatches(costs)
