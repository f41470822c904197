"""`afd bench cluster`: the disaggregated cluster against the single-process engine, in one run.

The same random requests (token ids, fixed input/output lengths, greedy, a concurrency cap) go to
1. the single-process engine (1 attention half + N FFN shards behind the in-process transport), and
2. a cluster of separate processes (router, attention node, N FFN nodes) through `afd bench serve`,
   once per microbatch count m.
It reports output tokens/s of each, the cluster/engine ratio and the gain of m > 1 over m = 1. The
cluster is started by a launcher the CLI passes in, so this module does not depend on orchestration.

With `repeats` > 1 the sides alternate - engine, every m, engine, every m, ... - because a shared host's
speed drifts by tens of percent within minutes: each round's ratio compares figures taken minutes apart at
most, and the report gives the median round with the min and max over rounds.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from afd.sampling_params import SamplingParams
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from benchmarks.serve import ServeBenchmarkConfig, run_serve_benchmark
from benchmarks.serve_cluster import exchange_fields, settled_exchange_totals
from ffn_nodes.local_pool import local_ffn_pool

#: Starts a cluster with m microbatches and yields its API base URL (http://host:port), stopping it on exit.
ClusterStarter = Callable[[int], AbstractContextManager[str]]


@dataclass(frozen=True)
class ClusterBenchConfig:
    model: Path
    """Checkpoint both sides serve."""
    ffn: int = 2
    """FFN nodes (cluster) / FFN shards (engine)."""
    num_prompts: int = 32
    input_len: int = 32
    output_len: int = 32
    concurrency: int = 8
    """Requests in flight (cluster) and max_num_seqs (engine)."""
    microbatches: tuple[int, ...] = (1, 2, 3)
    dtype: str = "auto"
    seed: int = 0
    threads: int | None = None
    """torch threads of each cluster process (None: the launcher's cores / nodes); the engine keeps torch's
    default (every core)."""
    repeats: int = 1
    """Rounds of engine + every m, alternating the sides."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")


@dataclass
class Row:
    setup: str
    microbatches: int | None
    output_tok_s: float
    ratio_vs_engine: float
    gain_vs_m1: float | None
    mean_ttft_ms: float | None
    mean_tpot_ms: float | None
    round_trip_ms: float | None = None
    """Mean attention->FFN->attention exchange of one layer and microbatch, dispatch to combine (router metrics)."""
    wait_ms: float | None = None
    """Mean time the attention node was blocked in that exchange's combine: the part the pipeline did not hide."""
    hidden_share: float | None = None
    """1 - wait / round trip: the share of the exchanges the microbatch wavefront hid behind attention compute."""
    output_tok_s_range: tuple[float, float] | None = None
    """Min and max output tok/s over the rounds (output_tok_s, TTFT, TPOT and the exchange are the median round's)."""
    ratio_range: tuple[float, float] | None = None
    """Min and max over the rounds of that round's cluster / engine ratio (ratio_vs_engine: the median round's)."""


def _prompts(config: ClusterBenchConfig, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(config.seed)
    return rng.integers(0, min(vocab, 1000), size=(config.num_prompts, config.input_len)).tolist()


def load_engine(config: ClusterBenchConfig, prompts: list[list[int]]) -> AttentionEngine:
    """The single-process side, loaded once for every round and warmed up."""
    placement, transport = local_ffn_pool(config.model, config.ffn, config.dtype)
    engine = AttentionEngine.load(
        config.model,
        transport,
        placement,
        EngineConfig(dtype=config.dtype, max_num_seqs=config.concurrency),  # type: ignore[arg-type]
    )
    engine.generate(prompts[: config.concurrency], SamplingParams(max_tokens=2, temperature=0.0))
    return engine


def engine_tokens_per_s(engine: AttentionEngine, config: ClusterBenchConfig, prompts: list[list[int]]) -> float:
    params = SamplingParams(max_tokens=config.output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o) for o in outputs) / elapsed


WIRES = ("auto", "fp8")
"""The wire precisions whose bytes per token per layer the report shows (auto = the model dtype)."""


def wire_bytes_per_token_layer(config: ClusterBenchConfig, prompts: list[list[int]]) -> dict[str, float]:
    """Attention->FFN bytes per token per layer (hidden states, scales, expert ids and weights, summed over
    the FFN nodes a token goes to) of a short in-process run with each wire precision, as the runner counts
    them (the frame payload; the msgpack header and envelope are not included)."""
    out = {}
    for wire in WIRES:
        placement, transport = local_ffn_pool(config.model, config.ffn, config.dtype)
        engine = AttentionEngine.load(
            config.model,
            transport,
            placement,
            EngineConfig(dtype=config.dtype, max_num_seqs=config.concurrency, wire_dtype=wire),  # type: ignore[arg-type]
        )
        engine.generate(prompts[: config.concurrency], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
        stats = engine.runner.transfers
        out[wire] = round(sum(stats.bytes_sent_totals) / max(1, sum(stats.token_totals)), 1)
    return out


@dataclass(frozen=True)
class ClusterRound:
    """One cluster measurement: `afd bench serve`'s result and the router's exchange fields over it."""

    serve: dict[str, Any]
    exchange: dict[str, float | None]


def run(config: ClusterBenchConfig, start_cluster: ClusterStarter, vocab: int) -> tuple[list[Row], dict[str, Any]]:
    prompts = _prompts(config, vocab)
    engine = load_engine(config, prompts)
    wire_bytes = wire_bytes_per_token_layer(config, prompts)
    engine_rates: list[float] = []
    rounds: dict[int, list[ClusterRound]] = {m: [] for m in config.microbatches}
    for _ in range(config.repeats):
        engine_rates.append(engine_tokens_per_s(engine, config, prompts))
        for m in config.microbatches:
            rounds[m].append(_measure_cluster(config, start_cluster, vocab, m))
    context = {"model": str(config.model), **{k: v for k, v in asdict(config).items() if k != "model"}}
    context["wire_bytes_per_token_layer"] = wire_bytes  # {"auto": model dtype, "fp8": e4m3 + scales}
    context["engine_tok_s_rounds"] = [round(rate, 2) for rate in engine_rates]
    return summarize(config, engine_rates, rounds), context


def _measure_cluster(config: ClusterBenchConfig, start_cluster: ClusterStarter, vocab: int, m: int) -> ClusterRound:
    with start_cluster(m) as base_url:
        serve = ServeBenchmarkConfig(
            base_url=base_url,
            num_prompts=config.num_prompts,
            max_concurrency=config.concurrency,
            random_input_len=config.input_len,
            random_output_len=config.output_len,
            seed=config.seed,
            vocab_size=min(vocab, 1000),
            temperature=0.0,
        )
        run_serve_benchmark(ServeBenchmarkConfig(**{**asdict(serve), "num_prompts": config.concurrency}))
        before = settled_exchange_totals(base_url)
        result = run_serve_benchmark(serve)
        exchange = exchange_fields(before, settled_exchange_totals(base_url, before))
    if result["failed"]:
        raise RuntimeError(f"{result['failed']} requests failed with m={m}: {result['errors'][:3]}")
    return ClusterRound(result, exchange)


def summarize(
    config: ClusterBenchConfig, engine_rates: list[float], rounds: dict[int, list[ClusterRound]]
) -> list[Row]:
    """The report's rows: per setup the median round (by its cluster / engine ratio), with min and max.

    engine_rates[i] and rounds[m][i] are round i's; every m's ratios divide by the engine of their own round,
    and "vs m=1" divides by m=1 of the same round too."""
    engine = statistics.median(engine_rates)
    rows = [
        Row(
            "single-process engine",
            None,
            round(engine, 2),
            1.0,
            None,
            None,
            None,
            output_tok_s_range=(round(min(engine_rates), 2), round(max(engine_rates), 2)),
        )
    ]
    for m, measured in rounds.items():
        rates = [r.serve["output_throughput"] for r in measured]
        ratios = [rate / engine_rates[i] for i, rate in enumerate(rates)]
        median_round = ratios.index(statistics.median_low(ratios))
        chosen = measured[median_round]
        base = rounds[1][median_round].serve["output_throughput"] if 1 in rounds else None
        rows.append(
            Row(
                f"cluster: router + 1 attention + {config.ffn} FFN processes"
                + (f", {config.threads} threads each" if config.threads else ""),
                m,
                round(rates[median_round], 2),
                round(ratios[median_round], 3),
                round(rates[median_round] / base, 3) if base else None,
                round(chosen.serve["mean_ttft_ms"], 2),
                round(chosen.serve["mean_tpot_ms"], 2),
                **chosen.exchange,  # type: ignore[arg-type]
                output_tok_s_range=(round(min(rates), 2), round(max(rates), 2)),
                ratio_range=(round(min(ratios), 3), round(max(ratios), 3)),
            )
        )
    return rows


def _span(bounds: tuple[float, float] | None, spec: str) -> str:
    return "" if bounds is None else f" ({bounds[0]:{spec}}-{bounds[1]:{spec}})"


def report(rows: list[Row], context: dict[str, Any], json_only: bool) -> None:
    for row in rows:
        print(json.dumps(context | asdict(row)))  # the row's own microbatch count wins over the configured list
    if json_only:
        return
    many = context.get("repeats", 1) > 1
    rounds = f"; median of {context['repeats']} alternating rounds (min-max)" if many else ""
    table = Table(
        title=f"Cluster vs single-process engine ({context['num_prompts']} requests, "
        f"{context['input_len']} in / {context['output_len']} out, concurrency {context['concurrency']}{rounds})"
    )
    columns = ("setup", "m", "output tok/s", "vs engine", "vs m=1", "TTFT ms", "TPOT ms", "A-F-A ms", "wait ms")
    for column in columns:
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.setup,
            str(r.microbatches or "-"),
            f"{r.output_tok_s:.1f}" + (_span(r.output_tok_s_range, ".1f") if many else ""),
            f"{r.ratio_vs_engine:.2f}x" + (_span(r.ratio_range, ".2f") if many else ""),
            f"{r.gain_vs_m1:.2f}x" if r.gain_vs_m1 else "-",
            str(r.mean_ttft_ms or "-"),
            str(r.mean_tpot_ms or "-"),
            str(r.round_trip_ms or "-"),
            "-" if r.wait_ms is None or r.hidden_share is None else f"{r.wait_ms} ({r.hidden_share:.0%} hidden)",
        )
    Console().print(table)
    wire = context.get("wire_bytes_per_token_layer")
    if wire:
        figures = ", ".join(f"{name} {value:g}" for name, value in wire.items())
        Console().print(f"attention->FFN bytes per token per layer: {figures}")
    hops = context.get("exchange_hops")
    if hops:
        from benchmarks.exchange_trace import table as hop_table

        Console().print(hop_table(hops))
