"""Where a decode step's time goes: wall clock around each kernel entry point of the engine, per step.

`python -m benchmarks.step_split --batch 32 [--ffn-shards 1]` runs the `afd bench engine` checkpoint (mid-size
Qwen3-MoE, bf16) in process, decodes `--new-tokens` tokens for `--batch` prompts of 32 tokens after a warm-up,
and wraps afd.kernels' entry points as the model code calls them: `linear` per weight shape, the fused routed
experts, decode attention. What is left of the step ("rest") is the small torch ops and Python between them.
Prints one JSON line and a table. The wrappers add a perf_counter pair per call (well under a microsecond),
so the step is a little slower than under `afd bench engine`.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

import afd.kernels as kernels
import attn_nodes.attention as attention_module
import attn_nodes.model as model_module
import attn_nodes.moe_gate as gate_module
import ffn_nodes.experts as experts_module
from afd.sampling_params import SamplingParams
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from benchmarks.engine import _prompts, ensure_checkpoint
from ffn_nodes.local_pool import local_ffn_pool

PROMPT_LEN = 32


class KernelClock:
    """Seconds per component, added while `on`; wraps a module attribute in place (this process only)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.on = False

    def wrap(self, module: Any, name: str, label: Callable[[tuple[Any, ...]], str]) -> None:
        inner = getattr(module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return inner(*args, **kwargs)
            start = time.perf_counter()
            result = inner(*args, **kwargs)
            self.seconds[label(args)] += time.perf_counter() - start
            return result

        setattr(module, name, timed)


def measure(batch: int, ffn_shards: int, new_tokens: int) -> dict[str, Any]:
    model_dir = ensure_checkpoint()
    placement, transport = local_ffn_pool(model_dir, ffn_shards, "bfloat16")
    config = EngineConfig(dtype="bfloat16", max_num_seqs=max(64, batch), max_num_batched_tokens=4096)
    engine = AttentionEngine.load(model_dir, transport, placement, config)
    clock = KernelClock()
    for module in (attention_module, model_module, gate_module, experts_module):
        clock.wrap(module, "linear", lambda args: f"linear {tuple(args[1].shape)}")
    clock.wrap(experts_module, "routed_experts_swiglu", lambda _: "fused experts")
    clock.wrap(attention_module.kernels, "paged_decode_attention", lambda _: "decode attention")
    assert attention_module.kernels is kernels

    def decode(tokens: int, timed: bool) -> tuple[float, int]:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        for prompt in _prompts(batch, PROMPT_LEN, engine.spec.vocab_size):
            engine.add_request(prompt, params)
        engine.step()  # prefill, not counted
        clock.on = timed
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        clock.on = False
        return time.perf_counter() - start, steps

    decode(4, False)
    decode(new_tokens, False)  # the linear forms are measured at first use: keep that out of the timed run
    elapsed, steps = decode(new_tokens, True)
    per_step = {name: round(1e3 * s / steps, 3) for name, s in clock.seconds.most_common()}
    per_step["rest (small torch ops, Python)"] = round(1e3 * (elapsed - sum(clock.seconds.values())) / steps, 3)
    return {
        "batch": batch,
        "ffn_shards": ffn_shards,
        "steps": steps,
        "ms_per_step": round(1e3 * elapsed / steps, 3),
        "decode_tok_s": round(batch * steps / elapsed, 2),
        "ms_per_step_by_component": per_step,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_split", description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--ffn-shards", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    result = measure(args.batch, args.ffn_shards, args.new_tokens)
    print(json.dumps(result))
    table = Table(title=f"decode step, batch {args.batch}: {result['ms_per_step']} ms ({result['decode_tok_s']} tok/s)")
    table.add_column("component")
    table.add_column("ms per step", justify="right")
    for name, ms in result["ms_per_step_by_component"].items():
        table.add_row(name, f"{ms:.2f}")
    Console().print(table)
    return result


if __name__ == "__main__":
    main()
