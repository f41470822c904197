"""`afd status` shows which experts each FFN node holds as compact ranges, never as a misleading min..max."""

from __future__ import annotations

import pytest

from orchestration.up_command import expert_ranges


@pytest.mark.parametrize(
    ("experts", "shown"),
    [
        ([0, 1, 2, 5, 7, 8], "0-2,5,7-8"),
        ([15, 6, 14, 7, 13], "6-7,13-15"),  # after a rebalance: not contiguous, not sorted
        ([3], "3"),
        (list(range(16)), "0-15"),
    ],
)
def test_expert_ranges(experts, shown):
    assert expert_ranges(experts) == shown
