"""Planning the expert placement table over the FFN pool.

Experts go to FFN nodes in proportion to their speed (from the capacity profile), and dense / shared MLP
slices in the same proportion. When the pool changes, the plan keeps every expert that can stay where it
is and moves only what must move (the experts of a leaving node, or the surplus of nodes above their new
share), so a scale-up or a failure reloads as few weights as possible.

On top of that base, `plan_replicas` adds replicas of the hottest experts (observed load, from the
router's sliding window of heartbeat counts) on the least loaded nodes; the controller publishes the
result as a new placement version, switched live like a scale event.
"""

from __future__ import annotations

from collections.abc import Mapping

from afd.errors import ConfigError
from afd.placement import ExpertPlacement, apportion


def plan_placement(
    num_experts: int,
    speeds: Mapping[str, float],
    previous: ExpertPlacement | None = None,
    version: int = 0,
) -> ExpertPlacement:
    """Placement of `num_experts` over the nodes of `speeds` (node id -> relative speed > 0).

    Node order follows `previous` for nodes that stay, then new nodes in the given order, so that
    slices of the dense/shared MLPs move as little as possible too.
    """
    if not speeds:
        raise ConfigError("no FFN node is available to hold the experts")
    if any(speed <= 0 for speed in speeds.values()):
        raise ConfigError(f"FFN node speeds must be positive: {dict(speeds)}")
    kept_order = [n for n in (previous.nodes if previous else ()) if n in speeds]
    nodes = kept_order + [n for n in speeds if n not in kept_order]
    targets = dict(zip(nodes, apportion(num_experts, [speeds[n] for n in nodes]), strict=True))
    held: dict[str, list[int]] = {n: [] for n in nodes}
    placed: set[int] = set()
    if previous is not None and previous.num_experts == num_experts:
        for node, ids in zip(previous.nodes, previous.experts, strict=True):
            if node in held:
                keep = [e for e in ids if e not in placed][: targets[node]]
                held[node] = keep
                placed.update(keep)
    orphans = [e for e in range(num_experts) if e not in placed]
    for node in nodes:
        room = targets[node] - len(held[node])
        held[node] += orphans[:room]
        orphans = orphans[room:]
    return ExpertPlacement(
        num_experts=num_experts,
        nodes=tuple(nodes),
        experts=tuple(tuple(sorted(held[n])) for n in nodes),
        mlp_shares=tuple(float(speeds[n]) for n in nodes),
        version=version,
    )


def moved_experts(before: ExpertPlacement, after: ExpertPlacement) -> dict[str, set[int]]:
    """Experts each node of `after` must load that it did not hold in `before`."""
    had = {node: set(ids) for node, ids in zip(before.nodes, before.experts, strict=True)}
    return {
        node: set(ids) - had.get(node, set())
        for node, ids in zip(after.nodes, after.experts, strict=True)
        if set(ids) - had.get(node, set())
    }


# ---------------------------------------------------------------------------------------------------
# Hot-expert replication (EPLB under AFD)
# ---------------------------------------------------------------------------------------------------


def node_loads(
    placement: ExpertPlacement, expert_load: Mapping[int, float], speeds: Mapping[str, float]
) -> dict[str, float]:
    """Predicted time per node: the tokens of every expert it holds, split evenly among that expert's
    replicas (what attn_nodes/dispatch.py does), divided by the node's relative speed."""
    replicas = [0] * placement.num_experts
    for ids in placement.experts:
        for expert in ids:
            replicas[expert] += 1
    return {
        node: sum(expert_load.get(e, 0.0) / replicas[e] for e in ids) / speeds.get(node, 1.0)
        for node, ids in zip(placement.nodes, placement.experts, strict=True)
    }


def imbalance(loads: Mapping[str, float]) -> float:
    """max / mean of the node loads (1.0 = perfectly balanced; 1.0 when nothing was computed)."""
    mean = sum(loads.values()) / len(loads) if loads else 0.0
    return max(loads.values()) / mean if mean > 0 else 1.0


def plan_replicas(
    base: ExpertPlacement,
    expert_load: Mapping[int, float],
    speeds: Mapping[str, float],
    max_replicas_per_node: int,
    target_imbalance: float = 1.1,
    version: int = 0,
) -> ExpertPlacement:
    """`base` plus replicas of its hottest experts on the least-loaded nodes (greedy, as MegaScale-Infer).

    expert_load: tokens per global expert over the recent window; speeds: node id -> relative speed.
    Each round takes the most loaded node (predicted by `node_loads`), its expert with the most tokens per
    replica, and adds a replica of it on the least loaded node that does not hold it and has fewer than
    `max_replicas_per_node` replicas, if no holder of it ends up as loaded as that node was; it stops once
    max/mean is at most `target_imbalance`, or when no replica helps. A balanced load therefore gets no replica at all.
    Node order, MLP shares and every expert of `base` stay as they are (only replicas are added).
    """
    if max_replicas_per_node < 0:
        raise ConfigError(f"max_replicas_per_node must be >= 0, got {max_replicas_per_node}")
    if target_imbalance < 1.0:
        raise ConfigError(f"target_imbalance must be >= 1.0 (max/mean), got {target_imbalance}")
    held = {node: list(ids) for node, ids in zip(base.nodes, base.experts, strict=True)}
    added = dict.fromkeys(base.nodes, 0)

    def current() -> ExpertPlacement:
        return ExpertPlacement(
            num_experts=base.num_experts,
            nodes=base.nodes,
            experts=tuple(tuple(sorted(held[n])) for n in base.nodes),
            mlp_shares=base.mlp_shares,
            version=version,
        )

    placement = current()
    for _ in range(max_replicas_per_node * len(base.nodes)):
        loads = node_loads(placement, expert_load, speeds)
        if imbalance(loads) <= target_imbalance:
            break
        hottest_node = max(base.nodes, key=lambda n: (loads[n], -base.nodes.index(n)))
        replicas = {e: sum(e in ids for ids in held.values()) for e in held[hottest_node]}
        candidates = sorted(
            (e for e in held[hottest_node] if expert_load.get(e, 0.0) > 0),
            key=lambda e: (-expert_load.get(e, 0.0) / replicas[e], e),
        )
        targets = sorted(
            (n for n in base.nodes if added[n] < max_replicas_per_node), key=lambda n: (loads[n], base.nodes.index(n))
        )
        best: tuple[int, str] | None = None
        for expert in candidates:
            for node in targets:
                if expert in held[node]:
                    continue
                held[node].append(expert)
                trial = node_loads(current(), expert_load, speeds)
                held[node].remove(expert)
                # only the expert's holders change (they all get lighter but the new one): take the replica
                # if none of them ends up as loaded as the hottest node was
                changed = [n for n in base.nodes if expert in held[n] or n == node]
                if max(trial[n] for n in changed) < loads[hottest_node] * (1 - 1e-9):
                    best = (expert, node)
                break  # the least loaded eligible node is the one to try for this expert
            if best is not None:
                break
        if best is None:
            break
        expert, node = best
        held[node].append(expert)
        added[node] += 1
        placement = current()
    return placement


def replicas_beyond(base: ExpertPlacement, replicated: ExpertPlacement) -> dict[str, tuple[int, ...]]:
    """Per node of `replicated`, the experts it holds beyond `base` (its replicas), ascending."""
    had = {node: set(ids) for node, ids in zip(base.nodes, base.experts, strict=True)}
    return {
        node: tuple(e for e in ids if e not in had.get(node, set()))
        for node, ids in zip(replicated.nodes, replicated.experts, strict=True)
    }
