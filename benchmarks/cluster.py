"""`afd bench cluster`: the disaggregated cluster against the single-process engine, in one run.

The same random requests (token ids, fixed input/output lengths, greedy, a concurrency cap) go to
1. the single-process engine (1 attention half + N FFN shards behind the in-process transport), and
2. a cluster of separate processes (router, attention node, N FFN nodes) through `afd bench serve`,
   once per microbatch count m.
It reports output tokens/s of each, the cluster/engine ratio and the gain of m > 1 over m = 1. The
cluster is started by a launcher the CLI passes in, so this module does not depend on orchestration.
"""

from __future__ import annotations

import json
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


def _prompts(config: ClusterBenchConfig, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(config.seed)
    return rng.integers(0, min(vocab, 1000), size=(config.num_prompts, config.input_len)).tolist()


def engine_tokens_per_s(config: ClusterBenchConfig, prompts: list[list[int]]) -> float:
    placement, transport = local_ffn_pool(config.model, config.ffn, config.dtype)
    engine = AttentionEngine.load(
        config.model,
        transport,
        placement,
        EngineConfig(dtype=config.dtype, max_num_seqs=config.concurrency),  # type: ignore[arg-type]
    )
    params = SamplingParams(max_tokens=config.output_len, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[: config.concurrency], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
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


def run(config: ClusterBenchConfig, start_cluster: ClusterStarter, vocab: int) -> tuple[list[Row], dict[str, Any]]:
    prompts = _prompts(config, vocab)
    engine_rate = engine_tokens_per_s(config, prompts)
    wire_bytes = wire_bytes_per_token_layer(config, prompts)
    rows = [Row("single-process engine", None, round(engine_rate, 2), 1.0, None, None, None)]
    results: dict[int, dict[str, Any]] = {}
    exchanges: dict[int, dict[str, float | None]] = {}
    for m in config.microbatches:
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
            results[m] = run_serve_benchmark(serve)
            exchanges[m] = exchange_fields(before, settled_exchange_totals(base_url, before))
        if results[m]["failed"]:
            raise RuntimeError(f"{results[m]['failed']} requests failed with m={m}: {results[m]['errors'][:3]}")
    base = results.get(1, {}).get("output_throughput")
    for m, result in results.items():
        rate = result["output_throughput"]
        rows.append(
            Row(
                f"cluster: router + 1 attention + {config.ffn} FFN processes",
                m,
                round(rate, 2),
                round(rate / engine_rate, 3),
                round(rate / base, 3) if base else None,
                round(result["mean_ttft_ms"], 2),
                round(result["mean_tpot_ms"], 2),
                **exchanges[m],  # type: ignore[arg-type]
            )
        )
    context = {"model": str(config.model), **{k: v for k, v in asdict(config).items() if k != "model"}}
    context["wire_bytes_per_token_layer"] = wire_bytes  # {"auto": model dtype, "fp8": e4m3 + scales}
    return rows, context


def report(rows: list[Row], context: dict[str, Any], json_only: bool) -> None:
    for row in rows:
        print(json.dumps(context | asdict(row)))  # the row's own microbatch count wins over the configured list
    if json_only:
        return
    table = Table(
        title=f"Cluster vs single-process engine ({context['num_prompts']} requests, "
        f"{context['input_len']} in / {context['output_len']} out, concurrency {context['concurrency']})"
    )
    for column in ("setup", "m", "output tok/s", "vs engine", "vs m=1", "TTFT ms", "TPOT ms", "A-F-A ms", "wait ms"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r.setup,
            str(r.microbatches or "-"),
            f"{r.output_tok_s:.1f}",
            f"{r.ratio_vs_engine:.2f}x",
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
