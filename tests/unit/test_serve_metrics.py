"""`afd bench serve` statistics on synthetic request records, and the --plot figure.

`max_output_tokens_per_s` and `max_concurrent_requests` follow `vllm bench serve`'s calculate_metrics: token
chunks are put in one-second buckets counted from the first successful request's start and the fullest
bucket wins; the peak of requests in flight is an exact sweep over half-open [start, start + latency)
intervals (an end and a start at the same instant do not overlap). Failed requests count in neither.
"""

from __future__ import annotations

import struct

import pytest

from benchmarks.serve_metrics import RequestOutput, compute_metrics
from benchmarks.serve_plot import latency_samples_ms, plot_latency_distributions


def _done(start: float, ttft: float, itl: list[float]) -> RequestOutput:
    return RequestOutput(
        prompt_len=8, success=True, output_tokens=len(itl) + 1, ttft=ttft, itl=itl, latency=ttft + sum(itl),
        start_time=start,
    )  # fmt: skip


def test_peak_output_tokens_per_second_uses_vllms_one_second_buckets():
    outputs = [
        _done(0.0, 0.5, [0.3, 0.3, 0.3]),  # tokens at 0.5 0.8 | 1.1 1.4 -> seconds 0, 0, 1, 1
        _done(1.0, 0.1, [0.05, 0.05, 0.05]),  # 1.1 1.15 1.2 1.25 -> second 1 (x4)
        _done(2.5, 0.2, [0.1]),  # 2.7 2.8 -> second 2 (x2)
        # failed: its 10 chunks in second 1 would make the peak 16
        RequestOutput(prompt_len=8, start_time=1.0, ttft=0.1, itl=[0.01] * 9, latency=0.19, error="HTTP 500"),
    ]
    result = compute_metrics(outputs, duration_s=3.0, percentiles=(99.0,))
    assert result["max_output_tokens_per_s"] == 6.0  # second 1: 2 + 4
    assert result["max_concurrent_requests"] == 2  # [0, 1.4) and [1.0, 1.25) overlap
    assert result["output_throughput"] == pytest.approx(10 / 3.0)  # the average stays below the peak


def test_peak_concurrency_is_an_exact_sweep_over_half_open_intervals():
    touching = [_done(0.0, 0.5, [0.5]), _done(1.0, 0.5, [0.5]), _done(2.0, 0.5, [0.5])]
    assert compute_metrics(touching, 3.0, (50.0,))["max_concurrent_requests"] == 1
    nested = [_done(0.0, 1.0, [1.0, 1.0]), _done(0.5, 0.1, [0.1]), _done(0.6, 0.1, [0.1]), _done(2.9, 0.05, [])]
    assert compute_metrics(nested, 3.0, (50.0,))["max_concurrent_requests"] == 3  # at 0.6: all three before
    assert compute_metrics([], 1.0, (50.0,))["max_concurrent_requests"] == 0
    assert compute_metrics([], 1.0, (50.0,))["max_output_tokens_per_s"] == 0.0


def _result() -> dict:
    outputs = [
        _done(0.0, 0.100, [0.020, 0.030, 0.025]),
        _done(0.2, 0.150, [0.040]),
        RequestOutput(prompt_len=8, start_time=0.3, ttft=0.9, itl=[0.5], error="timeout"),
    ]
    return {"model_id": "m", "request_rate": "inf", "max_concurrency": 2} | compute_metrics(outputs, 1.0, (99.0,))


def test_plot_samples_are_the_successful_requests_in_milliseconds():
    samples = latency_samples_ms(_result())
    assert samples["ttft"] == pytest.approx([100.0, 150.0])
    assert samples["itl"] == pytest.approx([20.0, 30.0, 25.0, 40.0])  # not the failed request's 500 ms


def test_plot_writes_a_png_with_both_distributions(tmp_path):
    path = plot_latency_distributions(_result(), tmp_path / "sub" / "latency.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1100, 400)  # 11 x 4 in at 100 dpi: two panels side by side
