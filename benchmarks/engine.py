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
from afd.devices import DeviceInfo, parse_device, synchronize
from afd.errors import ConfigError
from afd.model_spec import ModelSpec
from afd.sampling_params import SamplingParams
from afd.transport import InProcessTransport
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from benchmarks.references import ReferenceUnavailable, reference_model
from benchmarks.vllm_peer import PeerUnavailable, VllmPeer, resolve_python
from ffn_nodes.local_pool import local_ffn_pool

BENCH_SEED = 7
SETTLE_S = 0.5
"""Pause before each timed run: the side that ran last may still hold the cores (OpenMP runtimes spin-wait
after a parallel region, Intel's for 200 ms by default in vLLM's process), which would tax the next side."""


# The accelerators issue's larger model, a few GB of bf16: hidden 2048, 24 layers, 32/4 heads, 64 experts top-8.
LARGE = {
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 24,
    "num_attention_heads": 32,
    "num_experts": 64,
    "num_experts_per_tok": 8,
}
SIZES = ("mid", "large")


def bench_config(size: str = "mid") -> dict[str, Any]:
    """The issue's mid-size Qwen3-MoE: 8 layers, hidden 1024, 16/4 heads, 32 experts top-4 (or, for "large",
    the GPU benchmark's model of about 5 GB in bf16, see LARGE)."""
    if size not in SIZES:
        raise typer.BadParameter(f"model size must be one of {list(SIZES)}, not {size!r}")
    return _MID | (LARGE if size == "large" else {})


_MID: dict[str, Any] = {
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


def ensure_checkpoint(root: Path | None = None, size: str = "mid") -> Path:
    """Write the benchmark checkpoint once (about 1 GB of bf16; "large" about 5 GB) and reuse it."""
    from safetensors.torch import save_file

    suffix = "" if size == "mid" else f"-{size}"
    directory = (root or cache_root()) / f"bench-qwen3-moe-{BENCH_SEED}{suffix}"
    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = bench_config(size)
    weights = random_qwen3_moe_weights(config, BENCH_SEED, torch.bfloat16)
    save_file(weights, str(directory / "model.safetensors.partial"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(directory / "model.safetensors.partial", directory / "model.safetensors")
    return directory


def read_bandwidth_gbs(size_bytes: int = 1 << 30, repeats: int = 5, device: torch.device | None = None) -> float:
    """Best streaming-read bandwidth (GB/s) over a float32 buffer far larger than the caches, on `device`.

    Two reductions (sum, and a dot product of the buffer with itself) and the faster one counts: both
    only read, and whichever the CPU vectorises better is the closer to what the weights can stream at.
    """
    device = device or torch.device("cpu")
    buffer = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for reduce in (torch.sum, lambda b: torch.dot(b, b)):
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            reduce(buffer)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    del buffer
    return size_bytes / best / 1e9


def copy_bandwidth_gbs(size_bytes: int = 1 << 29, repeats: int = 5, device: torch.device | None = None) -> float:
    """Plain copy bandwidth on `device`, counting bytes read plus bytes written (the GPU roofline's figure)."""
    device = device or torch.device("cpu")
    src = torch.ones(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best / 1e9


@dataclass
class BatchResult:
    batch: int
    engine_tok_s: float
    reference_tok_s: float | None
    """transformers' best total tok/s; None where it cannot run the checkpoint (transformers_skipped says why)."""
    ratio: float | None
    """engine_tok_s / reference_tok_s."""
    engine_decode_tok_s: float
    bytes_per_decode_step: int
    read_bandwidth_gbs: float
    roofline_tok_s: float
    roofline_share: float
    experts_touched_per_layer: float
    engine_tok_s_spread: dict[str, float]
    """min / median / max of the repeats' total tok/s (engine_tok_s is the best)."""
    reference_tok_s_spread: dict[str, float] | None
    vllm_tok_s: float | None = None
    """vLLM-CPU's best total tok/s on the same prompts (`--peer vllm`), None without the peer."""
    vllm_tok_s_spread: dict[str, float] | None = None
    ratio_vs_vllm: float | None = None
    """engine_tok_s / vllm_tok_s."""
    vllm_same_leading_tokens: int | None = None
    """Leading generated tokens of the first prompt on which vLLM and the engine agree (bf16 on both:
    different summation orders may part them after a while; 0 would mean a different model)."""


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
) -> tuple[float, float, float, list[int]]:
    """Total seconds, decode-only tokens/s, mean distinct experts per layer per decode step, and the first
    prompt's generated tokens."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    first = engine.add_request(prompts[0], params)
    for prompt in prompts[1:]:
        engine.add_request(prompt, params)
    first_tokens: list[int] = []
    start = time.perf_counter()
    outputs = engine.step()  # prefill (the whole batch fits the token budget)
    decode_start = time.perf_counter()
    touched_before = _experts_hit(transport)
    steps = 0
    while engine.has_unfinished():
        first_tokens += [t for out in outputs if out.request_id == first for t in out.new_token_ids]
        outputs = engine.step()
        steps += 1
    end = time.perf_counter()
    first_tokens += [t for out in outputs if out.request_id == first for t in out.new_token_ids]
    touched = (_experts_hit(transport) - touched_before) / max(1, steps * engine.spec.num_layers)
    return end - start, len(prompts) * steps / (end - decode_start), touched, first_tokens


def _spread(values: list[float]) -> dict[str, float]:
    """min / median / max of per-repeat figures, rounded for the JSON line."""
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


def _shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


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
    all_attention = layers * attention
    if spec.linear_attention is not None:
        # MiniMax lightning layers read qkv, output gate, norm and output projections, and per request a
        # [heads, d, d] state (read and written), instead of q/k/v/o and a KV cache that grows with the context.
        linear = len(spec.linear_attention.layers)
        lightning = hidden * 3 * q + hidden * q + q * hidden + q + 2 * hidden
        all_attention = (layers - linear) * attention + linear * lightning
        kv_cache = batch * (context * spec.kv_entry_width * (layers - linear) + 2 * linear * q * spec.head_dim)
    return int((all_attention + ffn + head + kv_cache) * itemsize)


def run(
    batches: list[int],
    prompt_len: int,
    new_tokens: int,
    ffn_shards: int,
    checkpoint: Path | None,
    repeats: int,
    peer: VllmPeer | None = None,
    device: str = "cpu",
    ffn_device: str | None = None,
) -> tuple[list[BatchResult], dict[str, Any]]:
    """Each batch size: warm-up, then `repeats` rounds of engine, transformers (benchmarks/references.py; skipped,
    with the reason in the context's transformers_skipped, where transformers cannot run the checkpoint) and (if
    given) the vLLM peer. `device` / `ffn_device`: the attention half's and the FFN shards' (the latter defaults
    to the former); transformers runs on `device`. On an accelerator the roofline divides by its measured copy
    bandwidth, on a CPU by the read bandwidth (what decode streams at)."""
    import transformers

    model_dir = checkpoint or ensure_checkpoint()
    spec = ModelSpec.from_pretrained(model_dir)
    compute = parse_device(device)
    accelerator = compute.type != "cpu"
    copy_gbs = copy_bandwidth_gbs(device=compute)
    bandwidth = copy_gbs if accelerator else read_bandwidth_gbs()
    max_batch = max(batches)
    config = EngineConfig(
        dtype="bfloat16",
        max_num_seqs=max_batch,
        max_num_batched_tokens=max(2048, max_batch * prompt_len),
        device=device,
        kv_cache_gib=4.0 if accelerator else 1.0,
    )
    placement, transport = local_ffn_pool(
        model_dir, ffn_shards, "bfloat16", device=ffn_device or device, attention_device=device
    )
    # The reference loads first: the engine's load changes the process's heap thresholds (afd.host_memory), and
    # transformers' weights then land where they would in a process of its own; both sides' activations share them.
    reference: Any = None
    try:
        reference = reference_model(model_dir, torch.bfloat16).to(compute)
        skipped: dict[str, Any] = {}
    except ReferenceUnavailable as exc:
        skipped = {"transformers_skipped": str(exc)}
    engine = AttentionEngine.load(model_dir, transport, placement, config)
    results = []
    for batch in batches:
        prompts = _prompts(batch, prompt_len, spec.vocab_size)
        ids = torch.tensor(prompts, device=compute)
        _run_engine(engine, transport, prompts, 4)  # warm-up
        with torch.inference_mode():
            if reference is not None:
                reference.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        if peer is not None:
            peer.generate(prompts, 4)  # warm-up
        # The sides alternate within each repeat, so a slow spell of a shared machine hits all of them alike.
        runs, reference_s, peer_s = [], [], []
        peer_tokens: list[int] = []
        for _ in range(repeats):
            time.sleep(SETTLE_S)
            runs.append(_run_engine(engine, transport, prompts, new_tokens))
            if reference is not None:
                time.sleep(SETTLE_S)
                with torch.inference_mode():
                    start = time.perf_counter()
                    out = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
                    synchronize(compute)
                    reference_s.append(time.perf_counter() - start)
                assert out.shape[1] == prompt_len + new_tokens
            if peer is not None:
                time.sleep(SETTLE_S)
                seconds, made, peer_tokens = peer.generate(prompts, new_tokens)
                assert made == batch * new_tokens, f"vLLM made {made} tokens, expected {batch * new_tokens}"
                peer_s.append(seconds)
        engine_s = min(r[0] for r in runs)
        decode_tok_s = max(r[1] for r in runs)
        touched = statistics.mean(r[2] for r in runs)
        tokens = batch * new_tokens
        step_bytes = _bytes_per_decode_step(spec, batch, prompt_len + new_tokens // 2, touched, 2)
        roofline = batch / (step_bytes / (bandwidth * 1e9))
        vllm_tok_s = round(tokens / min(peer_s), 2) if peer_s else None
        results.append(
            BatchResult(
                batch=batch,
                engine_tok_s=round(tokens / engine_s, 2),
                reference_tok_s=round(tokens / min(reference_s), 2) if reference_s else None,
                ratio=round(min(reference_s) / engine_s, 3) if reference_s else None,
                engine_decode_tok_s=round(decode_tok_s, 2),
                bytes_per_decode_step=step_bytes,
                read_bandwidth_gbs=round(bandwidth, 2),
                roofline_tok_s=round(roofline, 2),
                roofline_share=round(decode_tok_s / roofline, 3),
                experts_touched_per_layer=round(touched, 2),
                engine_tok_s_spread=_spread([tokens / r[0] for r in runs]),
                reference_tok_s_spread=_spread([tokens / s for s in reference_s]) if reference_s else None,
                vllm_tok_s=vllm_tok_s,
                vllm_tok_s_spread=_spread([tokens / s for s in peer_s]) if peer_s else None,
                ratio_vs_vllm=round(min(peer_s) / engine_s, 3) if peer_s else None,
                vllm_same_leading_tokens=_shared_prefix(runs[-1][3], peer_tokens) if peer_s else None,
            )
        )
        gc.collect()
    context = {
        "model": str(model_dir),
        "dtype": "bfloat16",
        "device": DeviceInfo.of(compute).name,
        "ffn_device": DeviceInfo.of(parse_device(ffn_device or device)).name,
        "roofline_bandwidth": "copy" if accelerator else "read",
        "ffn_shards": ffn_shards,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "torch_threads": torch.get_num_threads(),
        "copy_bandwidth_gbs": round(copy_gbs, 2),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    } | skipped
    return results, context


def _start_peer(
    peer: str, python: str | None, preload: bool, model_dir: Path, max_batch: int, max_len: int
) -> tuple[VllmPeer | None, dict[str, Any]]:
    """The vLLM peer if asked for and runnable here, with what the JSON says about it (or why it is absent)."""
    if peer == "none":
        return None, {}
    if peer != "vllm":
        raise typer.BadParameter(f"unknown peer {peer!r}; the one peer is vllm", param_hint="--peer")
    try:
        started = VllmPeer(resolve_python(python), model_dir, "bfloat16", max_batch, max_len, preload)
    except PeerUnavailable as exc:
        return None, {"vllm_skipped": str(exc)}
    return started, {"vllm": started.version, "vllm_preload": started.preloaded}


def _kernels_context() -> dict[str, Any]:
    from afd import host_memory
    from afd.kernels import native, tuning

    return {
        "native_kernels": native.describe(),
        "linear_forms": tuning.choices(),
        "host_malloc": host_memory.describe(),
    }


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
    peer: Annotated[str, typer.Option(help="Also run this engine alternating with ours: none or vllm.")] = "none",
    peer_python: Annotated[
        str | None, typer.Option(help="Interpreter of the vLLM virtualenv (default: $AFD_VLLM_PYTHON).")
    ] = None,
    peer_preload: Annotated[
        bool, typer.Option(help="LD_PRELOAD tcmalloc and the venv's libiomp5 for vLLM, as vLLM recommends.")
    ] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Only JSON lines, one per batch size.")] = False,
    device: Annotated[str, typer.Option(help="Attention half's and transformers' device: cpu, cuda, cuda:N.")] = "cpu",
    ffn_device: Annotated[str | None, typer.Option(help="Device of the FFN shards; --device if omitted.")] = None,
    model_size: Annotated[str, typer.Option(help="Built-in random model: mid (~1 GB) or large (~5 GB, GPUs).")] = "mid",
) -> None:
    """AFD engine vs transformers generate (and vLLM-CPU with --peer vllm) in bf16, with a bandwidth roofline."""
    batches = batch or [1, 8, 32]
    try:
        parse_device(device)
        if ffn_device is not None:
            parse_device(ffn_device)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from exc
    model_dir = checkpoint or ensure_checkpoint(size=model_size)
    started, peer_context = _start_peer(
        peer, peer_python, peer_preload, model_dir, max(batches), prompt_len + new_tokens + 16
    )
    if "vllm_skipped" in peer_context:
        print(f"vLLM peer skipped: {peer_context['vllm_skipped']}")
    try:
        results, context = run(
            batches, prompt_len, new_tokens, ffn_shards, model_dir, repeats, started, device, ffn_device
        )
    finally:
        if started is not None:
            started.close()
    context |= peer_context | _kernels_context()
    for result in results:
        print(json.dumps(asdict(result) | context))
    if json_output:
        return
    if "transformers_skipped" in context:
        print(f"transformers column skipped: {context['transformers_skipped']}")
    with_peer = started is not None
    title = f"AFD engine vs transformers{' and vLLM-CPU' if with_peer else ''} ({context['dtype']}, "
    table = Table(title=title + f"{ffn_shards} FFN shards, in-process; tok/s median \\[min-max] of {repeats})")
    columns = ["batch", "engine tok/s", "transformers tok/s", "vs tf"]
    columns += ["vLLM tok/s", "vs vLLM"] if with_peer else []
    columns += ["roofline tok/s", "share"]
    for column in columns:
        table.add_column(column, justify="right")

    def spread(s: dict[str, float] | None) -> str:
        return f"{s['median']:.1f} \\[{s['min']:.1f}-{s['max']:.1f}]" if s else "-"

    for r in results:
        row = [str(r.batch), spread(r.engine_tok_s_spread), spread(r.reference_tok_s_spread)]
        row += [f"{r.ratio:.2f}x" if r.ratio is not None else "-"]
        row += [spread(r.vllm_tok_s_spread), f"{r.ratio_vs_vllm:.2f}x" if r.ratio_vs_vllm else "-"] if with_peer else []
        row += [f"{r.roofline_tok_s:.1f}", f"{r.roofline_share:.0%}"]
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(
        f"read bandwidth {results[0].read_bandwidth_gbs} GB/s (reduction), copy {context['copy_bandwidth_gbs']} GB/s "
        "(read + write); roofline = batch / (bytes per decode step / read bandwidth); "
        f"native kernels: {context['native_kernels']}"
    )
