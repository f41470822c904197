"""`python -m benchmarks.engine_ab --base REV`: the engine of git revision REV against this tree's, interleaved.

`--base-env KEY=VALUE` (repeatable) runs the base side's processes with that environment, and on its own (no
`--base`) compares this tree against itself under it: what a setting does, e.g. `--base-env AFD_HOST_MALLOC=default`
(glibc's own heap thresholds) or `--base-env AFD_NATIVE_LIBRARY_MIN_ROWS=0` (the fused experts without torch's
matmul for busy experts).

What an engine change did end to end, on this machine: REV is extracted (`git archive`) into a temporary folder,
and each repeat runs one process per side and FFN-shard count, alternating base / current, each decoding the
`afd bench engine` checkpoint (mid-size Qwen3-MoE, bf16, in-process FFN shards, 32-token prompts) at every batch
size after a warm-up. A side's process imports that side's code (PYTHONPATH, working directory) and builds or
reuses that side's native kernels; the checkpoint, the venv and the machine are shared. `--cpu-time` runs both
single-threaded and measures process CPU time instead of wall clock: on a shared VM, where neighbours take
cores and the wall-clock spread of one side reaches 10-30 %, CPU time moves less (stalls on memory still count).
Prints one JSON line per (FFN shards, batch) with decode and total tok/s and the prefill step's milliseconds, min /
median / max per side, and the ratios of the medians (prefill: base over current, so above 1 is faster), and a
table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.engine import _spread

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 64
RUNS_PER_PROCESS = 2

# Runs inside each side's tree; only API both sides have (the benchmark checkpoint, the engine, the local pool).
WORKER = """
import json, sys, time
import torch
import attn_nodes.engine
from afd.sampling_params import SamplingParams
from attn_nodes.config import EngineConfig
from attn_nodes.engine import AttentionEngine
from benchmarks.engine import _prompts, ensure_checkpoint
from ffn_nodes.local_pool import local_ffn_pool

shards, batches, cpu_time, new_tokens, runs = int(sys.argv[1]), [int(b) for b in sys.argv[2].split(",")], \\
    sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
if cpu_time:
    torch.set_num_threads(1)
clock = time.process_time if cpu_time else time.perf_counter
model_dir = ensure_checkpoint()
placement, transport = local_ffn_pool(model_dir, shards, "bfloat16")
config = EngineConfig(dtype="bfloat16", max_num_seqs=max(batches), max_num_batched_tokens=2048, kv_cache_gib=1.0)
engine = AttentionEngine.load(model_dir, transport, placement, config)
out = {}
for batch in batches:
    def run(tokens):
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        for prompt in _prompts(batch, 32, engine.spec.vocab_size):
            engine.add_request(prompt, params)
        start = clock()
        engine.step()
        decode_start, steps = clock(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        end = clock()
        return [batch * tokens / (end - start), batch * steps / (end - decode_start), (decode_start - start) * 1e3]
    run(4)
    run(16)
    out[batch] = [run(new_tokens) for _ in range(runs)]
print(json.dumps({"engine_module": attn_nodes.engine.__file__, "runs": out}))
"""


def extract_revision(revision: str, folder: Path) -> Path:
    """The tree of `revision` (tracked files only) in `folder`."""
    archive = folder / "base.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), revision], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "tree", filter="data")
    return folder / "tree"


def run_side(
    tree: Path, shards: int, batches: Sequence[int], cpu_time: bool, extra_env: dict[str, str]
) -> dict[int, list[list[float]]]:
    """One process of one side: per batch, RUNS_PER_PROCESS triples (total tok/s, decode tok/s, prefill ms)."""
    env = os.environ | {"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"} | extra_env
    args = [str(shards), ",".join(map(str, batches)), "1" if cpu_time else "0", str(NEW_TOKENS), str(RUNS_PER_PROCESS)]
    done = subprocess.run(
        [sys.executable, "-c", WORKER, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: the engine run failed:\n{done.stderr[-2000:]}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(answer["engine_module"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the run for {tree} imported the engine from {answer['engine_module']}")
    return {int(batch): runs for batch, runs in answer["runs"].items()}


def compare(
    base: Path,
    current: Path,
    shard_counts: Sequence[int],
    batches: Sequence[int],
    repeats: int,
    cpu_time: bool,
    base_env: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    runs: dict[tuple[str, int, int], list[list[float]]] = {}
    envs = {"base": base_env or {}, "current": {}}
    for _ in range(repeats):
        for shards in shard_counts:
            for side, tree in (("base", base), ("current", current)):
                for batch, pairs in run_side(tree, shards, batches, cpu_time, envs[side]).items():
                    runs.setdefault((side, shards, batch), []).extend(pairs)
    results = []
    for shards in shard_counts:
        for batch in batches:
            row: dict[str, Any] = {"ffn_shards": shards, "batch": batch, "clock": "cpu" if cpu_time else "wall"}
            for side in ("base", "current"):
                pairs = runs[(side, shards, batch)]
                row[f"{side}_decode_tok_s"] = _spread([p[1] for p in pairs])
                row[f"{side}_total_tok_s"] = _spread([p[0] for p in pairs])
                row[f"{side}_prefill_ms"] = _spread([p[2] for p in pairs])
            for kind in ("decode", "total"):
                ratio = row[f"current_{kind}_tok_s"]["median"] / row[f"base_{kind}_tok_s"]["median"]
                row[f"{kind}_ratio"] = round(ratio, 3)
            row["prefill_ratio"] = round(row["base_prefill_ms"]["median"] / row["current_prefill_ms"]["median"], 3)
            results.append(row)
    return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_ab", description=__doc__)
    parser.add_argument("--base", help="git revision to compare this tree against (default: this tree)")
    parser.add_argument(
        "--base-env", action="append", default=[], metavar="KEY=VALUE", help="environment of the base side's processes"
    )
    parser.add_argument("--ffn-shards", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3, help=f"processes per side (each {RUNS_PER_PROCESS} runs)")
    parser.add_argument("--cpu-time", action="store_true", help="one thread per side, process CPU time")
    args = parser.parse_args(argv)
    base_env = dict(_setting(item, parser) for item in args.base_env)
    if args.base is None and not base_env:
        parser.error("give --base REV, --base-env KEY=VALUE, or both")
    label = " ".join([args.base or "this tree", *args.base_env])
    with tempfile.TemporaryDirectory(prefix="afd-engine-ab-") as folder:
        base = extract_revision(args.base, Path(folder)) if args.base else REPO
        results = compare(base, REPO, args.ffn_shards, args.batch, args.repeats, args.cpu_time, base_env)
    for row in results:
        print(json.dumps({"base": args.base or "this tree", "base_env": base_env, **row}))
    clock = "process CPU time, 1 thread" if args.cpu_time else "wall clock"
    table = Table(title=f"engine {label} vs this tree ({clock}), median [min-max]")
    for column in ("FFN shards", "batch", "base decode tok/s", "this tree", "ratio", "prefill ms base / this tree"):
        table.add_column(column, justify="right")
    for row in results:
        cells = [row[f"{side}_decode_tok_s"] for side in ("base", "current")]
        spreads = [f"{c['median']:.1f} [{c['min']:.1f}-{c['max']:.1f}]" for c in cells]
        prefill = " / ".join(f"{row[f'{side}_prefill_ms']['median']:.0f}" for side in ("base", "current"))
        table.add_row(
            str(row["ffn_shards"]),
            str(row["batch"]),
            *spreads,
            f"{row['decode_ratio']:.2f}x",
            f"{prefill} ({row['prefill_ratio']:.2f}x)",
        )
    Console().print(table)
    return results


def _setting(item: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        parser.error(f"--base-env wants KEY=VALUE, got {item!r}")
    return key, value


if __name__ == "__main__":
    main()
