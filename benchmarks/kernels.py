"""`python -m benchmarks.kernels`: weight-streaming rate of the kernels afd.kernels chooses between.

Decode reads every weight once per step, so what matters is GB/s of weights read. The weight sets rotate
through 256 MiB so that the last-level cache cannot hold them. For each shape and row count it measures
every linear form (afd.kernels.tuning.LINEAR_FORMS: the native kernel where it built, `F.linear`, the
weight-stationary torch forms, oneDNN on the packed weight where torch has it), alternating them over the
repeats, and for the routed experts of one MoE layer the fused native kernel against the torch path
(ffn_nodes.experts, "looped" and "padded").
Prints a table and one JSON line per case, with min / median / max GB/s per form and the ratio of each
median to the baseline (`F.linear`, or the looped torch experts) measured in the same run. `--experts-tokens 256
1024` adds prefill-sized expert batches (compute-bound there: compare the forms' ratios, not GB/s to the probe);
`--linear-rows 8 32` the linears at decode batches of 8 and 32 rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from rich.console import Console
from rich.table import Table

from afd.kernels import linear_form, packed_linear
from afd.kernels.tuning import candidates
from ffn_nodes.experts import StackedExperts

ROTATION_BYTES = 256 << 20
REPEATS = 5


def _rates(forms: Mapping[str, Callable[..., object]], count: int, nbytes: int) -> dict[str, list[float]]:
    """GB/s of each form per repeat; forms alternate within each repeat."""
    for fn in forms.values():
        for i in range(count):  # first touch, lazy initialisation
            fn(i)
    rates: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(REPEATS):
        for name, fn in forms.items():
            start = time.perf_counter()
            for i in range(count):
                fn(i)
            rates[name].append(nbytes * count / (time.perf_counter() - start) / 1e9)
    return rates


def _row(case: str, rows: int, rates: dict[str, list[float]], baseline: str) -> dict:
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "case": case,
        "rows": rows,
        "gb_s": {
            name: {"min": round(min(r), 2), "median": round(medians[name], 2), "max": round(max(r), 2)}
            for name, r in rates.items()
        },
        "baseline": baseline,
        "ratio_vs_baseline": {name: round(m / medians[baseline], 2) for name, m in medians.items()},
    }


def measure_linear(out_features: int, in_features: int, row_counts: tuple[int, ...] = (1, 4, 16)) -> list[dict]:
    nbytes = out_features * in_features * 2
    count = max(2, ROTATION_BYTES // nbytes)
    base = torch.randn(out_features, in_features).to(torch.bfloat16)
    weights = [base] + [base.clone() for _ in range(count - 1)]
    packed_linear.allow(weights)  # as the model's own weights are
    results = []
    for rows in row_counts:
        x = torch.randn(rows, in_features).to(torch.bfloat16)
        forms = {form: (lambda i, form=form, x=x: linear_form(form, x, weights[i])) for form in candidates()}
        results.append(_row(f"linear {out_features}x{in_features}", rows, _rates(forms, count, nbytes), "library"))
    return results


def measure_experts(
    num_experts: int = 32,
    hidden: int = 1024,
    intermediate: int = 512,
    top_k: int = 4,
    tokens: tuple[int, ...] = (1, 8, 32),
) -> list[dict]:
    """One MoE layer's routed experts; GB/s counts the weights of the experts the tokens hit."""
    per_expert = 3 * hidden * intermediate * 2
    layers = max(2, ROTATION_BYTES // (per_expert * num_experts))
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden).to(torch.bfloat16) * 0.05
    down = torch.randn(num_experts, hidden, intermediate).to(torch.bfloat16) * 0.05
    stacks = [(gate_up, down)] + [(gate_up.clone(), down.clone()) for _ in range(layers - 1)]
    results = []
    for count in tokens:
        g = torch.Generator().manual_seed(count)
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(count)])
        weights = torch.rand(count, top_k, generator=g)
        h = torch.randn(count, hidden).to(torch.bfloat16)
        hit = len(set(ids.flatten().tolist()))
        forms = {}
        for strategy in ("fused", "looped", "padded"):
            experts = [StackedExperts(gu, dn, strategy) for gu, dn in stacks]
            forms[strategy] = lambda i, e=experts, h=h, ids=ids, w=weights: e[i].forward(h, ids, w, torch.zeros_like(h))
        rates = _rates(forms, layers, hit * per_expert)
        results.append(_row(f"experts {num_experts}x({hidden}x{intermediate}) top-{top_k}", count, rates, "looped"))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__)
    parser.add_argument("--experts-tokens", type=int, nargs="+", default=[1, 8, 32], help="tokens per expert batch")
    parser.add_argument("--linear-rows", type=int, nargs="+", default=[1, 4, 16], help="input rows of the linears")
    args = parser.parse_args(argv)
    if min(args.linear_rows + args.experts_tokens) < 1:
        parser.error("--linear-rows and --experts-tokens take counts of at least 1")
    rows = []
    for shape in ((1536, 1024), (1024, 512), (32000, 1024)):
        rows += measure_linear(*shape, row_counts=tuple(args.linear_rows))
    rows += measure_experts(tokens=tuple(args.experts_tokens))
    table = Table(title="bf16 weight streaming (GB/s of weights read, median \\[min-max]), weights rotating 256 MiB")
    for column in ("case", "rows", "form", "GB/s", "vs baseline"):
        table.add_column(column)
    for row in rows:
        print(json.dumps(row))
        for name, rate in row["gb_s"].items():
            spread = f"{rate['median']:.1f} [{rate['min']:.1f}-{rate['max']:.1f}]"
            table.add_row(row["case"], str(row["rows"]), name, spread, f"{row['ratio_vs_baseline'][name]:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
