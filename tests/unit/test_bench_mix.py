"""`afd bench mix` without a testbed: the mixes file is validated with the bad field named, the result JSON
carries every `afd bench serve` field plus the mix, prediction, measurement and errors, the calibration mix's
fit is the arithmetic its docstring states, and the report and plots are written."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from afd.builtin_model import _config
from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.planning import CpuQuota, predict
from benchmarks import mix as bench_mix
from benchmarks.mix import (
    HostCalibration,
    MixMeasurement,
    MixSpec,
    RunningMix,
    fit_background_cores,
    fit_fanout,
    fit_ffn_line,
    fit_host,
    load_mixes,
    markdown_report,
    measure_mix,
    planner_mix,
    predict_mix,
    run_mixes,
    write_plots,
)
from benchmarks.serve import ServeBenchmarkConfig, _result_header
from benchmarks.serve_metrics import RequestOutput, compute_metrics

MIXES_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "mixes"
ONE = {"count": 1}
MIX = {
    "name": "a1f2",
    "attention": {"count": 1, "cpu": 1.0},
    "ffn": {"count": 2, "cpu": 0.5, "threads": 1},
    "link_mbit": 100,
    "batch_per_attention_node": 2,
}


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "mixes.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_config(1000)))
    return directory


# ---- the mixes file ---------------------------------------------------------------------------------------
def test_the_shipped_mixes_files_are_valid_and_the_big_one_covers_what_the_issue_asks():
    smoke = load_mixes(MIXES_DIR / "smoke.yaml")
    assert len(smoke.mixes) == 2
    full = load_mixes(MIXES_DIR / "cpu-2core.yaml")
    assert len(full.mixes) >= 6
    assert {m.af_ratio for m in full.mixes} >= {"1:1", "1:2", "2:1"}
    assert len({m.link_mbit for m in full.mixes}) >= 2
    assert len({(m.attention.cpu, m.ffn.cpu) for m in full.mixes}) >= 3
    assert {m.microbatches for m in full.mixes} >= {1, 2}
    assert full.calibration_mix is not None  # the default reference mix
    # issue 11's link-bound comparisons: m = 1 against 2 and the bf16 against the fp8 wire, on one capped link
    link = load_mixes(MIXES_DIR / "link-bound.yaml")
    assert len({m.link_mbit for m in link.mixes}) == 1 and None not in {m.link_mbit for m in link.mixes}
    assert {(m.microbatches, m.wire_dtype) for m in link.mixes} >= {(1, "bf16"), (2, "bf16"), (1, "fp8"), (2, "fp8")}


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["mixes"][0]["attention"].update(cpux=1), r"mixes\.0\.attention\.cpux: unknown field"),
        (lambda d: d["mixes"][0]["ffn"].update(cpu=-0.5), r"mixes\.0\.ffn\.cpu: Input should be greater than 0"),
        (lambda d: d["mixes"][0].update(microbatches=0), r"mixes\.0\.microbatches: Input should be greater"),
        (lambda d: d["mixes"][0].update(link_mbit=0), r"mixes\.0\.link_mbit"),
        (lambda d: d["mixes"][0].update(wire_dtype="fp4"), r"mixes\.0\.wire_dtype: Input should be 'auto', 'bf16'"),
        (lambda d: d["mixes"][0].update(name="a b"), r"mixes\.0\.name: String should match pattern"),
        (lambda d: d["mixes"][0].pop("ffn"), r"mixes\.0\.ffn: Field required"),
        (lambda d: d["mixes"].append(dict(MIX)), r"mix names must be unique; repeated: a1f2"),
        (lambda d: d.update(mixes=[]), r"mixes: List should have at least 1 item"),
        (lambda d: d.update(version=2), r"version: Input should be 1"),
        (
            lambda d: d.update(fanout_calibration_mix={**MIX, "name": "f", "ffn": {"count": 3}, "attention": ONE}),
            r"fanout calibration mix must have 1 attention and 2 FFN nodes",
        ),
        (lambda d: d.update(workload={"output_len": 1}), r"workload\.output_len"),
        (
            lambda d: d.update(calibration_mix={**MIX, "name": "ref"}),
            r"calibration mix must have 1 attention and 1 FFN node, no CPU limit",
        ),
    ],
)
def test_a_bad_mixes_file_is_refused_with_the_field_named(tmp_path, mutate, expected):
    data = {"version": 1, "mixes": [json.loads(json.dumps(MIX))]}
    mutate(data)
    with pytest.raises(ConfigError, match=expected):
        load_mixes(_write(tmp_path, data))


def test_unreadable_and_malformed_files_say_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot read mixes file"):
        load_mixes(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_mixes(_write(tmp_path, "mixes: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_mixes(_write(tmp_path, "- 1\n- 2\n"))


def test_a_relative_model_path_is_read_from_the_files_directory(tmp_path):
    mixes = load_mixes(_write(tmp_path, {"model": "model", "mixes": [MIX]}))
    assert mixes.model == str((tmp_path / "model").resolve())


# ---- prediction inputs ------------------------------------------------------------------------------------
VIEW = {
    "nodes": [
        {"node_id": "router", "role": "router", "measured_us": {}},
        {"node_id": "attn-0", "role": "attention", "device_kind": "cpu (1 threads)", "state": "ready",
         "measured_us": {"per_token": 30.0, "at_context_len": 128}},
        {"node_id": "ffn-0", "role": "ffn", "device_kind": "cpu (1 threads)", "state": "ready",
         "measured_us": {"per_token_expert": 5.0}, "busy_fraction": 0.25},
        {"node_id": "ffn-1", "role": "ffn", "device_kind": "cpu (1 threads)", "state": "ready",
         "measured_us": {"per_token_expert": 6.0}, "busy_fraction": 0.35},
    ]
}  # fmt: skip


def test_the_planner_mix_carries_the_nodes_profiles_quotas_link_and_host_costs(tmp_path, monkeypatch):
    mixes = load_mixes(_write(tmp_path, {"mixes": [MIX], "workload": {"input_len": 16, "output_len": 48}}))
    spec = ModelSpec.from_config(_config(1000))
    host = HostCalibration(100.0, 20.0, 50.0, "test")
    mix = planner_mix(mixes.mixes[0], mixes, spec, VIEW, host)
    assert (mix.attention_count, mix.ffn_count, mix.microbatches, mix.batch_per_attention_node) == (1, 2, 1, 2)
    assert [m.us_per_token for m in mix.attention_measured] == [30.0]
    assert mix.attention_measured[0].context_len == 128
    assert [m.us_per_token_expert for m in mix.ffn_measured] == [5.0, 6.0]
    assert mix.attention_quota == CpuQuota(1.0, 1) and mix.ffn_quota == CpuQuota(0.5, 1)
    assert not isinstance(mix.link, str)
    assert mix.link.bandwidth_bytes_per_s == pytest.approx(100e6 / 8) and mix.link.latency_us == 50.0
    assert mix.context_len == 16 + 24
    assert mix.activation_bytes == 4.0  # the demo model computes in float32
    assert mix.dispatch_activation_bytes == 4.0  # wire "auto": the model dtype both ways
    for wire, out_bytes in (("bf16", 2.0), ("fp8", 1.0 + 4.0 / spec.hidden_size)):  # fp8: + the token's scale
        narrowed = MixSpec.model_validate({**MIX, "wire_dtype": wire})
        assert planner_mix(narrowed, mixes, spec, VIEW, host).dispatch_activation_bytes == pytest.approx(out_bytes)
    # every node shares this host's cores with the router and the client, which take 0.002 core-seconds per
    # output token: at 250 tok/s half a core of 3
    assert not mix.overlap and mix.shared_cores == (os.cpu_count() or 1)  # host has no shared cost
    monkeypatch.setattr(bench_mix.os, "cpu_count", lambda: 3)
    sharing = replace(host, shared_cpu_s_per_token=0.002)
    assert planner_mix(mixes.mixes[0], mixes, spec, VIEW, sharing, tok_s=250.0).shared_cores == pytest.approx(2.5)
    assert planner_mix(mixes.mixes[0], mixes, spec, VIEW, sharing, tok_s=1e6).shared_cores == bench_mix.MIN_NODE_CORES
    assert (mix.attention_call_us, mix.ffn_call_us) == (100.0, 20.0)
    # a 1250-byte token bucket at 100 Mbit/s (12.5 MB/s) passes 100 us of each message at once
    slower = HostCalibration(100.0, 20.0, 500.0, "test")
    assert planner_mix(mixes.mixes[0], mixes, spec, VIEW, slower, 1250).link.latency_us == pytest.approx(400.0)
    assert planner_mix(mixes.mixes[0], mixes, spec, VIEW, host, 1250).link.latency_us == 0.0  # never below 0
    unlimited = MixSpec.model_validate({**MIX, "attention": {"count": 2}})
    mix = planner_mix(unlimited, mixes, spec, VIEW, host)
    assert not mix.overlap and mix.attention_quota is None  # an unlimited pool shares the cores
    assert mix.shared_cores == 3.0
    assert mix.ffn_call_us == 40.0  # each FFN node answers a frame of each of the 2 attention nodes


# ---- a whole run with a fake launcher ---------------------------------------------------------------------
def _serve_result(config: ServeBenchmarkConfig) -> dict[str, Any]:
    """What run_serve_benchmark returns: TTFT 20 ms, then a token every 10 ms (TPOT 10 ms)."""
    outputs = [
        RequestOutput(
            prompt_len=config.random_input_len, success=True, output_tokens=config.random_output_len, ttft=0.02,
            itl=[0.01] * (config.random_output_len - 1), latency=0.02 + 0.01 * (config.random_output_len - 1),
            start_time=0.0,
        )
        for _ in range(config.num_prompts)
    ]  # fmt: skip
    duration = 0.5
    result = _result_header(config, "fake-model", "20260101-000000", 1000) | {"duration": duration}
    result |= compute_metrics(outputs, duration, config.metric_percentiles)
    return result | {
        "topology": None,
        "per_role_tokens_per_s": None,
        "ffn_busy_fraction": None,
        "hardware": {"client_cpu": "x"},
    }


class FakeHost:
    """A launcher whose nodes' CPU counters advance by fixed amounts per reading and a clock of 2 s per run."""

    def __init__(self) -> None:
        self.launched: list[str] = []
        self.open = 0

    @contextmanager
    def launch(self, model_dir: Path, spec: MixSpec) -> Iterator[RunningMix]:
        self.launched.append(spec.name)
        self.open += 1
        readings = {"n": 0}

        def usage() -> dict[str, int]:
            readings["n"] += 1
            n = readings["n"]  # attention 0.4 cores, FFN 0.45 cores, router 0.05 over the 2 s of a run
            return {
                "attn-0": int(0.8e9 * n),
                "ffn-0": int(0.9e9 * n),
                "ffn-1": int(0.9e9 * n),
                "router": int(0.1e9 * n),
            }

        def throttling() -> dict[str, dict[str, int]]:
            return {"attn-0": {"nr_periods": 10 * readings["n"], "nr_throttled": readings["n"], "throttled_time": 0}}

        def exchanges(previous: Mapping[str, float] | None) -> dict[str, float]:
            # each reading after a run adds 100 exchanges of 2 ms, 0.5 ms of it blocked in combine
            n = 0 if previous is None else previous["round_trips"] / 100
            return {"round_trips": 100 * (n + 1), "seconds": 0.2 * (n + 1), "wait_seconds": 0.05 * (n + 1)}

        try:
            yield RunningMix("http://127.0.0.1:1", lambda: VIEW, usage, throttling, exchange_totals=exchanges)
        finally:
            self.open -= 1


@pytest.fixture
def fake_serving(monkeypatch):
    ticks = iter(range(0, 10_000, 2))
    monkeypatch.setattr(bench_mix.time, "monotonic", lambda: float(next(ticks)))
    monkeypatch.setattr(bench_mix, "run_serve_benchmark", _serve_result)
    # the client (this process) takes 0.4 s of CPU per 2 s run: 0.2 cores
    cpu_ticks = iter(range(0, 10**15, 400_000_000))
    monkeypatch.setattr(bench_mix.time, "process_time_ns", lambda: next(cpu_ticks))


def test_result_json_is_a_superset_of_bench_serve_with_the_mix_prediction_and_errors(tmp_path, fake_serving):
    data = {"model": "model", "mixes": [MIX, {**MIX, "name": "a1f2-m2", "microbatches": 2}]}
    _model_dir(tmp_path)
    mixes = load_mixes(_write(tmp_path, data))
    host = FakeHost()
    result = json.loads(json.dumps(run_mixes(mixes, host.launch)))  # JSON-clean
    # the calibration mix ran once more on the mixes' 100 Mbit/s cap before them, and again after them
    assert host.launched == [
        "calibration", "calibration-fanout", "calibration-link-100m", "a1f2", "a1f2-m2", "calibration"
    ]  # fmt: skip
    assert host.open == 0
    assert result["version"] == 1 and result["failed_mixes"] == []
    serve_fields = set(_serve_result(ServeBenchmarkConfig(base_url="http://x", num_prompts=2)))
    for row in result["mixes"]:
        assert serve_fields <= set(row)
        assert row["mean_tpot_ms"] == pytest.approx(10.0) and row["max_concurrency"] == 2
        assert row["num_prompts"] == 3 * 2  # requests_per_slot x concurrency
        assert row["attention"] == {"kind": "cpu", "count": 1, "cpu_limit_cores": 1.0, "threads": 1,
                                    "device_kind": ["cpu (1 threads)"], "addresses": ["None"],
                                    "measured_us": [{"per_token": 30.0, "at_context_len": 128}],
                                    "measured_us_at_start": [{"per_token": 30.0, "at_context_len": 128}]}  # fmt: skip
        assert row["ffn"]["count"] == 2 and row["ffn"]["cpu_limit_cores"] == 0.5
        assert row["af_ratio"] == "1:2" and row["accelerators"] == 3 and row["link_mbit"] == 100
        measured = row["measured"]
        assert measured["decode_tok_s"] == pytest.approx(2 * 1000 / 10.0)  # concurrency / TPOT
        assert measured["runs_tpot_ms"] == pytest.approx([10.0, 10.0, 10.0])  # 3 timed runs, the best kept
        assert measured["tok_s_per_accelerator"] == pytest.approx(200 / 3)
        assert measured["busy"]["attention"]["mean_cores"] == pytest.approx(0.4)
        assert measured["busy"]["ffn"] == {"mean_cores": 0.45, "max_cores": 0.45, "nodes": 2}
        assert measured["busy"]["client"]["mean_cores"] == pytest.approx(0.2)  # this process's CPU time
        assert measured["ffn_busy_fraction"] == {"ffn-0": 0.25, "ffn-1": 0.35}
        assert measured["cpu_throttling"]["attn-0"] == {"nr_periods": 10, "nr_throttled": 1, "throttled_time": 0}
        assert measured["exchange"] == {"round_trip_ms": 2.0, "wait_ms": 0.5, "hidden_share": 0.75}
        assert row["wire_dtype"] == "auto"
        predicted = row["predicted"]
        assert (
            predicted["attention"] == {"kind": "cpu", "count": 1} and predicted["microbatches"] == row["microbatches"]
        )
        error = row["error"]["decode_tok_s"]
        assert error == pytest.approx((predicted["decode_tok_s"] - 200.0) / 200.0, rel=1e-3)
        assert row["error"]["tpot_ms"] == pytest.approx((predicted["tpot_ms"] - 10.0) / 10.0, rel=1e-3)
    fitted = result["host_calibration"]
    assert result["calibration"]["fitted"] == fitted
    assert result["calibration"]["fanout_run"]["ffn"]["count"] == 2
    assert fitted["attention_call_us"] > 0 and "calibration mix calibration" in fitted["source"]
    # the same CPU times and TPOT on the cap: the residual less the cap's bytes / rate, over 2 x 4 layers
    on_cap = fitted["link_latency_us_by_mbit"]["100"]
    assert 0 <= on_cap < fitted["link_latency_us"]
    assert [run["mix"] for run in result["calibration"]["link_runs"]] == ["calibration-link-100m"]
    assert all("latency fitted on it" in row["predicted"]["basis"]["link"] for row in result["mixes"])
    summary = result["summary"]
    assert summary["mixes"] == 2 and summary["planner_top_mix"] in ("a1f2", "a1f2-m2")
    assert summary["best_measured_mix"] in ("a1f2", "a1f2-m2")
    assert result["calibration"]["recheck_run"]["mix"] == "calibration"
    assert summary["calibration_drift_decode_tok_s"] == pytest.approx(0.0)  # the fake host does not drift

    plots = write_plots(result, tmp_path / "plots")
    assert [p.name for p in plots] == ["measured_vs_predicted.png", "pareto.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    report = markdown_report(result, plots, tmp_path / "report.md")
    assert "| a1f2 | 1 x 1 cpu/1t | 2 x 0.5 cpu/1t | 1 | auto | 100 | 2 |" in report
    assert "| 0.50 / 2.00 (75% hidden) |" in report
    assert "| 10.00 | +0 % |" in report  # measured TPOT, then its three runs' spread (the fake host's are equal)
    assert "](plots/pareto.png)" in report and "Within 15 %" in report
    assert f"{on_cap:.1f} us on the 100 Mbit/s cap" in report

    host = FakeHost()
    off = run_mixes(
        load_mixes(_write(tmp_path, {**data, "link_calibration": False, "recheck_calibration": False})), host.launch
    )
    assert host.launched == ["calibration", "calibration-fanout", "a1f2", "a1f2-m2"]
    assert "recheck_run" not in off["calibration"] and off["summary"]["calibration_drift_decode_tok_s"] is None


def test_the_calibration_mix_run_again_after_the_mixes_says_how_far_the_host_drifted(
    tmp_path, fake_serving, monkeypatch
):
    _model_dir(tmp_path)
    host = FakeHost()

    def slower_at_the_end(config: ServeBenchmarkConfig) -> dict[str, Any]:
        result = _serve_result(config)
        if host.launched.count("calibration") == 2:  # the recheck: TPOT 12.5 ms instead of 10
            result["mean_tpot_ms"] = 12.5
        return result

    monkeypatch.setattr(bench_mix, "run_serve_benchmark", slower_at_the_end)
    data = {"model": "model", "mixes": [MIX], "link_calibration": False}
    result = run_mixes(load_mixes(_write(tmp_path, data)), host.launch)
    assert host.launched == ["calibration", "calibration-fanout", "a1f2", "calibration"]
    assert result["calibration"]["run"]["measured"]["tpot_ms"] == pytest.approx(10.0)
    assert result["calibration"]["recheck_run"]["measured"]["tpot_ms"] == pytest.approx(12.5)
    # the host calibration rests on the first run only
    assert result["host_calibration"] == result["calibration"]["fitted"]
    drift = result["summary"]["calibration_drift_decode_tok_s"]
    assert drift == pytest.approx(10.0 / 12.5 - 1.0)  # decode tok/s = concurrency / TPOT: 20 % fewer
    report = markdown_report(result, [], tmp_path / "report.md")
    assert "run again after the mixes, measured -20.0 % decode tok/s against the run the fit rests on" in report
    assert bench_mix._spread([10.0, 12.5, 11.0]) == "+25 %" and bench_mix._spread([10.0]) == "-"


def test_the_calibration_fit_is_the_stated_arithmetic(tmp_path, fake_serving):
    _model_dir(tmp_path)
    mixes = load_mixes(_write(tmp_path, {"model": "model", "mixes": [MIX]}))
    reference = mixes.calibration_mix
    assert reference is not None
    spec = ModelSpec.from_config(_config(1000))
    measured = measure_mix(reference, mixes, tmp_path / "model", FakeHost().launch, lambda _: None)
    host = fit_host(reference, measured, mixes, spec)
    base = predict(spec, planner_mix(reference, mixes, spec, VIEW, HostCalibration(0, 0, 0, "")))
    step = 10_000.0  # µs: TPOT 10 ms
    cpu_a, cpu_f = 0.4 * step, 0.45 * step  # cores busy x step
    assert cpu_a > base.attention_us and cpu_f > base.ffn_us and step > cpu_a + cpu_f + base.link_us
    assert host.attention_call_us == pytest.approx((cpu_a - base.attention_us) / 4)  # 4 layers
    assert host.ffn_call_us == pytest.approx((cpu_f - base.ffn_us) / 4)
    assert host.link_latency_us == pytest.approx((step - cpu_a - cpu_f - base.link_us) / 8)
    # the router's 0.05 and the client's 0.2 cores over the run's output tokens per second
    output_tok_s = measured.serve["output_throughput"]
    assert output_tok_s > 0
    assert host.shared_cpu_s_per_token == pytest.approx(0.25 / output_tok_s)
    # with those costs the calibration mix itself is predicted at its measured TPOT (overlap off, m = 1)
    again = predict(spec, planner_mix(reference, mixes, spec, VIEW, host))
    assert again.tpot_ms == pytest.approx(10.0, rel=1e-6)


def test_a_mix_is_predicted_at_the_rate_it_predicts_for_itself(tmp_path, monkeypatch):
    m2 = {**MIX, "microbatches": 2, "batch_per_attention_node": 8, "ffn": {"count": 1, "cpu": 1.0}}
    mixes = load_mixes(_write(tmp_path, {"mixes": [m2], "workload": {"input_len": 16, "output_len": 48}}))
    spec = ModelSpec.from_config(_config(1000))
    monkeypatch.setattr(bench_mix.os, "cpu_count", lambda: 2)
    host = HostCalibration(3000.0, 3000.0, 50.0, "test")
    alone = predict_mix(mixes.mixes[0], mixes, spec, VIEW, host)
    assert alone.mix.shared_cores == 2.0  # nothing else takes the cores
    sharing = replace(host, shared_cpu_s_per_token=0.004)
    p = predict_mix(mixes.mixes[0], mixes, spec, VIEW, sharing)
    # the router and the client take 0.004 core-seconds per token at the rate predicted, and that rate is
    # what the nodes reach on the cores they leave
    assert p.mix.shared_cores == pytest.approx(2.0 - 0.004 * p.decode_tok_s, rel=1e-6)
    assert p.decode_tok_s < alone.decode_tok_s
    again = predict(spec, planner_mix(mixes.mixes[0], mixes, spec, VIEW, sharing, tok_s=p.decode_tok_s))
    assert again.decode_tok_s == pytest.approx(p.decode_tok_s, rel=1e-6)


def test_a_failing_mix_is_reported_and_the_rest_still_run(tmp_path, fake_serving, monkeypatch):
    _model_dir(tmp_path)
    mixes = load_mixes(
        _write(tmp_path, {"model": "model", "calibration_mix": None, "mixes": [MIX, {**MIX, "name": "ok"}]})
    )
    host = FakeHost()

    @contextmanager
    def launch(model_dir: Path, spec: MixSpec) -> Iterator[RunningMix]:
        if spec.name == "a1f2":
            raise bench_mix.AfdError("attn-0 exited with 1")
        with host.launch(model_dir, spec) as running:
            yield running

    result = run_mixes(mixes, launch)
    assert result["failed_mixes"] == [{"mix": "a1f2", "error": "attn-0 exited with 1"}]
    assert [r["mix"] for r in result["mixes"]] == ["ok"]
    assert result["calibration"] is None and result["host_calibration"]["link_latency_us"] == 160.0


def test_the_least_disturbed_of_the_timed_runs_is_kept(tmp_path, fake_serving, monkeypatch):
    _model_dir(tmp_path)
    mixes = load_mixes(_write(tmp_path, {"model": "model", "calibration_mix": None, "mixes": [MIX]}))
    itls = iter([0.005, 0.03, 0.01, 0.02])  # warm-up, then three timed runs: TPOT 30, 10, 20 ms

    def serve(config: ServeBenchmarkConfig) -> dict[str, Any]:
        itl = next(itls)
        n = config.random_output_len
        outputs = [
            RequestOutput(prompt_len=8, success=True, output_tokens=n, ttft=0.02, itl=[itl] * (n - 1),
                          latency=0.02 + itl * (n - 1))
            for _ in range(config.num_prompts)
        ]  # fmt: skip
        return _result_header(config, "m", "d", 1000) | {"duration": 1.0} | compute_metrics(outputs, 1.0, (99.0,))

    monkeypatch.setattr(bench_mix, "run_serve_benchmark", serve)
    row = run_mixes(mixes, FakeHost().launch)["mixes"][0]
    assert row["measured"]["runs_tpot_ms"] == pytest.approx([30.0, 10.0, 20.0])
    assert row["mean_tpot_ms"] == pytest.approx(10.0) and row["measured"]["tpot_ms"] == pytest.approx(10.0)


def test_the_fanout_calibration_splits_the_attention_call_cost_by_ffn_nodes(tmp_path):
    mixes = load_mixes(_write(tmp_path, {"mixes": [MIX]}))
    spec = ModelSpec.from_config(_config(1000))
    assert mixes.calibration_mix is not None and mixes.fanout_calibration_mix is not None

    def measured(attention: float, ffn: float) -> MixMeasurement:  # TPOT 10 ms, cores busy per role
        busy = {"attention": {"mean_cores": attention}, "ffn": {"mean_cores": ffn}}
        return MixMeasurement({"mean_tpot_ms": 10.0}, VIEW, busy, {}, {})

    one, two = measured(0.4, 0.45), measured(0.6, 0.4)
    zero = HostCalibration(0, 0, 0, "")
    base_one = predict(spec, planner_mix(mixes.calibration_mix, mixes, spec, VIEW, zero))
    base_two = predict(spec, planner_mix(mixes.fanout_calibration_mix, mixes, spec, VIEW, zero))
    host = fit_fanout(fit_host(mixes.calibration_mix, one, mixes, spec), mixes.fanout_calibration_mix, two, mixes, spec)
    c1 = (4000 - base_one.attention_us) / 4  # a + b: one FFN node
    c2 = (6000 - base_two.attention_us) / 4  # a + 2b: two
    assert host.attention_call_per_ffn_node_us == pytest.approx(c2 - c1)
    assert host.attention_call_us == pytest.approx(2 * c1 - c2)
    # an FFN node's CPU time per layer, call + scale x kernels, through both runs' points (1125 and 1000 µs)
    k_one, k_two = base_one.ffn_us / 4, base_two.ffn_us / 4
    assert k_two < k_one  # two nodes hold half the experts each
    scale = (1125 - 1000) / (k_one - k_two)
    assert host.ffn_kernel_scale == pytest.approx(scale)
    assert host.ffn_call_us == pytest.approx(1125 - scale * k_one)
    assert host.ffn_call_us + scale * k_two == pytest.approx(1000)
    # so the planner predicts each calibration run's FFN CPU time per layer as measured
    for calibration, per_layer in ((mixes.calibration_mix, 1125), (mixes.fanout_calibration_mix, 1000)):
        again = predict(spec, planner_mix(calibration, mixes, spec, VIEW, host))
        assert again.ffn_us / 4 == pytest.approx(per_layer)
    # the planner's Mix takes a + b x FFN nodes
    assert planner_mix(MixSpec.model_validate(MIX), mixes, spec, VIEW, host).attention_call_us == pytest.approx(c2)


def test_background_cores_are_the_cpu_that_grows_with_the_step_and_leave_the_call_costs(tmp_path):
    """One shape on two links: the compute per step is the same, so what a node's CPU time per step gains with
    the longer step is what its other threads take meanwhile; the per-call costs are fitted without it."""

    def run(tpot_ms: float, cpu_a_ms: float, cpu_f_ms: float) -> MixMeasurement:
        busy = {"attention": {"mean_cores": cpu_a_ms / tpot_ms}, "ffn": {"mean_cores": cpu_f_ms / tpot_ms}}
        return MixMeasurement({"mean_tpot_ms": tpot_ms}, VIEW, busy, {}, {})

    uncapped, capped = run(20.0, 11.0, 9.0), run(50.0, 14.0, 13.5)
    attention, ffn = fit_background_cores([uncapped, capped])
    assert (attention, ffn) == (pytest.approx(0.1), pytest.approx(0.15))
    assert fit_background_cores([uncapped]) == (0.0, 0.0)  # one step length: nothing to tell apart
    assert fit_background_cores([uncapped, run(22.0, 11.5, 9.2)]) == (0.0, 0.0)  # within 20 %
    assert fit_background_cores([uncapped, run(50.0, 9.0, 8.0)]) == (0.0, 0.0)  # CPU fell: no background
    mixes = load_mixes(_write(tmp_path, {"mixes": [MIX]}))
    spec = ModelSpec.from_config(_config(1000))
    assert mixes.calibration_mix is not None and not mixes.fit_background  # off unless a mixes file asks
    without = fit_host(mixes.calibration_mix, uncapped, mixes, spec)
    host = fit_host(mixes.calibration_mix, uncapped, mixes, spec, (attention, ffn))
    layers = spec.num_layers
    # 0.1 core x 20 ms = 2 ms of the attention node's 11 ms is not its calls; the link takes up what they left
    assert without.attention_call_us - host.attention_call_us == pytest.approx(2000 / layers)
    assert without.ffn_call_us - host.ffn_call_us == pytest.approx(3000 / layers)
    assert host.link_latency_us > without.link_latency_us
    assert (host.attention_background_cores, host.ffn_background_cores) == (pytest.approx(0.1), pytest.approx(0.15))
    mix = planner_mix(MixSpec.model_validate(MIX), mixes, spec, VIEW, host)
    assert (mix.attention_background_cores, mix.ffn_background_cores) == (pytest.approx(0.1), pytest.approx(0.15))


def test_the_ffn_line_fit_keeps_both_costs_non_negative():
    assert fit_ffn_line(()) == (0.0, 1.0)
    assert fit_ffn_line(((300.0, 1000.0),)) == (700.0, 1.0)  # one run: the start-up timings as they are
    assert fit_ffn_line(((300.0, 200.0),)) == (0.0, 1.0)
    call, scale = fit_ffn_line(((300.0, 1000.0), (150.0, 925.0)))  # exact through both
    assert (call, scale) == (pytest.approx(850.0), pytest.approx(0.5))
    # the CPU time rises as the kernels halve: none of it is the kernels'
    assert fit_ffn_line(((300.0, 1000.0), (150.0, 1100.0))) == (pytest.approx(1050.0), 0.0)
    # the line would cross below zero: through the origin instead
    call, scale = fit_ffn_line(((300.0, 900.0), (150.0, 300.0)))
    assert call == 0.0 and scale == pytest.approx((300 * 900 + 150 * 300) / (300**2 + 150**2))


def test_rounds_run_the_whole_list_again_and_each_mix_keeps_its_best_round(tmp_path, fake_serving, monkeypatch):
    _model_dir(tmp_path)
    host = FakeHost()
    other = {**MIX, "name": "other"}
    flaky = {**MIX, "name": "flaky"}

    def by_round(config: ServeBenchmarkConfig) -> dict[str, Any]:
        result = _serve_result(config)
        name, round_ = host.launched[-1], host.launched.count(host.launched[-1])
        if name == "a1f2" and round_ == 1:  # a busy spell in a1f2's first round
            result["mean_tpot_ms"] = 12.5
        # every timed run of "other" fails outright, and those of "flaky" in its first round
        if (name == "other" or (name == "flaky" and round_ == 1)) and config.num_prompts > 2:
            result["completed"] = 0
            result["errors"] = ["boom"]
        return result

    monkeypatch.setattr(bench_mix, "run_serve_benchmark", by_round)
    data = {"model": "model", "mixes": [MIX, other, flaky], "link_calibration": False, "rounds": 2}
    result = run_mixes(load_mixes(_write(tmp_path, data)), host.launch)
    one_round = ["calibration", "calibration-fanout", "a1f2", "other", "flaky"]
    assert host.launched == [*one_round, *one_round, "calibration"]  # the sides alternate, then the recheck
    assert host.open == 0
    row, kept = result["mixes"]
    assert row["mix"] == "a1f2" and row["measured"]["tpot_ms"] == pytest.approx(10.0)  # the second round's
    assert row["measured"]["runs_tpot_ms"] == pytest.approx([12.5] * 3 + [10.0] * 3)  # every round's runs
    assert "failed_rounds" not in row
    # a mix that failed one round keeps the other, and says which round failed and why
    assert kept["mix"] == "flaky" and kept["measured"]["runs_tpot_ms"] == pytest.approx([10.0] * 3)
    assert kept["failed_rounds"] == [{"round": 1, "error": "mix flaky: every request failed; first error: boom"}]
    report = markdown_report(result, [], tmp_path / "report.md")
    assert "- flaky, round 1: mix flaky: every request failed; first error: boom" in report
    assert "- other: mix other: every request failed" in report
    assert result["failed_mixes"] == [{"mix": "other", "error": "mix other: every request failed; first error: boom"}]
    with pytest.raises(ConfigError, match="rounds: Input should be greater than or equal to 1"):
        load_mixes(_write(tmp_path, {**data, "rounds": 0}))


def test_every_mix_is_predicted_from_the_runs_median_profile_of_its_role_and_threads(tmp_path, fake_serving):
    _model_dir(tmp_path)
    two_threads = {**MIX, "name": "a1-2t", "attention": {"count": 1, "cpu": 2.0, "threads": 2}}
    data = {"model": "model", "mixes": [MIX, two_threads], "link_calibration": False}

    class NoisyStarts(FakeHost):
        """Each launch's attention node profiles at a different per-token figure (a shared host's start-up)."""

        @contextmanager
        def launch(self, model_dir: Path, spec: MixSpec) -> Iterator[RunningMix]:
            with super().launch(model_dir, spec) as running:
                per_token = {"calibration": 20.0, "calibration-fanout": 60.0, "a1f2": 30.0, "a1-2t": 15.0}
                if self.launched.count("calibration") == 2:  # the recheck
                    per_token["calibration"] = 40.0
                nodes = [dict(n) for n in VIEW["nodes"]]
                nodes[1]["measured_us"] = {"per_token": per_token[spec.name], "at_context_len": 128}
                yield replace(running, cluster_view=lambda: {"nodes": nodes})

    result = run_mixes(load_mixes(_write(tmp_path, data)), NoisyStarts().launch)
    rows = {r["mix"]: r for r in result["mixes"]}
    # 1-thread attention nodes: launches at 20, 60, 30 and 40 us per token -> 35; the 2-thread pool only its own
    assert rows["a1f2"]["attention"]["measured_us"] == [{"per_token": 35.0, "at_context_len": 128}]
    assert rows["a1f2"]["attention"]["measured_us_at_start"] == [{"per_token": 30.0, "at_context_len": 128}]
    assert rows["a1-2t"]["attention"]["measured_us"] == [{"per_token": 15.0, "at_context_len": 128}]
    assert result["calibration"]["run"]["attention"]["measured_us"] == [{"per_token": 35.0, "at_context_len": 128}]
    # FFN nodes: 5 and 6 us per token-expert pair at every launch -> 5.5 for each
    assert rows["a1f2"]["ffn"]["measured_us"] == [{"per_token_expert": 5.5}, {"per_token_expert": 5.5}]

    own = run_mixes(load_mixes(_write(tmp_path, {**data, "pool_profiles": False})), NoisyStarts().launch)
    assert own["mixes"][0]["attention"]["measured_us"] == [{"per_token": 30.0, "at_context_len": 128}]
    assert own["mixes"][0]["predicted"]["decode_tok_s"] != rows["a1f2"]["predicted"]["decode_tok_s"]
