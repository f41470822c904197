"""`afd bench engine`: the AFD engine (in-process transport) against transformers `generate`, same run.

Both run a mid-size Qwen3-MoE checkpoint (random weights, bf16) on the same prompts at several batch
sizes and decode the same number of tokens. Each row also carries a memory-bandwidth roofline: the
bytes of weights and KV cache a decode step must read, divided by the read bandwidth measured on this
machine in the same run, and the share of it the engine's decode steps reach.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from afd.builtin_model import cache_root, random_qwen3_moe_weights
from afd.model_spec import ModelSpec
from afd.sampling_params import SamplingParams
from afd.transport import InProcessTransport
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from ffn_nodes.local_pool import local_ffn_pool

BENCH_SEED = 7


def bench_config() -> dict[str, Any]:
    """The issue's mid-size Qwen3-MoE: 8 layers, hidden 1024, 16/4 heads, 32 experts top-4."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "num_experts": 32,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "eos_token_id": None,
        "torch_dtype": "bfloat16",
    }


def ensure_checkpoint(root: Path | None = None) -> Path:
    """Write the benchmark checkpoint once (about 1 GB of bf16) and reuse it."""
    from safetensors.torch import save_file

    directory = (root or cache_root()) / f"bench-qwen3-moe-{BENCH_SEED}"
    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = bench_config()
    weights = random_qwen3_moe_weights(config, BENCH_SEED, torch.bfloat16)
    save_file(weights, str(directory / "model.safetensors.partial"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(directory / "model.safetensors.partial", directory / "model.safetensors")
    return directory


def read_bandwidth_gbs(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best streaming-read bandwidth (GB/s) over a float32 buffer far larger than the caches.

    Two reductions (sum, and a dot product of the buffer with itself) and the faster one counts: both
    only read, and whichever the CPU vectorises better is the closer to what the weights can stream at.
    """
    buffer = torch.ones(size_bytes // 4, dtype=torch.float32)
    best = float("inf")
    for reduce in (torch.sum, lambda b: torch.dot(b, b)):
        for _ in range(repeats):
            start = time.perf_counter()
            reduce(buffer)
            best = min(best, time.perf_counter() - start)
    del buffer
    return size_bytes / best / 1e9


def copy_bandwidth_gbs(size_bytes: int = 1 << 29, repeats: int = 5) -> float:
    """Plain copy bandwidth, counting bytes read plus bytes written."""
    src = torch.ones(size_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best / 1e9


@dataclass
class BatchResult:
    batch: int
    engine_tok_s: float
    reference_tok_s: float
    ratio: float
    engine_decode_tok_s: float
    bytes_per_decode_step: int
    read_bandwidth_gbs: float
    roofline_tok_s: float
    roofline_share: float
    experts_touched_per_layer: float


def _prompts(batch: int, prompt_len: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(1, vocab, (batch, prompt_len), generator=g).tolist()


def _experts_hit(transport: InProcessTransport) -> int:
    return sum(
        layer.experts.experts_hit
        for shard in transport.shards.values()
        for layer in shard.layers  # type: ignore[attr-defined]
        if layer.experts is not None
    )


def _run_engine(
    engine: AttentionEngine, transport: InProcessTransport, prompts: list[list[int]], new_tokens: int
) -> tuple[float, float, float]:
    """Total seconds, decode-only tokens/s, and mean distinct experts per layer per decode step."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for prompt in prompts:
        engine.add_request(prompt, params)
    start = time.perf_counter()
    engine.step()  # prefill (the whole batch fits the token budget)
    decode_start = time.perf_counter()
    touched_before = _experts_hit(transport)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    end = time.perf_counter()
    touched = (_experts_hit(transport) - touched_before) / max(1, steps * engine.spec.num_layers)
    return end - start, len(prompts) * steps / (end - decode_start), touched


def _bytes_per_decode_step(spec: ModelSpec, batch: int, context: int, experts_touched: float, itemsize: int) -> int:
    """Weights and KV cache one decode step reads (embeddings: only the batch's rows)."""
    hidden, layers = spec.hidden_size, spec.num_layers
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    attention = hidden * (q + 2 * kv) + q * hidden + 2 * hidden + 2 * spec.head_dim
    # experts_touched is a mean over all layers (dense ones hit no expert): per MoE layer it is larger.
    moe_layers = sum(layer.moe is not None for layer in spec.layers)
    touched_per_moe_layer = experts_touched * layers / max(1, moe_layers)
    ffn = 0.0
    for layer in spec.layers:
        moe = layer.moe
        if moe is None:  # dense MLP (dense models, GLM's and DeepSeek's first layers): read whole
            ffn += 3 * hidden * layer.dense_intermediate_size
        else:
            ffn += moe.num_experts * hidden + touched_per_moe_layer * 3 * hidden * moe.intermediate_size
            ffn += 3 * hidden * moe.shared_intermediate_size
    head = spec.vocab_size * hidden + hidden + batch * hidden
    kv_cache = batch * context * spec.kv_entry_width * layers
    return int((layers * attention + ffn + head + kv_cache) * itemsize)


def run(
    batches: list[int], prompt_len: int, new_tokens: int, ffn_shards: int, checkpoint: Path | None, repeats: int
) -> tuple[list[BatchResult], dict[str, Any]]:
    import transformers

    model_dir = checkpoint or ensure_checkpoint()
    spec = ModelSpec.from_pretrained(model_dir)
    bandwidth = read_bandwidth_gbs()
    copy_gbs = copy_bandwidth_gbs()
    max_batch = max(batches)
    config = EngineConfig(
        dtype="bfloat16", max_num_seqs=max_batch, max_num_batched_tokens=max(2048, max_batch * prompt_len)
    )
    placement, transport = local_ffn_pool(model_dir, ffn_shards, "bfloat16")
    engine = AttentionEngine.load(model_dir, transport, placement, config)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    reference.generation_config.eos_token_id = None
    results = []
    for batch in batches:
        prompts = _prompts(batch, prompt_len, spec.vocab_size)
        ids = torch.tensor(prompts)
        _run_engine(engine, transport, prompts, 4)  # warm-up
        with torch.inference_mode():
            reference.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        # Engine and reference runs alternate, so a slow spell of a shared machine hits both sides alike.
        runs, reference_s = [], float("inf")
        for _ in range(repeats):
            runs.append(_run_engine(engine, transport, prompts, new_tokens))
            with torch.inference_mode():
                start = time.perf_counter()
                out = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                reference_s = min(reference_s, time.perf_counter() - start)
        engine_s = min(r[0] for r in runs)
        decode_tok_s = max(r[1] for r in runs)
        touched = statistics.mean(r[2] for r in runs)
        assert out.shape[1] == prompt_len + new_tokens
        tokens = batch * new_tokens
        step_bytes = _bytes_per_decode_step(spec, batch, prompt_len + new_tokens // 2, touched, 2)
        roofline = batch / (step_bytes / (bandwidth * 1e9))
        results.append(
            BatchResult(
                batch=batch,
                engine_tok_s=round(tokens / engine_s, 2),
                reference_tok_s=round(tokens / reference_s, 2),
                ratio=round(reference_s / engine_s, 3),
                engine_decode_tok_s=round(decode_tok_s, 2),
                bytes_per_decode_step=step_bytes,
                read_bandwidth_gbs=round(bandwidth, 2),
                roofline_tok_s=round(roofline, 2),
                roofline_share=round(decode_tok_s / roofline, 3),
                experts_touched_per_layer=round(touched, 2),
            )
        )
        gc.collect()
    context = {
        "model": str(model_dir),
        "dtype": "bfloat16",
        "ffn_shards": ffn_shards,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "torch_threads": torch.get_num_threads(),
        "copy_bandwidth_gbs": round(copy_gbs, 2),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    return results, context


def command(
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes (repeatable).")] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens per request.")] = 32,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per request.")] = 64,
    ffn_shards: Annotated[int, typer.Option(min=1, help="FFN shards behind the in-process transport.")] = 2,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="Checkpoint of any supported architecture; a random mid-size Qwen3-MoE if omitted."),
    ] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Timed runs per side, alternating; the best is reported.")] = 3,
    json_output: Annotated[bool, typer.Option("--json", help="Only JSON lines, one per batch size.")] = False,
) -> None:
    """AFD engine vs transformers generate on the same Qwen3-MoE in bf16, with a bandwidth roofline."""
    results, context = run(batch or [1, 8, 32], prompt_len, new_tokens, ffn_shards, checkpoint, repeats)
    for result in results:
        print(json.dumps(asdict(result) | context))
    if json_output:
        return
    table = Table(title=f"AFD engine vs transformers ({context['dtype']}, {ffn_shards} FFN shards, in-process)")
    for column in ("batch", "engine tok/s", "transformers tok/s", "ratio", "decode tok/s", "roofline tok/s", "share"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.batch),
            f"{r.engine_tok_s:.1f}",
            f"{r.reference_tok_s:.1f}",
            f"{r.ratio:.2f}x",
            f"{r.engine_decode_tok_s:.1f}",
            f"{r.roofline_tok_s:.1f}",
            f"{r.roofline_share:.0%}",
        )
    console = Console()
    console.print(table)
    console.print(
        f"read bandwidth {results[0].read_bandwidth_gbs} GB/s (reduction), copy {context['copy_bandwidth_gbs']} GB/s "
        "(read + write); roofline = batch / (bytes per decode step / read bandwidth)"
    )
