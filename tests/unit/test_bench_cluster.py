"""`afd bench cluster` with alternating rounds: which round each row reports, and its min-max."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.cluster import ClusterBenchConfig, ClusterRound, summarize


def _round(rate: float, tpot: float = 10.0) -> ClusterRound:
    serve = {"output_throughput": rate, "mean_ttft_ms": 50.0, "mean_tpot_ms": tpot}
    return ClusterRound(serve, {"round_trip_ms": 1.0, "wait_ms": 0.5, "hidden_share": 0.5})


def test_each_round_divides_by_its_own_engine_and_the_median_round_is_reported() -> None:
    config = ClusterBenchConfig(Path("model"), ffn=1, microbatches=(1, 2), threads=2, repeats=3)
    engine = [100.0, 200.0, 150.0]
    rounds = {
        1: [_round(80.0, tpot=11.0), _round(120.0), _round(135.0)],  # ratios 0.8, 0.6, 0.9
        2: [_round(40.0), _round(200.0, tpot=22.0), _round(150.0)],  # ratios 0.4, 1.0, 1.0
    }
    engine_row, m1, m2 = summarize(config, engine, rounds)

    assert engine_row.output_tok_s == 150.0 and engine_row.output_tok_s_range == (100.0, 200.0)
    # m=1: the median ratio is round 0's 0.8 (not 135 / 150 of the median engine, nor a mean of the rounds)
    assert (m1.output_tok_s, m1.ratio_vs_engine, m1.mean_tpot_ms) == (80.0, 0.8, 11.0)
    assert m1.ratio_range == (0.6, 0.9) and m1.output_tok_s_range == (80.0, 135.0)
    # m=2: the median (low) ratio 1.0 is first reached in round 1, whose m=1 gives "vs m=1"
    assert (m2.output_tok_s, m2.ratio_vs_engine, m2.mean_tpot_ms) == (200.0, 1.0, 22.0)
    assert m2.gain_vs_m1 == round(200.0 / 120.0, 3)
    assert m2.ratio_range == (0.4, 1.0)
    assert m1.setup.endswith("1 FFN processes, 2 threads each")


def test_one_round_reports_that_round() -> None:
    config = ClusterBenchConfig(Path("model"), ffn=2, microbatches=(1,))
    engine_row, m1 = summarize(config, [250.0], {1: [_round(200.0)]})
    assert (m1.output_tok_s, m1.ratio_vs_engine, m1.gain_vs_m1) == (200.0, 0.8, 1.0)
    assert m1.ratio_range == (0.8, 0.8) and engine_row.output_tok_s == 250.0
    assert m1.setup == "cluster: router + 1 attention + 2 FFN processes"


def test_repeats_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        ClusterBenchConfig(Path("model"), repeats=0)
