"""The router's placement planner: proportional to speed, minimal movement on pool changes."""

from __future__ import annotations

import pytest

from afd.errors import ConfigError
from router.expert_placement import moved_experts, plan_placement


def _count(placement):
    return {n: len(ids) for n, ids in zip(placement.nodes, placement.experts, strict=True)}


def test_proportional_to_speed():
    placement = plan_placement(32, {"fast": 3.0, "slow": 1.0})
    assert _count(placement) == {"fast": 24, "slow": 8}
    assert placement.mlp_shares == (3.0, 1.0)


def test_scale_up_moves_only_what_the_new_node_takes():
    before = plan_placement(32, {"a": 1.0, "b": 1.0}, version=1)
    after = plan_placement(32, {"a": 1.0, "b": 1.0, "c": 1.0}, previous=before, version=2)
    assert _count(after) == {"a": 11, "b": 11, "c": 10}
    moves = moved_experts(before, after)
    assert set(moves) == {"c"} and len(moves["c"]) == 10  # a and b only drop experts
    assert after.version == 2


def test_node_loss_redistributes_only_its_experts():
    before = plan_placement(30, {"a": 1.0, "b": 1.0, "c": 1.0})
    after = plan_placement(30, {"a": 1.0, "c": 1.0}, previous=before)
    lost = set(before.experts[before.nodes.index("b")])
    moves = moved_experts(before, after)
    assert set().union(*moves.values()) == lost
    assert sorted(e for ids in after.experts for e in ids) == list(range(30))


def test_dense_model_has_only_slices():
    placement = plan_placement(0, {"a": 1.0, "b": 2.0})
    assert placement.experts == ((), ()) and placement.slice_bounds(1, 96) == (32, 96)


def test_errors():
    with pytest.raises(ConfigError, match="no FFN node"):
        plan_placement(8, {})
    with pytest.raises(ConfigError, match="positive"):
        plan_placement(8, {"a": 0.0})
