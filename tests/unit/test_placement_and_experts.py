"""Expert placement tables and the grouped expert compute."""

from __future__ import annotations

import pytest
import torch

from afd.errors import ConfigError
from afd.placement import ExpertPlacement
from ffn_nodes import experts as experts_module
from ffn_nodes.experts import StackedExperts, swiglu


def test_balanced_placement_is_proportional_and_complete():
    placement = ExpertPlacement.balanced(8, ["a", "b", "c"], weights=[1, 2, 3])
    assert [len(ids) for ids in placement.experts] == [1, 3, 4]
    assert sorted(e for ids in placement.experts for e in ids) == list(range(8))
    owner, local = placement.owner_tables()
    assert owner.tolist() == [0, 1, 1, 1, 2, 2, 2, 2]
    assert local.tolist() == [0, 0, 1, 2, 0, 1, 2, 3]
    bounds = [placement.slice_bounds(i, 96) for i in range(3)]
    assert bounds == [(0, 16), (16, 48), (48, 96)]


def test_placement_round_trips_and_replicas_use_the_first_owner():
    placement = ExpertPlacement(4, ("a", "b"), ((0, 1, 2), (2, 3)), (1.0, 1.0), version=7)
    assert ExpertPlacement.from_dict(placement.to_dict()) == placement
    owner, local = placement.owner_tables()
    assert owner.tolist() == [0, 0, 0, 1] and local.tolist() == [0, 1, 2, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"experts": ((0, 1), (2,))}, r"experts \[3\] are not placed"),
        ({"experts": ((0, 1), (3, 2))}, "unique and ascending"),
        ({"experts": ((0, 1), (2, 3, 4))}, "out of range"),
        ({"nodes": ("a", "a")}, "duplicate FFN node ids"),
        ({"mlp_shares": (0.0, 0.0)}, "positive sum"),
    ],
)
def test_bad_placements(kwargs, message):
    fields = {"num_experts": 4, "nodes": ("a", "b"), "experts": ((0, 1), (2, 3)), "mlp_shares": (1.0, 1.0)}
    with pytest.raises(ConfigError, match=message):
        ExpertPlacement(**(fields | kwargs))


@pytest.mark.parametrize("strategy", ["auto", "grouped", "padded", "looped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_match_a_per_token_reference(dtype, strategy):
    torch.manual_seed(0)
    experts, hidden, inter, tokens, top_k = 6, 32, 16, 11, 3
    gate_up = torch.randn(experts, 2 * inter, hidden, dtype=dtype) * 0.1
    down = torch.randn(experts, hidden, inter, dtype=dtype) * 0.1
    x = torch.randn(tokens, hidden, dtype=dtype)
    ids = torch.randint(-1, experts, (tokens, top_k), dtype=torch.int32)
    weights = torch.rand(tokens, top_k)
    stacked = StackedExperts(gate_up, down, strategy)
    out = torch.zeros(tokens, hidden, dtype=dtype)
    stacked.forward(x, ids, weights, out)

    expected = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(top_k):
            e = int(ids[t, j])
            if e >= 0:
                expected[t] += swiglu(x[t : t + 1], gate_up[e], down[e], inter)[0].float() * weights[t, j]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
    assert sum(stacked.expert_tokens) == (ids >= 0).sum()


def test_no_assignments_adds_nothing():
    stacked = StackedExperts(torch.randn(2, 8, 4), torch.randn(2, 4, 4))
    out = torch.zeros(3, 4)
    stacked.forward(torch.randn(3, 4), torch.full((3, 2), -1, dtype=torch.int32), torch.zeros(3, 2), out)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", [[[3, -1, 0, 5]], [[1, 4, -1, 2], [4, 0, 1, -1]], [[-1, -1, 2, -1], [-1, -1, -1, -1]]])
def test_decode_fast_path_is_identical_to_the_general_path(monkeypatch, dtype, ids):
    """One or two tokens take the Python-grouped path; its output must equal the sort-and-gather path bit for bit."""
    torch.manual_seed(1)
    experts, hidden, inter = 6, 64, 32
    gate_up = torch.randn(experts, 2 * inter, hidden, dtype=dtype) * 0.1
    down = torch.randn(experts, hidden, inter, dtype=dtype) * 0.1
    expert_ids = torch.tensor(ids, dtype=torch.int32)
    x = torch.randn(expert_ids.shape[0], hidden, dtype=dtype)
    weights = torch.rand(expert_ids.shape, dtype=torch.float32)
    outputs = []
    for few in (experts_module.FEW_ASSIGNMENTS, 0):
        monkeypatch.setattr(experts_module, "FEW_ASSIGNMENTS", few)
        stacked = StackedExperts(gate_up, down, "looped")
        out = torch.zeros(x.shape, dtype=dtype)
        stacked.forward(x, expert_ids, weights, out)
        outputs.append((out, stacked.expert_tokens, stacked.experts_hit))
    (fast, fast_tokens, fast_hit), (general, general_tokens, general_hit) = outputs
    assert torch.equal(fast, general)
    assert fast_tokens == general_tokens and fast_hit == general_hit
    assert torch.count_nonzero(fast) > 0
