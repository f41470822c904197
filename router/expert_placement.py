"""Planning the expert placement table over the FFN pool.

Experts go to FFN nodes in proportion to their speed (from the capacity profile), and dense / shared MLP
slices in the same proportion. When the pool changes, the plan keeps every expert that can stay where it
is and moves only what must move (the experts of a leaving node, or the surplus of nodes above their new
share), so a scale-up or a failure reloads as few weights as possible.
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
