"""`afd generate`: offline batch generation through the AFD engine in one process.

One attention half and N FFN shards behind the in-process transport — the smallest complete AFD
deployment, and the default main job (built-in checkpoint, no download).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from afd.builtin_model import DEMO_PROMPTS, builtin_model_dir
from afd.errors import AfdError
from afd.sampling_params import SamplingParams
from afd.tokenizer import Tokenizer
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from ffn_nodes.local_pool import local_ffn_pool


def generate(
    model: Annotated[
        Path | None, typer.Option(help="HF checkpoint directory; the built-in demo model if omitted.")
    ] = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option(help="Prompt text (repeatable); space-separated token ids when the model has no tokenizer."),
    ] = None,
    ffn_shards: Annotated[int, typer.Option(min=1, help="FFN shards (expert-parallel) in this process.")] = 2,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per prompt.")] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Top-k filter; 0 disables.")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus filter.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep generating past end-of-sequence.")] = False,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    microbatches: Annotated[int, typer.Option(min=1, help="Ping-pong microbatches per step.")] = 1,
    device: Annotated[str, typer.Option(help="Attention half's device: cpu, cuda, cuda:N or a torch device.")] = "cpu",
    ffn_device: Annotated[
        str | None, typer.Option(help="FFN shards' device (e.g. cpu beside cuda attention); --device if omitted.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Generate for a batch of prompts with 1 attention half and N FFN shards, and report tokens/s."""
    console = Console()
    try:
        model_dir = model or builtin_model_dir()
        tokenizer = Tokenizer.from_pretrained(model_dir)
        texts = prompt or (DEMO_PROMPTS if tokenizer else ["1 2 3 4"])
        prompts = [_encode(text, tokenizer) for text in texts]
        config = EngineConfig(dtype=dtype, microbatches=microbatches, device=device)  # type: ignore[arg-type]
        placement, transport = local_ffn_pool(
            model_dir, ffn_shards, dtype, device=ffn_device or device, attention_device=device
        )
        engine = AttentionEngine.load(model_dir, transport, placement, config)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, ignore_eos=ignore_eos
        )
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        elapsed = time.perf_counter() - start
    except AfdError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    generated = sum(len(o) for o in outputs)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "architecture": engine.spec.architecture,
        "ffn_shards": {node: len(ids) for node, ids in zip(placement.nodes, placement.experts, strict=True)},
        "device": str(engine.model.device),
        "ffn_device": ffn_device or device,
        "prompts": len(prompts),
        "generated_tokens": generated,
        "elapsed_s": round(elapsed, 4),
        "tokens_per_s": round(generated / elapsed, 2) if elapsed > 0 else None,
        "outputs": [
            {"prompt": text, "token_ids": ids, "text": tokenizer.decode(ids) if tokenizer else None}
            for text, ids in zip(texts, outputs, strict=True)
        ],
    }
    if json_output:
        print(json.dumps(result))
        return
    table = Table(title=f"AFD generate — {engine.spec.architecture}, 1 attention half + {ffn_shards} FFN shards")
    table.add_column("prompt")
    table.add_column("completion")
    for item in result["outputs"]:
        table.add_row(item["prompt"], item["text"] if item["text"] is not None else str(item["token_ids"]))
    console.print(table)
    console.print(
        f"{len(prompts)} prompts, {generated} tokens in {elapsed:.2f} s: "
        f"[bold]{result['tokens_per_s']} tokens/s[/bold]; experts per FFN shard {result['ffn_shards']}"
    )


def _encode(text: str, tokenizer: Tokenizer | None) -> list[int]:
    if tokenizer is not None:
        return tokenizer.encode(text)
    try:
        return [int(part) for part in text.split()]
    except ValueError:
        raise typer.BadParameter(f"the model has no tokenizer.json; give token ids, not {text!r}") from None
