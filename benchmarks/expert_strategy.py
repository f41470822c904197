"""`python -m benchmarks.expert_strategy`: decode step time of each CPU expert strategy, in one process.

StackedExperts on CPU either loops over the busy experts (one matrix-vector product each, reading only
their weights) or runs one padded `bmm` over every local expert (streaming faster, reading them all);
"auto" switches at PADDED_MIN_BUSY_SHARE of the experts busy. This runs the engine benchmark's model at
the given batch sizes with each strategy forced, trials interleaved so a slow spell of a shared machine
hits all alike, and prints the mean decode step time per strategy, with the ratio to "auto" (the baseline).
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from afd.sampling_params import SamplingParams
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from benchmarks.engine import _prompts, ensure_checkpoint
from ffn_nodes.experts import PADDED_MIN_BUSY_SHARE
from ffn_nodes.local_pool import local_ffn_pool

STRATEGIES = ("auto", "looped", "padded")


def _set_strategy(transport: object, strategy: str) -> None:
    for shard in transport.shards.values():  # type: ignore[attr-defined]
        for layer in shard.layers:
            if layer.experts is not None:
                layer.experts.strategy = strategy


def _decode_step_ms(engine: AttentionEngine, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    engine.step()  # prefill
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / max(steps, 1) * 1e3


def main(
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes (repeatable).")] = None,
    trials: Annotated[int, typer.Option(min=1, help="Interleaved trials per strategy.")] = 6,
    new_tokens: Annotated[int, typer.Option(min=2, help="Tokens decoded per trial.")] = 24,
    ffn_shards: Annotated[int, typer.Option(min=1)] = 2,
) -> None:
    model_dir = ensure_checkpoint()
    placement, transport = local_ffn_pool(model_dir, ffn_shards, "bfloat16")
    config = EngineConfig(dtype="bfloat16", max_num_seqs=64, max_num_batched_tokens=2048)
    engine = AttentionEngine.load(model_dir, transport, placement, config)
    table = Table(title=f"Decode step (ms) per expert strategy; auto = padded from {PADDED_MIN_BUSY_SHARE:.0%} busy")
    for column in ("batch", *STRATEGIES, "looped / auto", "padded / auto"):
        table.add_column(column, justify="right")
    for size in batch or [1, 8, 32]:
        prompts = _prompts(size, 32, engine.spec.vocab_size)
        _decode_step_ms(engine, prompts, 4)  # warm-up
        times: dict[str, list[float]] = {s: [] for s in STRATEGIES}
        for _ in range(trials):
            for strategy in STRATEGIES:
                _set_strategy(transport, strategy)
                times[strategy].append(_decode_step_ms(engine, prompts, new_tokens))
        _set_strategy(transport, "auto")
        means = {s: statistics.mean(t) for s, t in times.items()}
        row = {"batch": size, "trials": trials, "step_ms": {s: round(m, 2) for s, m in means.items()}}
        row["ratio_vs_auto"] = {s: round(means[s] / means["auto"], 3) for s in STRATEGIES}
        print(json.dumps(row))
        table.add_row(
            str(size),
            *(f"{means[s]:.1f}" for s in STRATEGIES),
            f"{means['looped'] / means['auto']:.2f}",
            f"{means['padded'] / means['auto']:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)
