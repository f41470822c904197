"""`afd bench load-memory`: peak resident memory while one node loads its share of a checkpoint.

Each role loads in a fresh subprocess (an attention node, each FFN node of an N-node pool, or all of them in one
process as `afd generate` does) and reports its RSS high-water mark (`VmHWM` of /proc/self/status, reset
just before the load through /proc/self/clear_refs; it counts the checkpoint pages a read touched as well as
the tensors kept) above its RSS just before the load. Not `getrusage`'s ru_maxrss: Linux carries that across
exec, so a child would report its parent's peak. The issue's bound for an fp8 checkpoint: peak <= 1.5 x the
largest shard file + the node's weights in the compute dtype (the bytes the role's reads returned).

Without `--checkpoint` it measures a mid-size random DeepSeek-V3-shaped checkpoint written in the published
fp8 block format (`write_fp8_checkpoint`, also what the tests use to make their fp8 checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from afd.builtin_model import cache_root
from afd.checkpoint import INDEX_FILE, CheckpointReader

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
"""config.json `quantization_config` exactly as DeepSeek-V3 publishes it."""

BENCH_SEED = 11


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[out, in]` float -> (`[out, in] float8_e4m3fn`, `[ceil(out/bm), ceil(in/bn)] float32` weight_scale_inv).

    Per block: scale = 448 / max|w| (1 for an all-zero block), q = w * scale, scale_inv = 1 / scale, the same
    arithmetic as transformers' `Fp8Quantize`; partial edge blocks are zero-padded to a whole block first,
    as DeepSeek's release does, so a dimension need not be a multiple of the block.
    """
    rows, cols = weight.shape
    bm, bn = block
    grid_rows, grid_cols = math.ceil(rows / bm), math.ceil(cols / bn)
    padded = torch.zeros(grid_rows * bm, grid_cols * bn, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(grid_rows, bm, grid_cols, bn)
    max_abs = blocks.abs().amax(dim=(1, 3))
    scales = torch.where(max_abs > 0, FP8_MAX / torch.where(max_abs > 0, max_abs, 1.0), 1.0)
    quantized = (blocks * scales[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    quantized = quantized.view(grid_rows * bm, grid_cols * bn)[:rows, :cols].contiguous()
    return quantized, (1.0 / scales).to(torch.float32)


def is_published_fp8_linear(name: str, tensor: torch.Tensor) -> bool:
    """The weights DeepSeek-V3 / Qwen3 -FP8 store in fp8: every Linear projection; never embeddings, norms,
    the LM head or the MoE gate."""
    return tensor.ndim == 2 and name.endswith(("_proj.weight", "_proj_with_mqa.weight"))


def _source_tensors(source: Path) -> list[tuple[Path, list[str]]]:
    from safetensors import safe_open

    index = source / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        return [(source / f, [n for n, g in weight_map.items() if g == f]) for f in files]
    out = []
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.append((file, list(handle.keys())))
    return out


def write_fp8_checkpoint(
    source: Path, target: Path, block: tuple[int, int] = (128, 128), max_shard_bytes: int = 1 << 30
) -> Path:
    """Rewrite the safetensors checkpoint `source` into `target` in the published fp8 block format.

    Linear weights become `float8_e4m3fn` with `<name>_scale_inv` block scales; everything else is stored
    bf16; shards of at most `max_shard_bytes` with a `model.safetensors.index.json`; config.json gains the
    quantization_config of FP8_QUANTIZATION_CONFIG (with `block`) and `torch_dtype: bfloat16`. Streams one
    source tensor at a time.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    groups: list[list[str]] = []  # tensor names of each shard, in order
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        if pending:
            save_file(pending, str(target / f"part-{len(groups)}.safetensors"), metadata={"format": "pt"})
            groups.append(list(pending))
            pending.clear()

    for file, names in _source_tensors(source):
        with safe_open(str(file), "pt") as handle:
            for name in names:
                tensor = handle.get_tensor(name)
                if is_published_fp8_linear(name, tensor):
                    quantized, scale_inv = quantize_fp8_blocks(tensor, block)
                    out = {name: quantized, name + "_scale_inv": scale_inv}
                else:
                    out = {name: tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor}
                nbytes = sum(t.numel() * t.element_size() for t in out.values())
                if pending and pending_bytes + nbytes > max_shard_bytes:
                    flush()
                    pending_bytes = 0
                pending.update(out)
                pending_bytes += nbytes
    flush()
    weight_map = {}
    for i, names in enumerate(groups):  # the Hub's names, once the shard count is known
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        os.replace(target / f"part-{i}.safetensors", target / shard)
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (target / INDEX_FILE).write_text(json.dumps(index, indent=2))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = FP8_QUANTIZATION_CONFIG | {"weight_block_size": list(block)}
    config["torch_dtype"] = "bfloat16"
    config.pop("dtype", None)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (source / extra).is_file():
            shutil.copy(source / extra, target / extra)
    return target


def bench_fp8_config() -> dict[str, Any]:
    """A mid-size DeepSeek-V3 shape: MLA, 32 routed experts + 1 shared, first layer dense (about 190 M params)."""
    return {
        "vocab_size": 32000,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "moe_intermediate_size": 512,
        "num_hidden_layers": 5,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "n_routed_experts": 32,
        "n_shared_experts": 1,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "q_lora_rank": 384,
        "kv_lora_rank": 256,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "max_position_embeddings": 4096,
    }


def ensure_fp8_checkpoint(root: Path | None = None) -> Path:
    """Write the mid-size random fp8 checkpoint once (about 250 MB in 64 MB shards) and reuse it."""
    import transformers

    directory = (root or cache_root()) / f"bench-deepseek-v3-fp8-{BENCH_SEED}"
    if (directory / INDEX_FILE).is_file():
        return directory
    torch.manual_seed(BENCH_SEED)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.DeepseekV3Config(**bench_fp8_config()), dtype=torch.bfloat16
    )
    with tempfile.TemporaryDirectory() as source:
        model.save_pretrained(source)
        del model
        partial = directory.with_name(directory.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        write_fp8_checkpoint(Path(source), partial, max_shard_bytes=64 << 20)
        os.replace(partial, directory)
    return directory


class _CountingReader(CheckpointReader):
    """A CheckpointReader that adds up the bytes of every tensor it hands out: the node's share of weights."""

    bytes_returned = 0

    def _finish(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        out = super()._finish(name, tensor, shape)
        self.bytes_returned += out.numel() * out.element_size()
        return out


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM")


def _reset_peak_rss() -> None:
    """Start the high-water mark afresh (Linux >= 4.0); without it the peak of imports stays in (conservative)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _child(model_dir: Path, role: str, ffn_nodes: int, dtype_name: str) -> dict[str, Any]:
    """Load `role` here and measure; runs in the subprocess."""
    from afd.dtypes import resolve_dtype
    from afd.model_spec import ModelSpec
    from afd.placement import ExpertPlacement
    from attn_nodes.model import AttentionHalfModel
    from ffn_nodes.shard import FfnShard

    spec = ModelSpec.from_pretrained(model_dir)
    dtype = resolve_dtype(dtype_name, spec.dtype)
    placement = ExpertPlacement.balanced(spec.num_experts, [f"ffn-{i}" for i in range(ffn_nodes)])
    _reset_peak_rss()
    before = _rss_bytes()
    reader = _CountingReader(model_dir, dtype=dtype)
    kept: list[Any] = []
    if role in ("attn", "all"):
        kept.append(AttentionHalfModel.load(model_dir, 64, spec=spec, reader=reader))
    for node in placement.nodes:
        if role in (node, "all"):
            kept.append(FfnShard.load(model_dir, placement, node, spec=spec, reader=reader))
    if not kept:
        raise SystemExit(f"unknown role {role!r}: attn, all or one of {placement.nodes}")
    peak = _peak_rss_bytes()
    return {"rss_before": before, "peak_rss": peak, "weights_bytes": reader.bytes_returned, "dtype": str(dtype)}


@dataclass(frozen=True, slots=True)
class LoadMemoryRow:
    """One role's load: its peak RSS above the RSS before loading, against the issue's bound."""

    role: str
    peak_load_mib: float
    """RSS high-water mark minus RSS just before the load."""
    largest_shard_mib: float
    weights_mib: float
    """The role's tensors in the compute dtype."""
    bound_mib: float
    """1.5 x largest shard + weights."""
    within_bound: bool


def run(model_dir: Path, roles: list[str], ffn_nodes: int, dtype: str, timeout_s: float) -> list[LoadMemoryRow]:
    shard_files = list(model_dir.glob("*.safetensors"))
    if not shard_files:
        raise typer.BadParameter(f"no *.safetensors in {model_dir}")
    largest = max(f.stat().st_size for f in shard_files)
    rows = []
    for role in roles:
        command = [sys.executable, "-m", "benchmarks.load_memory", str(model_dir), role, str(ffn_nodes), dtype]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"loading role {role} failed:\n{done.stderr}")
        m = json.loads(done.stdout.strip().splitlines()[-1])
        peak = m["peak_rss"] - m["rss_before"]
        bound = 1.5 * largest + m["weights_bytes"]
        mib = float(1 << 20)
        rows.append(
            LoadMemoryRow(
                role,
                round(peak / mib, 1),
                round(largest / mib, 1),
                round(m["weights_bytes"] / mib, 1),
                round(bound / mib, 1),
                peak <= bound,
            )
        )
    return rows


def command(
    checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint; a mid-size random DeepSeek-V3-shaped fp8 one if omitted.")
    ] = None,
    ffn: Annotated[int, typer.Option(min=1, help="FFN nodes the experts are spread over.")] = 2,
    role: Annotated[
        list[str] | None, typer.Option(help="attn, ffn-<i> or all (one process); repeatable. Default: every node.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto, float32, bfloat16.")] = "auto",
    timeout_s: Annotated[float, typer.Option(help="Per role.")] = 600.0,
    json_output: Annotated[bool, typer.Option("--json", help="Only JSON lines, one per role.")] = False,
) -> None:
    """Peak RSS of loading each node's share of a checkpoint, against 1.5 x largest shard + the node's weights."""
    model_dir = checkpoint or ensure_fp8_checkpoint()
    rows = run(model_dir, role or ["attn", *(f"ffn-{i}" for i in range(ffn))], ffn, dtype, timeout_s)
    for row in rows:
        print(json.dumps(asdict(row) | {"checkpoint": str(model_dir)}))
    if json_output:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"peak RSS while loading {model_dir.name} ({ffn} FFN nodes)")
    for column in ("role", "peak MiB", "largest shard MiB", "weights MiB", "bound MiB", "within"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r.role,
            f"{r.peak_load_mib}",
            f"{r.largest_shard_mib}",
            f"{r.weights_mib}",
            f"{r.bound_mib}",
            "yes" if r.within_bound else "NO",
        )
    Console().print(table)


if __name__ == "__main__":  # the measured subprocess: python -m benchmarks.load_memory DIR ROLE FFN_NODES DTYPE
    directory, role_name, nodes, dtype_name = sys.argv[1:5]
    print(json.dumps(_child(Path(directory), role_name, int(nodes), dtype_name)))
