"""`python -m benchmarks.kernel_ab --base REV`: the native CPU kernels of git revision REV against this tree's, side by
side in one process: what a change to afd/kernels/csrc/cpu_kernels.cpp did, on this machine.

Both builds go through torch's cpp_extension (the base into a temporary folder, under its own module name) and
run alternately, `--repeats` times, on the same inputs: the bf16 linear at 1-32 input rows (a 32768 x 1024
weight, 64 MiB, and 64 weights of 1024 x 1024, both far beyond the caches), the fused routed experts of one MoE
layer (32 experts top-4, hidden 1024, intermediate 512, 16 layers' weights in rotation) at 1, 8 and 32 tokens,
and decode attention (16 / 4 heads of 64). Every case first checks that both builds give identical outputs
(decode attention: within one bf16 step, as its exponentials may round differently between builds; the share of
identical outputs is in its JSON line).
Prints one JSON line per case (min / median / max per side, GB/s of weights read or microseconds, and the ratio
of the medians) and a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from afd.kernels import native

SOURCE = "afd/kernels/csrc/cpu_kernels.cpp"


def build_revision(revision: str, folder: Path) -> ModuleType:
    """The kernels as they were at `revision`, built into `folder`."""
    from torch.utils.cpp_extension import load

    root = Path(
        subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    text = subprocess.run(["git", "show", f"{revision}:{SOURCE}"], cwd=root, capture_output=True, text=True, check=True)
    source = folder / "base_kernels.cpp"
    source.write_text(text.stdout)
    return load(
        name="afd_cpu_kernels_base",
        sources=[str(source)],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
    )


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def compare(
    case: str, unit: str, sides: Mapping[str, Callable[[], object]], per_call: Callable[[float], float], repeats: int
) -> dict[str, Any]:
    """Alternate the sides `repeats` times; `per_call(seconds)` turns one timed call into the reported figure."""
    for run in sides.values():
        run()  # warm-up
    figures: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(repeats):
        for side, run in sides.items():
            start = time.perf_counter()
            run()
            figures[side].append(per_call(time.perf_counter() - start))
    base, new = statistics.median(figures["base"]), statistics.median(figures["this tree"])
    ratio = new / base if unit == "GB/s" else base / new  # > 1: this tree is faster
    return {"case": case, "unit": unit, **{side: _spread(v) for side, v in figures.items()}, "speedup": round(ratio, 3)}


def _linears(module: ModuleType, x: torch.Tensor, weights: list[torch.Tensor]) -> None:
    for weight in weights:
        module.linear_bf16(x, weight)


def _expert_layers(
    module: ModuleType, args: tuple[torch.Tensor, ...], gate_up: list[torch.Tensor], down: list[torch.Tensor]
) -> None:
    hidden, ids, weights = args
    out = torch.zeros_like(hidden)
    for layer_gate_up, layer_down in zip(gate_up, down, strict=True):
        module.moe_swiglu_bf16(hidden, ids, weights, layer_gate_up, layer_down, out)


def _attentions(module: ModuleType, args: tuple[Any, ...], calls: int) -> None:
    for _ in range(calls):
        module.decode_attention_bf16(*args)


def _gbs(nbytes: int) -> Callable[[float], float]:
    return functools.partial(lambda n, seconds: n / seconds / 1e9, nbytes)


def cases(base: ModuleType, current: ModuleType, repeats: int) -> list[dict[str, Any]]:
    results = []
    builds = (("base", base), ("this tree", current))
    generator = torch.Generator().manual_seed(0)
    large = [torch.randn(32768, 1024, generator=generator).bfloat16() for _ in range(4)]
    small = [torch.randn(1024, 1024, generator=generator).bfloat16() for _ in range(64)]
    for rows in (1, 2, 4, 8, 32):
        x = torch.randn(rows, 1024, generator=generator).bfloat16()
        for name, weights in (("32768x1024", large), ("64 x 1024x1024", small)):
            if not torch.equal(base.linear_bf16(x, weights[0]), current.linear_bf16(x, weights[0])):
                raise AssertionError(f"linear {name} at {rows} rows: the builds disagree")
            sides = {side: functools.partial(_linears, module, x, weights) for side, module in builds}
            nbytes = sum(w.nbytes for w in weights)
            results.append(compare(f"linear {name}, {rows} rows", "GB/s", sides, _gbs(nbytes), repeats))
    experts, hidden, inter, layers = 32, 1024, 512, 16
    gate_up = [torch.randn(experts, 2 * inter, hidden, generator=generator).bfloat16() for _ in range(layers)]
    down = [torch.randn(experts, hidden, inter, generator=generator).bfloat16() for _ in range(layers)]
    for tokens in (1, 8, 32):
        ids = torch.stack([torch.randperm(experts, generator=generator)[:4] for _ in range(tokens)])
        routing = (torch.randn(tokens, hidden, generator=generator).bfloat16(), ids, torch.rand(tokens, 4))
        outs = [torch.zeros(tokens, hidden).bfloat16() for _ in range(2)]
        for (_, module), out in zip(builds, outs, strict=True):
            module.moe_swiglu_bf16(*routing, gate_up[0], down[0], out)
        if not torch.equal(*outs):
            raise AssertionError(f"fused experts at {tokens} tokens: the builds disagree")
        hit = len(set(ids.flatten().tolist()))
        sides = {side: functools.partial(_expert_layers, module, routing, gate_up, down) for side, module in builds}
        nbytes = layers * hit * 3 * hidden * inter * 2
        results.append(compare(f"fused experts, {tokens} tokens ({hit} hit)", "GB/s", sides, _gbs(nbytes), repeats))
    if current.available_isa() == "avx512_bf16":
        heads, kv_heads, dim, calls = 16, 4, 64, 20
        for seqs, ctx in ((8, 64), (32, 64), (32, 512)):
            cache = torch.randn(seqs * ctx, 2 * kv_heads * dim, generator=generator).bfloat16()
            q = torch.randn(seqs, heads, dim, generator=generator).bfloat16()
            slots, lens = torch.arange(seqs * ctx).view(seqs, ctx), torch.full((seqs,), ctx)
            args = (q, cache, slots, lens, 0, kv_heads * dim, kv_heads, 0.125)
            base_out = base.decode_attention_bf16(*args).double()
            current_out = current.decode_attention_bf16(*args).double()
            # A softmax sums terms near 1 that cancel: one bf16 step of those terms, as the kernel tests allow.
            if not ((base_out - current_out).abs() <= base_out.abs().clamp_min(0.5) * 2**-7).all():
                raise AssertionError(f"decode attention {seqs} x {ctx}: the builds differ by more than one bf16 step")
            sides = {side: functools.partial(_attentions, module, args, calls) for side, module in builds}
            per_call = functools.partial(lambda n, seconds: seconds / n * 1e6, calls)
            row = compare(f"decode attention, {seqs} seqs x {ctx} keys", "us", sides, per_call, repeats)
            results.append(row | {"identical_share": round((base_out == current_out).double().mean().item(), 4)})
    return results


def _cell(spread: dict[str, float], unit: str) -> str:
    return f"{spread['median']:.1f} [{spread['min']:.1f}-{spread['max']:.1f}] {unit}"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_ab", description=__doc__)
    parser.add_argument("--base", required=True, help="git revision whose kernels to compare against")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    current = native.load()
    if current is None:
        raise SystemExit(f"the native kernels did not build here: {native.failure()}")
    with tempfile.TemporaryDirectory(prefix="afd-kernel-base-") as folder:
        base = build_revision(args.base, Path(folder))
        results = cases(base, current, args.repeats)
    table = Table(title=f"native kernels: {args.base} (base) vs this tree, median [min-max] of {args.repeats}")
    for column in ("case", "base", "this tree", "speedup"):
        table.add_column(column, justify="right")
    for row in results:
        print(json.dumps(row | {"base_revision": args.base, "isa": current.available_isa()}))
        unit = row["unit"]
        table.add_row(row["case"], _cell(row["base"], unit), _cell(row["this tree"], unit), f"{row['speedup']:.2f}x")
    Console().print(table)
    return results


if __name__ == "__main__":
    main()
