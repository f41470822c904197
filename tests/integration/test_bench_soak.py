"""`afd bench soak` against the fake OpenAI server (127.0.0.1, ephemeral port): counting, intervals, RSS."""

from __future__ import annotations

import os

import pytest

from afd.errors import ConfigError
from benchmarks.soak import SoakConfig, metric_totals, run_soak
from tests.fake_openai_server import FakeOpenAIServer, FakeServerBehavior


def test_soak_counts_every_request_per_interval_with_rss_and_ratios():
    with FakeOpenAIServer(FakeServerBehavior(itl_s=0.002, fail_fraction=0.25)) as server:
        config = SoakConfig(server.base_url, minutes=0.05, concurrency=3, output_len=4, interval_s=1.0)
        result = run_soak(config, lambda: {"this-test": os.getpid()})
        sent = len(server.payloads)
    assert result["requests"] == sent > 8
    assert result["failed"] == sent // 4  # the fake fails exactly round-down(n/4) of n
    assert result["succeeded"] == sent - result["failed"] and result["hung"] == result["changed"] == 0
    assert result["errors"]["failed"].startswith("HTTP 500")
    intervals = result["intervals"]
    assert len(intervals) == 3 and sum(row["requests"] for row in intervals) == sent
    assert all(row["rss_mb"]["this-test"] > 10 for row in intervals)
    assert result["last_vs_first_total_rss"] is not None and result["last_vs_first_output_tok_s"] > 0
    assert result["num_requests_running_end"] is None  # the fake has no /metrics


def test_soak_counts_requests_without_an_answer_in_time_as_hung():
    with FakeOpenAIServer(FakeServerBehavior(ttft_s=(0.0, 5.0), itl_s=0.0)) as server:
        config = SoakConfig(server.base_url, minutes=0.02, concurrency=2, output_len=2, request_timeout_s=0.5)
        result = run_soak(config)
    assert result["hung"] >= 1 and result["succeeded"] >= 1
    assert "no complete answer within" in result["errors"]["hung"]


def test_metric_totals_sums_label_sets_and_skips_other_names():
    text = (
        "# HELP vllm:num_requests_running x\n"
        'vllm:num_requests_running{model_name="m",node="a"} 2.0\n'
        'vllm:num_requests_running{model_name="m",node="b"} 1.0\n'
        "vllm:kv_cache_usage_perc 0.25\n"
        "vllm:other 9\n"
    )
    totals = metric_totals(text, ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"))
    assert totals == {"vllm:num_requests_running": 3.0, "vllm:kv_cache_usage_perc": 0.25}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("minutes", 0, "--minutes must be positive"), ("concurrency", 0, "--concurrency must be >= 1")],
)
def test_soak_config_refuses_bad_values(field, value, message):
    with pytest.raises(ConfigError, match=message):
        SoakConfig("http://127.0.0.1:1", **{field: value})
