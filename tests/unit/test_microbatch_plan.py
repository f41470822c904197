"""The router's microbatch count: MegaScale-Infer's ping-pong rule, and one microbatch for CPU nodes on one host."""

from __future__ import annotations

from pathlib import Path

import pytest

from afd.errors import ConfigError
from orchestration.local_cluster import LocalClusterConfig
from router.microbatch_plan import (
    MAX_MICROBATCHES,
    StepCosts,
    cpu_nodes_share_one_host,
    parse_microbatches,
    plan_microbatches,
    step_costs,
)


@pytest.mark.parametrize(
    ("costs", "m"),
    [
        (StepCosts(attention_us=100, ffn_us=100, transfer_us=0), 2),  # balanced, free link: ping-pong
        (StepCosts(attention_us=100, ffn_us=80, transfer_us=50), 3),  # 2 * (1 + 50/100) = 3
        (StepCosts(attention_us=100, ffn_us=100, transfer_us=1000), MAX_MICROBATCHES),  # capped
        (StepCosts(attention_us=100, ffn_us=1, transfer_us=0), 1),  # nothing to hide behind
        (StepCosts(attention_us=0, ffn_us=0, transfer_us=0), 1),
    ],
)
def test_ping_pong_rule(costs, m):
    assert plan_microbatches(costs) == m


def test_step_costs_scale_with_tokens_and_split_ffn_over_nodes():
    one = step_costs(8, 10.0, 4.0, top_k=4, num_ffn_nodes=2, hidden_size=1024, link_bytes_per_second=1e9)
    assert one.attention_us == 80 and one.ffn_us == 8 * 4 * 4.0 / 2
    assert one.transfer_us == pytest.approx(2 * 8 * 2 * 1024 * 2 / 1e9 * 1e6)  # there and back, 2 nodes
    assert step_costs(8, 10.0, 4.0, 4, 2, 1024, 0.0).transfer_us == 0  # unknown link


@pytest.mark.parametrize(
    ("attention", "ffn", "shared"),
    [
        (("127.0.0.1:5001", "cpu (1 threads)"), [("127.0.0.1:5002", "cpu (1 threads)")] * 2, True),
        (("localhost:5001", "cpu (8 threads)"), [("127.0.0.1:5002", "cpu (8 threads)")], True),
        (("10.0.0.1:5001", "cpu (8 threads)"), [("10.0.0.2:5002", "cpu (8 threads)")], False),  # two hosts
        (("10.0.0.1:5001", "cpu (8 threads)"), [("10.0.0.1:6000", "cpu"), ("10.0.0.3:6000", "cpu")], False),
        (("127.0.0.1:5001", "NVIDIA H100"), [("127.0.0.1:5002", "NVIDIA L40S")], False),  # GPUs on one host
        (("127.0.0.1:5001", "cpu"), [], False),
    ],
)
def test_cpu_nodes_on_one_host_are_detected(attention, ffn, shared):
    assert cpu_nodes_share_one_host(attention, ffn) is shared


def test_microbatch_option_parsing():
    assert parse_microbatches("auto") is None and parse_microbatches("3") == 3
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ConfigError, match="microbatches must be auto or a positive integer"):
            parse_microbatches(bad)
    with pytest.raises(ConfigError, match="microbatches must be auto"):
        LocalClusterConfig(model=Path("unused"), microbatches="many")
